"""Checkpoints: a Hugging Face model directory plus the trainer's state, written atomically.

    checkpoints/step_N/
        config.json, model.safetensors, tokenizer/processor files   (from_pretrained loads this)
        optimizer.safetensors     AdamW moments, flattened to named tensors
        rng.safetensors           torch CPU RNG and the rollout generator state
        trainer_state.json        step, sampler position, scheduler, optimizer param groups, extras

Everything is safetensors or JSON: no pickle is written or read. A checkpoint is written under a
temporary name and renamed into place, so a crash or SIGKILL mid-write never leaves a
`step_N` that loads wrongly; leftover temporaries are ignored and cleaned up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_RE = re.compile(r"^step_(\d+)$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"state.{idx}.{name}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(ckpt_root, step: int, model, processor, optimizer, state: dict,
                    generator: torch.Generator | None = None) -> Path:
    """Write checkpoints/step_{step} atomically; returns its path."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if generator is not None:
        rng["rollout_generator"] = generator.get_state()
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "optimizer_param_groups": groups},
                                                       indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(ckpt_root) -> Path | None:
    """The highest complete step_N under ckpt_root (temporaries are ignored), or None."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    for junk in root.glob(".step_*.tmp-*"):
        shutil.rmtree(junk, ignore_errors=True)
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and
             (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def load_trainer_state(ckpt: Path, optimizer, generator: torch.Generator | None = None) -> dict:
    """Restore optimizer and RNG states from a checkpoint; returns trainer_state.json."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    _unflatten_optimizer(optimizer, load_file(ckpt / "optimizer.safetensors"), state.pop("optimizer_param_groups"))
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if generator is not None and "rollout_generator" in rng:
        generator.set_state(rng["rollout_generator"])
    return state


def prune_checkpoints(ckpt_root, keep: int) -> None:
    """Delete all but the newest `keep` step_N directories (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    root = Path(ckpt_root)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
