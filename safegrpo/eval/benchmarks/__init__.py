"""Benchmark adapters: each reads one safety benchmark in its own published layout.

Every adapter returns a list of `SafeTagRecord`s, so that prompting, rollout and scoring treat a
benchmark item exactly like a training row:
    prompt       the user's instruction (the step-guided system text is added by `prompting`)
    images       [] for text-only items, else one RGB PIL image
    image_tag / text_tag / combine_tag
                 "safe" / "unsafe" where the benchmark defines the tag, None where it does not
    meta         {"benchmark", "id", "category", "expected": "refuse" | "answer" | None}
`expected` is the behaviour a safe and helpful model shows (None where the benchmark does not
say, e.g. FigStep's advice categories 8-10, which are reported apart).

Errors: a missing image, a malformed row (a missing or null field, a field of the wrong type, text
that is not UTF-8, an unbalanced quote in a CSV), an empty file or an unknown layout raises one
`BenchmarkError` naming the file and the item, while loading, before any model runs. With
`skip_missing=True` items whose image is missing are skipped instead and listed in `report` (a
list the caller passes; one `(item id, reason)` per skipped item); a benchmark left with no item
is an error too.

Helpers shared by the adapters are in common.py.
Registry: `BENCHMARKS[name] = (loader, default path relative to ../shared/benchmarks)`;
`load_benchmark(name, path=None, ...)` resolves the default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...data.records import SafeTagRecord
from . import figstep, mmsafeaware, mossbench, safetag, siuo, vlguard, xstest
from .common import SHARED, BenchmarkError, item

__all__ = ["BENCHMARKS", "SHARED", "BenchmarkError", "item", "load_benchmark"]

BENCHMARKS: dict[str, tuple[Callable, str | None]] = {
    "safetag-synth": (safetag.load_synth, None),
    "safetag": (safetag.load, None),
    "figstep": (figstep.load, "figstep"),
    "mossbench": (mossbench.load, "mossbench"),
    "xstest": (xstest.load, "xstest"),
    "mmsafeaware": (mmsafeaware.load, "mmsafeaware"),
    "vlguard": (vlguard.load, None),
    "siuo": (siuo.load, None),
}


def load_benchmark(name: str, path: str | Path | None = None, skip_missing: bool = False,
                   report: list | None = None, **kw) -> list[SafeTagRecord]:
    """Items of benchmark `name` read from `path` (default: its sample in ../shared/benchmarks)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    loader, default = BENCHMARKS[name]
    if path is None and name != "safetag-synth":
        if default is None:
            raise ValueError(f"benchmark {name!r} has no sample in {SHARED}; give its path")
        path = SHARED / default
    if path is not None:
        path = Path(path)
        if name != "safetag-synth" and not path.exists():  # SafeTag-Synth is generated there if absent
            raise BenchmarkError(f"{name}: {path} does not exist")
    skipped = [] if report is None else report
    items = loader(path, skip_missing=skip_missing, report=skipped, **kw)
    if not items:
        why = f" (all {len(skipped)} skipped: {skipped[0][1]})" if skipped else ""
        raise BenchmarkError(f"{name}: no items loaded from {path}{why}")
    return items
