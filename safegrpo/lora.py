"""LoRA on the text stack (model.lora.rank > 0), through peft (`pip install -e ".[lora]"`).

    W x  becomes  W x + (alpha / r) B A x,   A [r, in] random, B [out, r] zero at the start

Only A and B train. The reference policy of the KL term is the same network with its adapters
switched off (`adapters_disabled`, used by policy.lora_logprobs), so no second copy of the
weights exists. The adapters go into the Hugging Face model in place (peft's
`inject_adapter_in_model`): the model keeps its class and module paths, so the prompt-once
forward, the lean decoder (which reads each projection's merged weight,
rl/layers.effective_weight) and FSDP2's per-layer units work unchanged.

A LoRA checkpoint holds the adapter only:

    step_N/adapter_config.json        rank, alpha, dropout, target modules, the base model's path
                                      and fingerprint (checked whenever the adapter is loaded)
    step_N/adapter_model.safetensors  the A and B matrices, by parameter name

`load_merged` reads such a directory back as a plain model with the adapter merged (model.load_model
does so for eval.py, and model.export_merged for `train.py --export-merged`). This module imports
no model-loading code: model.py depends on it, not the other way round.
"""
from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import LoraConfig
from .model_files import resolve_model_path

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError('model.lora.rank > 0 needs peft: pip install -e ".[lora]"') from None
    return peft


def target_regex(names) -> str:
    """peft's full-name pattern for projections called `names` outside the vision tower (Qwen-VL
    vision blocks have gate/up/down projections of their own)."""
    return r"^(?!.*visual).*\.(" + "|".join(names) + r")$"


def check_targets(model, lora: LoraConfig) -> None:
    """Raise, naming model.lora.target_modules, when none of `model`'s text-stack modules (a meta
    skeleton is enough, model.model_skeleton) matches them: found at start-up, not after the
    warm start."""
    _peft()
    pattern = re.compile(target_regex(lora.target_modules))
    if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and "visual" not in n})
        raise ValueError(f"model.lora.target_modules {list(lora.target_modules)}: no module of the model's text "
                         f"stack has such a name (its linear layers: {leaves})")


def apply_lora(model, lora: LoraConfig, seed: int = 0):
    """Adapters on `model`'s text-stack projections named by lora.target_modules, in place; every
    other parameter frozen. A is drawn from `seed` (B = 0, so the model is unchanged). Raises
    when no module matches."""
    peft = _peft()
    conf = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=target_regex(lora.target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft.inject_adapter_in_model(conf, model)
        except ValueError as e:
            raise ValueError(f"model.lora.target_modules {lora.target_modules}: {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model._safegrpo_lora = lora
    return model


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapters_disabled(model):
    """Context: `model` computes as its base model (the reference policy); restored on exit."""
    layers = lora_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def adapter_state(state_dict: dict) -> dict:
    """The adapter's tensors of a (full) state dict, on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if "lora_" in k}


_BASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def base_fingerprint(path) -> str:
    """A fingerprint of the model at `path` (a directory or a .gguf file): SHA-256 over its weight,
    config and tokenizer files' names, sizes and 16 evenly spaced 64 KiB samples of each (whole files
    up to 1 MiB). Another fine-tune or vocabulary at the same path changes it; reading costs ~1 MiB
    a file, whatever the model's size."""
    folder, gguf = resolve_model_path(path)
    folder = Path(folder)
    files = [folder / gguf] if gguf else \
        sorted(folder.glob("*.safetensors")) + [folder / n for n in _BASE_FILES if (folder / n).is_file()]
    h, chunk = hashlib.sha256(), 1 << 16
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            if size <= 16 * chunk:
                h.update(fh.read())
                continue
            for i in range(16):
                fh.seek(i * (size - chunk) // 15)
                h.update(fh.read(chunk))
    return "sha256:" + h.hexdigest()


def save_adapter(directory: Path, tensors: dict, lora: LoraConfig, base: str, fingerprint: str) -> None:
    """The adapter files of a LoRA checkpoint; `fingerprint` is base_fingerprint(base)."""
    from safetensors.torch import save_file
    save_file(tensors, directory / ADAPTER_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(
        {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
         "target_modules": list(lora.target_modules),
         "base_model_name_or_path": str(Path(base).resolve()) if Path(base).exists() else str(base),
         "base_fingerprint": fingerprint}, indent=1))


def check_base(directory, base=None, fingerprint: str | None = None) -> None:
    """Raise when the base model at `base` (default: the path the adapter directory records) is not
    the one the adapter was trained on (its recorded base_fingerprint). `fingerprint`: base's,
    when the caller has computed it already."""
    f = Path(directory) / ADAPTER_CONFIG
    c = _adapter_json(directory)
    recorded, base = c.get("base_fingerprint"), base or c["base_model_name_or_path"]
    if not Path(resolve_model_path(base)[0]).exists():
        raise RuntimeError(f"{f}: its base model {base} does not exist")
    if recorded is None:
        raise RuntimeError(f"{f}: records no base_fingerprint, so its base model cannot be checked "
                           "(written by an older safegrpo; add the key by hand if you are sure of the base)")
    if (fingerprint or base_fingerprint(base)) != recorded:
        raise RuntimeError(f"{f}: the base model at {base} is not the one this adapter was trained on "
                           "(its weights, config or tokenizer differ from the recorded base_fingerprint)")


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(directory, model) -> None:
    """Load directory's adapter tensors into `model` (which carries adapters of the same shape);
    every adapter parameter must be in the file."""
    from safetensors.torch import load_file
    f = Path(directory) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(f)
    except Exception as e:
        raise RuntimeError(f"{f}: cannot be read ({type(e).__name__}: {e})") from e
    want = {k for k, _ in model.named_parameters() if "lora_" in k}
    if want != set(tensors):
        raise RuntimeError(f"{f}: adapter tensors do not match the model (missing {sorted(want - set(tensors))[:3]}, "
                           f"unexpected {sorted(set(tensors) - want)[:3]})")
    model.load_state_dict(tensors, strict=False)


def _adapter_json(directory) -> dict:
    """adapter_config.json's keys, read once; an error names the file."""
    f = Path(directory) / ADAPTER_CONFIG
    try:
        c = json.loads(f.read_text())
        missing = [k for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path")
                   if k not in c]
        if missing:
            raise KeyError(", ".join(missing))
        return c
    except Exception as e:
        raise RuntimeError(f"{f}: not an adapter config ({type(e).__name__}: {e})") from e


def adapter_config(directory) -> tuple[LoraConfig, str]:
    """(the LoRA settings, the base model's path) of an adapter directory."""
    c = _adapter_json(directory)
    return LoraConfig(rank=c["r"], alpha=c["lora_alpha"], dropout=c["lora_dropout"],
                      target_modules=c["target_modules"]), c["base_model_name_or_path"]


def merge(model):
    """Fold every adapter into its base weight and remove the adapter modules: a plain model."""
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(m, child_name, child.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    model._safegrpo_lora = None
    return model


def load_merged(directory, load_base):
    """The model of an adapter directory, merged: load_base(path) builds the base model."""
    lora, base = adapter_config(directory)
    if not Path(base).exists() and ":" not in base:
        raise FileNotFoundError(f"{Path(directory) / ADAPTER_CONFIG}: its base model {base} does not exist")
    check_base(directory, base)
    model = apply_lora(load_base(base), lora)
    read_adapter(directory, model)
    return merge(model)
