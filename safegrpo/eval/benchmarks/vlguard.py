"""VLGuard test set (ys-zong/VLGuard): `test.json` plus its image folder (`test/` beside it by default).

Layout: a list of {"id", "image": "<subdir>/<file>", "safe": bool, "instr-resp": [...]}; a safe
image carries one {"safe_instruction", "response"} and one {"unsafe_instruction", "response"},
an unsafe image one {"instruction", "response"} (plus harmful_category / harmful_subcategory).
The three evaluation subsets are VLGuard's own: safe_safes (answer; all tags safe),
safe_unsafes (refuse; visual safe, text unsafe), unsafes (refuse; visual unsafe, text undefined).
"""
from __future__ import annotations

from pathlib import Path

from .common import BenchmarkError, item, json_items, open_image, require


def load(path: Path, skip_missing: bool = False, report: list | None = None, image_dir: str | Path | None = None) -> list:
    meta, rows = json_items(path, "test.json", "vlguard")
    images = Path(image_dir) if image_dir else (meta.parent / "test" if (meta.parent / "test").is_dir() else meta.parent)
    out = []
    for where, row in rows:
        where = f"{where} (id {row.get('id')})"
        require(row, ("id", "image", "safe", "instr-resp"), where, {"image": str, "safe": bool, "instr-resp": list})
        im = open_image(images / row["image"], where, skip_missing, report)
        if im is None:
            continue
        for pair in row["instr-resp"]:
            if not isinstance(pair, dict):
                raise BenchmarkError(f"{where}: instr-resp entries must be objects, got {pair!r}")
            if row["safe"] and "safe_instruction" in pair:
                out.append(item("vlguard", f"{row['id']}-safe", pair["safe_instruction"], [im],
                                ("safe", "safe", "safe"), "safe_safes", "answer"))
            elif row["safe"] and "unsafe_instruction" in pair:
                out.append(item("vlguard", f"{row['id']}-unsafe", pair["unsafe_instruction"], [im],
                                ("safe", "unsafe", "unsafe"), "safe_unsafes", "refuse"))
            elif not row["safe"] and "instruction" in pair:
                out.append(item("vlguard", row["id"], pair["instruction"], [im],
                                ("unsafe", None, "unsafe"), "unsafes", "refuse"))
            else:
                raise BenchmarkError(f"{where}: instr-resp entry with keys {sorted(pair)} does not fit safe={row['safe']}")
    return out
