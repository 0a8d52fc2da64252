"""Checkpoints: a Hugging Face model directory plus the trainer's state, written atomically.

    checkpoints/step_N/
        config.json, model.safetensors, tokenizer/processor files   (from_pretrained loads this)
        optimizer.safetensors     AdamW moments, flattened to named tensors
        rng.safetensors           torch CPU RNG state (rollouts draw from per-prompt seeds)
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

from . import distributed as dist

_STEP_RE = re.compile(r"^step_(\d+)$")


def _flatten_optimizer(model, opt: torch.optim.Optimizer) -> tuple[dict, list]:
    """Optimizer state as named tensors "state/<param>/<name>" and its param groups. <param> is
    the parameter's index (one process) or its full name (gathered from all ranks under FSDP2)."""
    sd = dist.full_optimizer_state_dict(model, opt) if dist.active() else opt.state_dict()
    if not sd:          # ranks other than 0 receive nothing from the gather
        return {}, []
    tensors = {}
    for key, st in sd["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"state/{key}/{name}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(model, opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, val in tensors.items():
        _, param, name = key.split("/")
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = val
    sd = {"state": state, "param_groups": groups}
    if dist.active():
        dist.load_full_optimizer_state_dict(model, opt, sd)
    else:
        opt.load_state_dict(sd)


def save_checkpoint(ckpt_root, step: int, model, processor, optimizer, state: dict) -> Path:
    """Write checkpoints/step_{step} atomically; returns its path. Under torchrun every rank must
    call it (the full model and optimizer states are gathered); rank 0 writes."""
    root = Path(ckpt_root)
    final = root / f"step_{step}"
    weights = dist.full_state_dict(model) if dist.active() else None
    tensors, groups = _flatten_optimizer(model, optimizer)
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".step_{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)
        if processor is not None:
            processor.save_pretrained(tmp)
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "optimizer_param_groups": groups},
                                                           indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
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


def load_trainer_state(ckpt: Path, optimizer, model=None) -> dict:
    """Restore optimizer and RNG states from a checkpoint; returns trainer_state.json. Under
    torchrun pass the (sharded) model: each rank reads the file and keeps its shard."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    _unflatten_optimizer(model, optimizer, load_file(ckpt / "optimizer.safetensors"),
                         state.pop("optimizer_param_groups"))
    torch.set_rng_state(load_file(ckpt / "rng.safetensors")["torch_cpu"])
    return state


def prune_checkpoints(ckpt_root, keep: int) -> None:
    """Delete all but the newest `keep` step_N directories (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    root = Path(ckpt_root)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
