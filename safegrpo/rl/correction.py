"""Rollout correction: the engine's log-probs against the trainer's (docs/METHOD.md, eqs. 13-15).

The rollout engine samples token o_t from pi_rollout (its own decode path, its precision, its
banned ids and top-p nucleus: rl/rollout.py returns log pi_rollout(o_t) for every sampled token);
the update computes pi_train with the training forward at the rollout's parameters (the
recomputed pi_old). Where they differ the update is off-policy. With
delta_t = log pi_train(o_t) - log pi_rollout(o_t) (0 outside the mask):

  (13) mismatch   k3_t = exp(delta_t) - 1 - delta_t   (an estimate of KL(pi_rollout || pi_train)
                  from the rollout's own samples), |delta_t|, and the share of tokens whose ratio
                  exp(delta_t) leaves [0.5, 2]
  (14) truncated importance sampling (rollout_is): w = min(rho, C), rho = exp(clamp(x, -20, 20))
                  with x = delta_t per token ("token") or x = sum_t delta_t per sequence ("sequence")
  (15) rejection (rollout_rs): the token leaves the update where rho (x = delta_t; sequence:
                  sum_t delta_t; geometric: mean_t delta_t; clamped to [-20, 20] likewise) is
                  outside [lower, upper]; lower defaults to 1 / upper

As in verl's rollout correction (names, defaults, the clamp of the aggregate, not of each token):
the weights of (14) multiply each token's policy-gradient loss only and carry no gradient; the
rejection of (15) replaces the response mask, so a rejected token leaves the policy-gradient
term, the KL and entropy terms and the token count of the aggregation (eq. 9) alike.
Shapes: N sequences, T tokens; mask [N, T] is 1 on completion tokens.
"""
from __future__ import annotations

import math

import torch

LEVELS = ("token", "sequence", "geometric")


@torch.no_grad()
def mismatch(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor) -> dict:
    """Eq. (13) as sums over these tokens, so that passes and ranks add up before dividing:
    {"tokens", "k3", "abs", "abs_max", "out"} (abs_max: the largest |delta|)."""
    d = (logp_train - logp_rollout).double() * mask                               # [N, T]
    k3 = torch.exp(d.clamp(-20.0, 20.0)) - 1.0 - d
    out = ((d < math.log(0.5)) | (d > math.log(2.0))) & (mask > 0)
    return {"tokens": float(mask.sum()), "k3": float((k3 * mask).sum()), "abs": float(d.abs().sum()),
            "abs_max": float(d.abs().max()) if d.numel() else 0.0, "out": float(out.sum())}


def _log_ratio(delta: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log rho at `level`, clamped to [-20, 20], broadcast to [N, T]. delta [N, T] is 0 off the mask."""
    if level == "token":
        x = delta
    elif level == "sequence":
        x = delta.sum(-1, keepdim=True).expand_as(delta)                          # [N, 1] -> [N, T]
    elif level == "geometric":
        x = (delta.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(delta)
    else:
        raise ValueError(f"unknown rollout correction level {level!r}; use one of {LEVELS}")
    return x.clamp(-20.0, 20.0)


@torch.no_grad()
def is_weights(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, level: str,
               threshold: float = 2.0) -> torch.Tensor:
    """Eq. (14): truncated importance weights [N, T] (0 outside the mask), no gradient."""
    if level not in ("token", "sequence"):
        raise ValueError(f"rollout_is is token or sequence, got {level!r} (geometric is a rejection level)")
    delta = (logp_train - logp_rollout).float() * mask                                # [N, T]
    return torch.exp(_log_ratio(delta, mask, level)).clamp(max=threshold) * mask


@torch.no_grad()
def rejection_mask(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, level: str,
                   upper: float = 2.0, lower: float | None = None) -> torch.Tensor:
    """Eq. (15): the response mask with rejected tokens set to 0 [N, T] (verl's modified
    response mask). lower None or 0: 1 / upper."""
    lower = lower or 1.0 / upper
    delta = (logp_train - logp_rollout).float() * mask
    x = _log_ratio(delta, mask, level)
    return mask * ((x >= math.log(lower)) & (x <= math.log(upper))).to(mask.dtype)
