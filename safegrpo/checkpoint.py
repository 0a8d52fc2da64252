"""Checkpoints: a Hugging Face model directory plus the trainer's state, written atomically.

    checkpoints/step_N/
        config.json, model.safetensors, tokenizer/processor files   (from_pretrained, vLLM and
          SGLang load this folder as it is: the only *.safetensors in it are the model's)
          (with LoRA instead: adapter_config.json, adapter_model.safetensors; see lora.py)
        trainer_state.json        step, sampler position, scheduler, optimizer param groups, extras
        trainer/optimizer.safetensors   AdamW moments, flattened to named tensors
        trainer/rng.safetensors         torch CPU RNG state (rollouts draw from per-prompt seeds)

(The trainer's tensors sit in a subfolder because inference engines load every *.safetensors at
a model folder's top; checkpoints written before kept them there and still resume.)

Everything is safetensors or JSON: no pickle is written or read. A checkpoint is written under a
temporary name and renamed into place, so a crash or SIGKILL mid-write never leaves a
`step_N` that loads wrongly; readers ignore leftover temporaries, and only the run that holds
the folder's lock removes them (a reader never deletes: a live run may be writing one). A
checkpoint damaged afterwards (a truncated file, an empty state) is named in the error, and
`--resume` falls back to the newest intact one, saying so.

A run directory belongs to one run and to this project (`open_run_dir`): a folder safegrpo did
not create is refused (files.own_dir); starting afresh where a run left checkpoints or metrics
stops with a message (or, with --overwrite, deletes that run's files first, only when nothing
at any depth is the user's: files.foreign_entries), and `--resume` checks that the checkpoint
was written under the same configuration (`resumable_checkpoint`), naming every difference.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import distributed as dist
from .config import Config, config_from_dict
from .options import differences
from .files import MARKER, NotOursError, atomic_path, foreign_entries, own_dir, register, remove_ours, remove_temporaries
from .lora import ADAPTER_WEIGHTS, adapter_state, save_adapter

_STEP_RE = re.compile(r"^step_(\d+)$")
STATE_DIR = "trainer"           # the trainer's tensors, out of the model folder's *.safetensors pattern
STATE_FILES = ("trainer_state.json", f"{STATE_DIR}/optimizer.safetensors", f"{STATE_DIR}/rng.safetensors")


def _state_file(ckpt: Path, name: str) -> Path:
    """ckpt/<name>, or where a checkpoint from before the trainer/ subfolder kept it."""
    f = ckpt / name
    return f if f.is_file() or "/" not in name else ckpt / Path(name).name
LOCK = ".lock"                 # held (flock) by the live process that owns the run directory
# settings that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = ("train.steps", "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_limit", "train.threads",
                     "train.device", "train.out_dir", "train.collective_timeout_s", "grpo.max_empty_steps",
                     "rollout.max_batch_tokens")     # completions do not depend on the KV budget (tests/test_engine.py)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class RunDirError(RuntimeError):
    """train.out_dir holds another run (or files that are not a run's)."""


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


def save_checkpoint(ckpt_root, step: int, model, processor, optimizer, state: dict, adapter=None) -> Path:
    """Write checkpoints/step_{step} atomically; returns its path. Under torchrun every rank must
    call it (the full model and optimizer states are gathered); rank 0 writes. adapter=(LoRA
    settings, base model path, its fingerprint): the adapter alone is written (lora.py), not the model."""
    root = Path(ckpt_root)
    final = root / f"step_{step}"
    weights = dist.full_state_dict(model) if dist.active() else None
    tensors, groups = _flatten_optimizer(model, optimizer)
    if dist.is_main():
        own_dir(root)
        with atomic_path(final) as tmp:              # .step_N.tmp-PID until complete; replaces only a step of ours
            if adapter is not None:
                tmp.mkdir(parents=True)
                save_adapter(tmp, adapter_state(weights if weights is not None else model.state_dict()), *adapter)
            else:
                model.save_pretrained(tmp, state_dict=weights)
            if processor is not None:
                processor.save_pretrained(tmp)
            (tmp / STATE_DIR).mkdir()
            save_file(tensors, tmp / STATE_DIR / "optimizer.safetensors")
            save_file({"torch_cpu": torch.get_rng_state()}, tmp / STATE_DIR / "rng.safetensors")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "optimizer_param_groups": groups},
                                                               indent=1))
    dist.barrier()
    return final


def _steps(root: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))


def latest_checkpoint(ckpt_root) -> Path | None:
    """The highest step_N under ckpt_root that has its trainer state (temporaries are ignored,
    never deleted: a live run may be writing one), or None."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    steps = [(n, p) for n, p in _steps(root) if (p / "trainer_state.json").is_file()]
    return steps[-1][1] if steps else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (the file and what is wrong with it), or None."""
    weights = sorted(ckpt.glob("model*.safetensors")) or sorted(ckpt.glob(ADAPTER_WEIGHTS))
    if not weights:
        return f"{ckpt / 'model.safetensors'}: missing"
    for f in [*weights, *(_state_file(ckpt, n) for n in STATE_FILES)]:
        if not f.is_file():
            return f"{f}: missing"
        try:
            if f.suffix == ".json":
                state = json.loads(f.read_text())
                if not isinstance(state, dict) or "step" not in state:
                    return f"{f}: not a trainer state (no step)"
            else:
                with safe_open(f, framework="pt") as fh:      # checks the header against the file's size
                    for k in list(fh.keys())[:1]:
                        fh.get_slice(k)
        except Exception as e:  # json and safetensors raise several types
            return f"{f}: {type(e).__name__}: {e}"
    return None


def _read(f: Path, what):
    try:
        return what(f)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged") from e


def load_trainer_state(ckpt: Path, optimizer, model=None) -> dict:
    """Restore optimizer and RNG states from a checkpoint; returns trainer_state.json. Under
    torchrun pass the (sharded) model: each rank reads the file and keeps its shard."""
    state = _read(ckpt / "trainer_state.json", lambda f: json.loads(f.read_text()))
    _unflatten_optimizer(model, optimizer, _read(_state_file(ckpt, STATE_FILES[1]), load_file),
                         state.pop("optimizer_param_groups"))
    torch.set_rng_state(_read(_state_file(ckpt, STATE_FILES[2]), load_file)["torch_cpu"])
    return state


def resumable_checkpoint(ckpt_root, cfg: Config, say=print) -> Path | None:
    """The newest intact checkpoint to resume `cfg` from (damaged newer ones are named and
    skipped), or None when there is none. Raises RunDirError when it was written under another
    configuration (listing every difference); RESUMABLE_CHANGES may differ, and train.steps
    only with a constant learning-rate schedule."""
    root = Path(ckpt_root)
    found = None
    for step, p in reversed(_steps(root) if root.is_dir() else []):
        problem = checkpoint_problem(p)
        if problem is None:
            found = p
            break
        if say:
            say(f"[resume] skipping damaged checkpoint {p.name}: {problem}")
    if found is None:
        if say:
            say(f"[resume] no intact checkpoint under {root}: starting from the beginning")
        return None
    if say and found != (_steps(root)[-1][1]):
        say(f"[resume] falling back to {found.name}, the newest intact checkpoint")
    saved = json.loads((found / "trainer_state.json").read_text()).get("config")
    if saved is not None:
        old = config_from_dict(saved)
        diff = differences(old, cfg, ignore=RESUMABLE_CHANGES)
        if old.train.steps != cfg.train.steps and cfg.optim.schedule != "constant":
            diff.append(f"train.steps: {old.train.steps} -> {cfg.train.steps} (it sizes the {cfg.optim.schedule} schedule)")
        if diff:
            raise RunDirError(f"--resume: {found} was written under another configuration; differences "
                              f"(checkpoint -> now): {'; '.join(diff)}. Resume with the run's own settings, or "
                              "start a new run in another train.out_dir (or with --overwrite)")
    return found


def open_run_dir(out: Path, resume: bool, overwrite: bool):
    """Make `out` this run's directory and take it for this process; returns the open lock
    file (keep it open for the run's life). In order: the folder must be ours (created and
    marked now, or earlier: files.own_dir), then the lock (`lock_run_dir`), then the run in it
    (`claim_run_dir`), then our own leftover temporaries go (we hold the lock: no live writer)."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    try:
        own_dir(out)
    except NotOursError as e:
        raise RunDirError(f"train.out_dir: {e}") from None
    fh = lock_run_dir(out)
    claim_run_dir(out, resume, overwrite)
    remove_temporaries(out)
    remove_temporaries(out / "checkpoints")
    return fh


def lock_run_dir(out: Path):
    """Take the run directory for this process: an exclusive lock on out/.lock, held until the
    process ends (the returned file must stay open), so two train.py never write one run
    (interleaved metrics, clashing checkpoints). A live holder is named; a dead one's lock is
    released by the OS, so a killed run can be resumed at once."""
    import fcntl
    import os
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    register(out, LOCK)
    fh = open(out / LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise RunDirError(f"{out} is in use by a live run (process {pid}); wait for it to end, or choose another "
                          "train.out_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def claim_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """The run in `out` (a folder of ours, locked): a directory holding another run's
    checkpoints or metrics is refused unless resuming it, or deleted first with overwrite:
    only when nothing in it, at any depth, is the user's (files.foreign_entries); else nothing
    is deleted and the user's files are named."""
    out = Path(out)
    if resume:
        return
    ckpts = out / "checkpoints"
    holds_run = (out / "metrics.jsonl").exists() or (ckpts.is_dir() and any(_STEP_RE.match(p.name) for p in ckpts.iterdir()))
    if not holds_run:
        return
    if not overwrite:
        raise RunDirError(f"{out} already holds a run (checkpoints or metrics.jsonl): pass --resume to continue "
                          "it, --overwrite to delete it and start again, or choose another train.out_dir")
    foreign = foreign_entries(out)
    if foreign:
        raise RunDirError(f"--overwrite: {out} also holds files a run does not write "
                          f"({', '.join(str(p.relative_to(out)) for p in foreign[:10])}); not deleting anything. "
                          "Move them away, or choose another train.out_dir")
    for p in list(out.iterdir()):
        if p.name not in (LOCK, MARKER):     # the lock is held now: deleting it would let a second run lock a new file
            remove_ours(p)


def prune_checkpoints(ckpt_root, keep: int) -> None:
    """Delete all but the newest `keep` step_N directories (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    root = Path(ckpt_root)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)))
    for _, p in steps[:-keep]:
        try:
            remove_ours(p)
        except NotOursError as e:            # a file of the user's inside: the checkpoint stays
            print(f"[checkpoint] not pruning: {e}")
