"""Exact, batch-independent sampling of one token per row.

    u[n, t] = SplitMix64(key[n])_t  as a 53-bit uniform in [0, 1)     (counter-based, no state)
    token   = the first v with  sum_{w <= v} p[n, w]  >  u * sum_w p[n, w]   (inverse CDF)

Uniforms: each row n (sample g of prompt b) has a 64-bit key derived from its prompt's seed and
g; the t-th decode step's uniform is the t-th output of SplitMix64 started at that key. A row's
draws are a pure function of (prompt seed, g, t), so they do not depend on which other rows share
the batch, on how prompts were split over calls or ranks, or on when a prompt was admitted, and
no generator object is carried between steps.

Inverse CDF without a float32 running sum: a single float32 cumulative sum over a 151,936-entry
vocabulary has a resolution of ~6e-8 near its top, so a token with p below ~3e-8 adds nothing
to it and can never be drawn, and others are drawn at a rounded rate. Here the vocabulary is
cut into blocks of ~sqrt(V) entries: each block's mass is a float32 sum (pairwise, so relative
error ~1e-7, the rounding the float32 probabilities carry anyway), the block is picked on the
float64 cumulative sum of the block masses, then the token inside it on the float64 cumulative
sum of its few entries. Every token with p > 0 is drawn at its probability to float32 rounding,
a token with p = 0 never is, nothing of size [N, V] is copied, and the float64 work per row is
~2 sqrt(V).

Integer arithmetic: torch has no unsigned 64-bit shifts, so the hash works on int64 with
wrap-around multiplication and masked (logical) right shifts; tests check it against Python's
big integers.
"""
from __future__ import annotations

import math

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)           # SplitMix64 constants as signed int64
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function (bijective on 64 bits)."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _signed64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def row_keys(seeds, group_size: int, device=None) -> torch.Tensor:
    """[B * G] int64 keys: row b*G + g is sample g of the prompt seeded seeds[b]."""
    s = torch.tensor([_signed64(x) for x in seeds], dtype=torch.int64, device=device)      # [B]
    g = torch.arange(group_size, dtype=torch.int64, device=device)                          # [G]
    return _mix(_mix(s)[:, None] + _mix(g + 1)[None, :] * _GOLDEN).reshape(-1)            # [B*G]


def uniforms(keys: torch.Tensor, step) -> torch.Tensor:
    """[N] float64 uniforms in [0, 1) for decode step `step` (an int or a [N] tensor of steps)."""
    z = _mix(keys + (torch.as_tensor(step, device=keys.device) + 1) * _GOLDEN)
    return _srl(z, 11).double() * 2.0 ** -53


def block_size(vocab: int) -> int:
    """Entries per block: the power of two nearest above sqrt(V) (64 for 1,161; 512 for 151,936)."""
    return 1 << max(3, math.ceil(math.log2(math.sqrt(vocab))))


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [N, V] (non-negative, rows need not sum to 1, each row with
    some mass) given uniforms u [N] in [0, 1): the inverse CDF, on float64 cumulative sums."""
    N, V = probs.shape
    k = block_size(V)
    nf = V // k                                                                   # full blocks
    mass = probs[:, :nf * k].view(N, nf, k).sum(-1)                               # [N, nf] pairwise fp32 sums
    if nf * k < V:                                                                # the ragged last block
        mass = torch.cat([mass, probs[:, nf * k:].sum(-1, keepdim=True)], 1)
    mass = mass.double()                                                          # [N, nb]
    cdf = mass.cumsum(-1)
    total = cdf[:, -1:]
    # target in [0, total): the first block whose cdf exceeds it has mass > 0
    target = torch.minimum(u[:, None].to(torch.float64) * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=mass.shape[1] - 1)  # [N, 1] the block
    cols = j * k + torch.arange(k, device=probs.device)                           # [N, k] its entries
    inner = probs.gather(1, cols.clamp(max=V - 1)).double().masked_fill_(cols >= V, 0.0).cumsum(-1)
    rest = target - (cdf.gather(1, j) - mass.gather(1, j))                        # mass into the block
    last = inner[:, -1:]
    rest = rest.clamp(min=0.0).minimum(torch.nextafter(last, torch.zeros_like(last)))
    i = torch.searchsorted(inner, rest, right=True).clamp_(max=k - 1)            # [N, 1] inside it
    return (j * k + i).squeeze(1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (logits [N, V])."""
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs > top_p          # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
