"""MOSSBench (xirui-li/MOSSBench): over-sensitivity of vision-language models.

Layout: `<root>/data/images_information/information.json` (benign set) and
`<root>/data_contrast/images_information/information.json` (harmful contrast set), each a dict
pid -> {"image": "images/<pid>.png", "question", "metadata": {"over": "type N", ...}}, images
relative to the set's folder. Benign: answer (all tags safe). Contrast: refuse; types 1 and 3
rewrite the question to be harmful (visual safe, text unsafe), type 2 makes the image harmful
(visual unsafe, text safe). Evaluation only: MOSSBench's licence forbids training on it.
"""
from __future__ import annotations

from pathlib import Path

from .common import BenchmarkError, item, open_image, read_json, require

SETS = {"benign": "data", "contrast": "data_contrast"}


def _tags(kind: str, over: str) -> tuple:
    if kind == "benign":
        return ("safe", "safe", "safe")
    return ("unsafe", "safe", "unsafe") if over == "type 2" else ("safe", "unsafe", "unsafe")


def load(root: Path, skip_missing: bool = False, report: list | None = None) -> list:
    out = []
    for kind, folder in SETS.items():
        info = root / folder / "images_information" / "information.json"
        if not info.is_file():
            raise BenchmarkError(f"mossbench: {info} not found (expected MOSSBench's {folder}/images_information/information.json)")
        rows = read_json(info, dict)
        for pid, row in rows.items():
            where = f"{info}: pid {pid}"
            if not isinstance(row, dict):
                raise BenchmarkError(f"{where}: item is not an object")
            require(row, ("image", "question", "metadata"), where, {"image": str, "question": str, "metadata": dict})
            over = row["metadata"].get("over", "")
            if over not in ("type 1", "type 2", "type 3"):
                raise BenchmarkError(f"{where}: metadata.over must be 'type 1', 'type 2' or 'type 3', got {over!r}")
            im = open_image(root / folder / row["image"], where, skip_missing, report)
            if im is None:
                continue
            out.append(item("mossbench", f"{kind}-{pid}", row["question"], [im], _tags(kind, over),
                            f"{kind} {over}", "answer" if kind == "benign" else "refuse"))
    return out
