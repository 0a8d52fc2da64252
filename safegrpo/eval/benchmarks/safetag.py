"""SafeTag: the training data's own layout (parquet or JSONL, see `safegrpo.data`), and the
SafeTag-Synth test split. All three tags are known; the category is the tag group
("visual/text/combined", e.g. safe/safe/unsafe for the compositional group)."""
from __future__ import annotations

from pathlib import Path

from ...data.records import load_safetag


def _as_items(records: list, name: str) -> list:
    for k, r in enumerate(records):
        r.meta = {**r.meta, "benchmark": name, "id": str(r.meta.get("id", k)),
                  "category": r.meta.get("group") or f"{r.image_tag}/{r.text_tag}/{r.combine_tag}",
                  "expected": "refuse" if r.combine_tag == "unsafe" else "answer"}
    return records


def load(path: Path, skip_missing: bool = False, report: list | None = None, split: str | None = None) -> list:
    return _as_items(load_safetag(path, split=split, skip_invalid=skip_missing, report=report), "safetag")


def load_synth(path: Path | None = None, skip_missing: bool = False, report: list | None = None, synth=None) -> list:
    """The SafeTag-Synth test split; generated (deterministically, ~1 s) into `path` if absent."""
    from ...data.synth import SynthConfig, write_synth
    root = write_synth(path or "data/synth", synth or SynthConfig())
    return _as_items(load_safetag(root / "test.parquet"), "safetag-synth")
