"""The GRPO math as small pure tensor functions (no state, no model), numbered as in
docs/METHOD.md. For prompt q with G sampled outputs o_1..o_G and rewards r_1..r_G:

  (4) advantage       A_i = (r_i - mean(r)) / (std(r) + eps)          std with Bessel's correction
  (5) ratio           rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
  (6) clipped loss    L_{i,t} = max(-A_i rho, -A_i clip(rho, 1 - eps_low, 1 + eps_high))
      dual clip       for A_i < 0: L_{i,t} = min(L_{i,t}, -A_i c)          (Ye et al., 2020)
  (7) KL estimators   k1 = log(pi/pi_ref), k2 = 0.5 log(pi/pi_ref)^2,
                      k3 = pi_ref/pi - log(pi_ref/pi) - 1                  (Schulman, 2020)
  (8) per token       l_{i,t} = L_{i,t} + beta KL_{i,t} - c_H H_{i,t}      (c_H: entropy bonus, 0 in the paper)
  (9) aggregation     J = token-mean | seq-mean-token-mean | seq-mean-token-sum-norm of l over the
                      mini-batch (DAPO / Dr. GRPO)
 (12) GSPO            s_i = exp( mean_t log(pi_theta / pi_old)(o_{i,t}) ), the sequence's ratio;
                      L_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) for every token
                      of sequence i                                         (Zheng et al., 2025)

`grpo_loss` is (8) + (9) in one call, returning the loss and its metrics the way
nano-aha-moment's `compute_pg_loss` and verl's policy-loss functions do.

Shapes: N = B*G sequences, T = completion length; `mask` [N, T] is 1 on completion tokens
(first EOS included) and 0 after.
"""
from __future__ import annotations

import torch

ADV_SCALES = ("group", "batch", "none")
KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6,
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (4). rewards [N] (groups are consecutive blocks of group_size) -> advantages [N].

    scale="group": divide by each group's std (the paper); "batch": by the std of the whole
    batch's rewards (`batch_std`, e.g. over all ranks; default: the std of these N); "none": no
    division (Dr. GRPO).

    >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 2)
    tensor([ 0.7071, -0.7071, -0.7071,  0.7071])
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 for group-relative advantages, got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)                       # [B, G]
    centered = r - r.mean(dim=-1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=-1, keepdim=True, unbiased=True) + eps)
    elif scale == "batch":
        std = rewards.std(unbiased=True) if batch_std is None else batch_std.to(rewards)
        centered = centered / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}; use one of {ADV_SCALES}")
    return centered.reshape(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Eq. (7), elementwise per token. k3 (the paper's "low_var_kl") is clamped as in verl:
    d = clamp(ref - logp, -20, 20), kl = clamp(exp(d) - d - 1, -10, 10)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        d = torch.clamp(ref_logp - logp, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_KINDS}")


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1).expand_as(like) if advantages.ndim == like.ndim - 1 else advantages


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = 3.0) -> torch.Tensor:
    """Eqs. (5)-(6): per-token clipped surrogate loss [N, T], zero where mask is 0.

    advantages: per sequence [N] or per token [N, T]. ratio = exp(clamp(logp - old_logp, -20, 20)).
    dual_clip c > 1 bounds the loss of negative-advantage tokens by -A c (None disables it).
    """
    adv = _per_token(advantages, logp)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss * mask


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (12): s_i = exp(masked mean over tokens of logp - old_logp), per sequence [N]."""
    log_ratio = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return torch.exp(torch.clamp(log_ratio, -20.0, 20.0))


def sequence_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         clip_low: float = 3e-4, clip_high: float = 4e-4) -> torch.Tensor:
    """Eq. (12), GSPO: the clipped surrogate on the sequence ratio s_i, its loss given to every
    token of sequence i: per-token losses [N, T], zero where mask is 0. advantages [N]. With
    seq-mean-token-mean aggregation this is GSPO's objective (each sequence weighs the same).
    The gradient of s_i reaches every token's log-prob through the mean, scaled by 1/|o_i|."""
    s = sequence_ratio(logp, old_logp, mask)                                   # [N]
    loss = torch.maximum(-advantages * s, -advantages * torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high))
    return loss[:, None] * mask


@torch.no_grad()
def sequence_clip_fraction(logp, old_logp, advantages, mask, clip_low: float = 3e-4,
                           clip_high: float = 4e-4) -> torch.Tensor:
    """Share of sequences whose GSPO surrogate is clipped."""
    s = sequence_ratio(logp, old_logp, mask)
    clipped = ((s > 1 + clip_high) & (advantages > 0)) | ((s < 1 - clip_low) & (advantages < 0))
    return clipped.float().mean() if clipped.numel() else clipped.float().sum()


@torch.no_grad()
def clip_fraction(logp, old_logp, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.2) -> torch.Tensor:
    """Share of completion tokens whose surrogate is clipped (the gradient through rho is cut)."""
    adv = _per_token(advantages, logp)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    return (clipped.float() * mask).sum() / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_constant: float | None = None, total=None) -> torch.Tensor:
    """Eq. (9): reduce per-token losses [N, T] to a scalar.

    token-mean: sum over all completion tokens / their count.
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum-norm (Dr. GRPO): each sequence's token sum / norm_constant (a fixed
        constant, default T, e.g. the maximum response length), averaged over sequences.
    total: when these rows are one micro-batch of a larger mini-batch, the mini-batch's token
        count (token-mean) or sequence count (the seq-mean modes): the micro-batch losses then
        add up to the mini-batch's loss exactly, whatever the split. Default: these rows' own.
    """
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / (mask.sum().clamp(min=1) if total is None else total)
    n_seq = per_token.shape[0] if total is None else total
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (per_token.shape[-1] if norm_constant is None else norm_constant) / n_seq
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {AGG_MODES}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
              clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = 3.0,
              beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
              loss_agg: str = "token-mean", norm_constant: float | None = None, total=None,
              importance_level: str = "token", weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Eqs. (5)-(9): the GRPO loss of one (micro-)batch and what to log about it.

    logp [N, T] (with grad), old_logp, ref_logp [N, T] (no grad; ref_logp None: no KL term),
    advantages [N] or [N, T], mask [N, T], entropy [N, T] (with grad when entropy_coef > 0).
    importance_level "sequence": GSPO's sequence ratio, eq. (12), in place of (5)-(6), with
    clip_low / clip_high as its (much smaller) clip range and no dual clip.
    weights [N, T] (no grad): rollout-correction weights on the policy-gradient term (rl/correction.py).
    Returns (loss, metrics); metrics are sums over this batch's completion tokens, so that
    micro-batches and ranks add up before dividing: {"tokens", "clipped", "kl", "entropy"}.

    >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> loss, m = grpo_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 2))
    >>> round(loss.item(), 4), m["clipped"]                # -A * rho at rho = 1, nothing clipped
    (-1.0, 0.0)
    """
    if importance_level == "sequence":                                                        # (12)
        per_tok = sequence_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high)
        clipped = sequence_clip_fraction(logp.detach(), old_logp, advantages, mask, clip_low, clip_high)
    elif importance_level == "token":                                                         # (6)
        per_tok = policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip)
        clipped = clip_fraction(logp.detach(), old_logp, advantages, mask, clip_low, clip_high)
    else:
        raise ValueError(f"unknown importance_level {importance_level!r}; use token or sequence")
    if weights is not None:                                                                   # (14)-(15)
        per_tok = per_tok * weights
    metrics = {"tokens": mask.sum().item(), "clipped": clipped.item() * mask.sum().item()}
    if ref_logp is not None:                                                                  # (7)
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_tok = per_tok + beta * kl * mask
        metrics["kl"] = (kl.detach() * mask).sum().item()
    if entropy is not None:
        if entropy_coef > 0:                                                                  # (8)
            per_tok = per_tok - entropy_coef * entropy * mask
        metrics["entropy"] = (entropy.detach() * mask).sum().item()
    return aggregate(per_tok, mask, loss_agg, norm_constant, total), metrics                # (9)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
