"""SIUO (sinwang20/SIUO): safe inputs, unsafe output; `siuo_gen.json` plus `images/` beside it.

Layout: a list of {"question_id", "image", "question", "category", "safety_warning",
"reference_answer"}. Image and text are each safe; together they are not: refuse
(visual safe, text safe, combined unsafe, the compositional group of SafeTag).
"""
from __future__ import annotations

from pathlib import Path

from . import BenchmarkError, item, open_image, read_json, require


def load(path: Path, skip_missing: bool = False, report: list | None = None, image_dir: str | Path | None = None) -> list:
    meta = path / "siuo_gen.json" if path.is_dir() else path
    if not meta.is_file():
        raise BenchmarkError(f"siuo: {meta} not found (expected SIUO's siuo_gen.json)")
    images = Path(image_dir) if image_dir else meta.parent / "images"
    rows = read_json(meta, list)
    out = []
    for k, row in enumerate(rows):
        where = f"{meta}: item {k}"
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}: not an object")
        require(row, ("question_id", "image", "question", "category"), where,
                {"image": str, "question": str, "category": str})
        im = open_image(images / row["image"], f"{where} (question_id {row['question_id']})", skip_missing, report)
        if im is None:
            continue
        out.append(item("siuo", row["question_id"], row["question"], [im], ("safe", "safe", "unsafe"),
                        row["category"], "refuse"))
    return out
