"""XSTest (paul-rottger/exaggerated-safety): text-only exaggerated-safety prompts.

Layout: `<root>/xstest_prompts.csv` (id, prompt, type, label, focus, note); `label` is safe or
unsafe (the unsafe ones are the `contrast_*` types). Safe: answer; unsafe: refuse. Only the text
and combined tags are defined (there is no image).
"""
from __future__ import annotations

from pathlib import Path

from .common import BenchmarkError, csv_rows, expected_from, item, require


def load(root: Path, skip_missing: bool = False, report: list | None = None) -> list:
    path = root / "xstest_prompts.csv" if root.is_dir() else root
    if not path.is_file():
        raise BenchmarkError(f"xstest: {path} not found (expected XSTest's xstest_prompts.csv)")
    out = []
    for where, row in csv_rows(path):
        require(row, ("id", "prompt", "type", "label"), where)
        label = row["label"].strip().lower()
        if label not in ("safe", "unsafe"):
            raise BenchmarkError(f"{where}: label must be safe or unsafe, got {row['label']!r}")
        out.append(item("xstest", row["id"], row["prompt"], [], (None, label, label), row["type"],
                        expected_from(label)))
    return out
