"""What a run reads before its models: the model directory (the tiny default built when
model.path is empty) and the train and test records, checked when loaded.

    model_dir(cfg)               model.path, or model.tiny_dir with the tiny Qwen2-VL built there
                                 (again only when its shape or seed changed)
    load_data(cfg, processor)    (train, test) records: SafeTag-Synth generated into
                                 data.synth_dir when data.train is empty; every row valid (or
                                 skipped and reported), images shrunk to the processor's pixel
                                 limit, every prompt within data.max_prompt_length (or dropped
                                 and reported with data.filter_overlong_prompts)

Under torchrun rank 0 runs these first (it may write the data and the model) and the others
after it; only rank 0 prints.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import distributed as dist
from ..config import Config
from ..model import max_pixels
from ..model_files import resolve_model_path
from ..rl.decode import kv_plan
from ..safety.prompting import prompt_lengths
from . import synth
from .records import load_safetag
from .tiny_model import build_tiny_model_dir


def model_dir(cfg: Config) -> Path:
    """The model directory of this run: model.path, or the tiny default in model.tiny_dir."""
    m = cfg.model
    if m.path:
        if not Path(resolve_model_path(m.path)[0]).is_dir():
            raise FileNotFoundError(f"model.path {m.path} is not a directory (a local Hugging Face model "
                                    "directory is expected; see data/README.md)")
        return Path(m.path)
    tiny = Path(m.tiny_dir)
    meta = tiny / "safegrpo_tiny.json"
    want = {"model": vars(m.tiny), "seed": cfg.train.seed, "family": "qwen2_vl"}
    if dist.is_main() and not (meta.is_file() and json.loads(meta.read_text()) == want):
        build_tiny_model_dir(tiny, vars(m.tiny), seed=cfg.train.seed)
    return tiny


def load_data(cfg: Config, processor) -> tuple[list, list]:
    """(train, test) records, checked now rather than when drawn (see the module docstring)."""
    d = cfg.data
    if not d.train:
        root = synth.write_synth(d.synth_dir, d.synth)
        train_path, test_path = root / "train.parquet", root / "test.parquet"
    else:
        train_path, test_path = d.train, d.test
    kw = dict(skip_invalid=d.skip_invalid, image_root=d.image_root or None, max_pixels=max_pixels(processor),
              allow_outside=d.allow_outside_images)
    train = check_lengths(cfg, processor, load_safetag(train_path, split=d.train_split, **kw),
                          f"data.train ({train_path})")
    test = check_lengths(cfg, processor, load_safetag(test_path, split=d.test_split, **kw),
                         f"data.test ({test_path})") if test_path else []
    return train, test


def check_lengths(cfg: Config, processor, records: list, name: str) -> list:
    """Records whose prompt fits data.max_prompt_length; a longer one is an error naming its
    file and row, or with data.filter_overlong_prompts dropped and reported. With
    rollout.max_batch_tokens the KV budget must hold the longest prompt and one full row."""
    d, ro = cfg.data, cfg.rollout
    lengths = prompt_lengths(processor, records, d.prompt_style)
    longest = max((n for n in lengths if n <= d.max_prompt_length or not d.filter_overlong_prompts), default=0)
    if ro.max_batch_tokens:
        kv_plan(ro.max_batch_tokens, longest, ro.group_size, ro.max_new_tokens, 1)
    over = [(r, n) for r, n in zip(records, lengths) if n > d.max_prompt_length]
    if not over:
        return records
    if not d.filter_overlong_prompts:
        r, n = over[0]
        raise ValueError(f"{r.origin or name}: the prompt has {n} tokens, more than data.max_prompt_length="
                         f"{d.max_prompt_length} ({len(over)} such row(s); set data.filter_overlong_prompts "
                         "to drop them)")
    keep = [r for r, n in zip(records, lengths) if n <= d.max_prompt_length]
    if dist.is_main():
        rows = ", ".join(r.origin.rsplit(": ", 1)[-1] for r, _ in over[:20]) + (" ..." if len(over) > 20 else "")
        print(f"[data] {name}: dropped {len(over)} prompt(s) longer than {d.max_prompt_length} tokens "
              f"(filter_overlong_prompts): {rows}")
    if not keep:
        raise ValueError(f"{name}: every prompt is longer than data.max_prompt_length={d.max_prompt_length}")
    return keep
