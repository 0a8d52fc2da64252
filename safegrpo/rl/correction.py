"""Rollout correction: the engine's log-probs against the trainer's (docs/METHOD.md, eqs. 13-15).

The rollout engine samples token o_t from pi_rollout (its own decode path, its precision, its
banned ids and top-p nucleus: rl/rollout.py returns log pi_rollout(o_t) for every sampled token);
the update computes pi_train with the training forward. Where they differ the update is
off-policy. With delta_t = log pi_train(o_t) - log pi_rollout(o_t):

  (13) mismatch   k3_t = exp(delta_t) - 1 - delta_t   (an estimate of KL(pi_rollout || pi_train)
                  from the rollout's own samples), |delta_t|, and the share of tokens whose ratio
                  exp(delta_t) leaves [0.5, 2]
  (14) truncated importance sampling (rollout_is): w = min(rho, C), with rho = exp(delta_t) per
                  token ("token") or exp(sum_t delta_t) per sequence ("sequence")
  (15) rejection (rollout_rs): w = 0 where rho (token; sequence: the product over the sequence;
                  geometric: exp(mean_t delta_t)) leaves [lower, upper]

The weights multiply each token's policy-gradient loss (not the KL or entropy terms) and carry
no gradient; a rejected token keeps its place in the mini-batch's token count. delta is clamped
to [-20, 20] before exponentiating. Names and defaults follow verl's rollout correction
(rollout_is, rollout_is_threshold = 2, rollout_rs, rollout_rs_threshold / _lower).
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
    """log rho at `level`, broadcast to [N, T]."""
    if level == "token":
        return delta
    total = delta.sum(-1, keepdim=True)                                          # [N, 1]
    if level == "sequence":
        return total.expand_as(delta)
    if level == "geometric":
        return (total / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(delta)
    raise ValueError(f"unknown rollout correction level {level!r}; use one of {LEVELS}")


@torch.no_grad()
def correction_weights(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                       is_level: str = "", is_threshold: float = 2.0, rs_level: str = "",
                       rs_lower: float = 0.5, rs_upper: float = 2.0) -> torch.Tensor:
    """Eqs. (14)-(15): per-token weights [N, T] (0 outside the mask). is_level / rs_level "" is off."""
    delta = ((logp_train - logp_rollout).float() * mask).clamp(-20.0, 20.0)      # [N, T]
    w = torch.ones_like(delta)
    if is_level:
        if is_level == "geometric":
            raise ValueError("rollout_is is token or sequence (geometric is a rejection level)")
        w = torch.exp(_log_ratio(delta, mask, is_level)).clamp(max=is_threshold)
    if rs_level:
        lr = _log_ratio(delta, mask, rs_level)
        w = w * ((lr >= math.log(rs_lower)) & (lr <= math.log(rs_upper))).float()
    return w * mask
