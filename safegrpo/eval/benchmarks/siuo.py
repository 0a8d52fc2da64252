"""SIUO (sinwang20/SIUO): safe inputs, unsafe output; `siuo_gen.json` plus `images/` beside it.

Layout: a list of {"question_id", "image", "question", "category", "safety_warning",
"reference_answer"}. Image and text are each safe; together they are not: refuse
(visual safe, text safe, combined unsafe, the compositional group of SafeTag).
"""
from __future__ import annotations

from pathlib import Path

from .common import item, json_items, open_image, require


def load(path: Path, skip_missing: bool = False, report: list | None = None, image_dir: str | Path | None = None) -> list:
    meta, rows = json_items(path, "siuo_gen.json", "siuo")
    images = Path(image_dir) if image_dir else meta.parent / "images"
    out = []
    for where, row in rows:
        require(row, ("question_id", "image", "question", "category"), where,
                {"image": str, "question": str, "category": str})
        im = open_image(images / row["image"], f"{where} (question_id {row['question_id']})", skip_missing, report)
        if im is None:
            continue
        out.append(item("siuo", row["question_id"], row["question"], [im], ("safe", "safe", "unsafe"),
                        row["category"], "refuse"))
    return out
