"""The optimizer, its learning-rate schedule, bf16 autocast and the finite-number guard, shared
by the warm-start stages and GRPO.

    AdamW with weight decay on matrices only (ndim >= 2), learning rate x lr_lambda(update):
    linear warm-up over `warmup` updates, then constant or cosine to 0 at `total` updates.
"""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the run stops and writes no checkpoint of that state."""


class NothingToLearnError(RuntimeError):
    """DAPO kept no group for grpo.max_empty_steps steps in a row: the reward has no spread."""


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"non-finite {what} at step {step}: {value.item() if value.numel() == 1 else value}; "
                             "stopping without writing a checkpoint of this state. Lower optim.lr, check the data, "
                             "or resume from the last checkpoint.")


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the learning rate after `update` optimizer updates."""
    def f(update):
        if warmup and update < warmup:
            return (update + 1) / warmup
        if schedule == "cosine":
            prog = min(1.0, (update - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * prog))
        return 1.0
    return f


def make_optimizer(model, lr: float, o: OptimConfig, warmup: int, total: int, schedule: str):
    """(AdamW over the trainable parameters, its LambdaLR); warmup and total count optimizer updates."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(o.betas), eps=o.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, schedule))


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast around model forwards when asked (model.autocast: bf16), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
