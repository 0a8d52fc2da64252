"""The sampler draws exactly from the softmax: chi-square on a small vocabulary, every rare token
of a large vocabulary reachable with its own probability, a counter-based hash equal to
SplitMix64 on Python integers, and draws that depend only on (seed, sample, step)."""
import math
import random

import pytest
import torch

from safegrpo.rl.sampling import _mix, block_size, row_keys, sample, top_p_filter, uniforms

MASK = (1 << 64) - 1


def splitmix_output(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_hash_equals_splitmix64_on_python_integers():
    vals = [0, 1, 2, 12345, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 0x9E3779B97F4A7C15]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in vals]
    got = [x & MASK for x in _mix(torch.tensor(signed, dtype=torch.int64)).tolist()]
    assert got == [splitmix_output(v) for v in vals]


def test_uniforms_are_uniform_and_depend_only_on_seed_sample_and_step():
    keys = row_keys([11, 22, 33], group_size=4)
    u = torch.stack([uniforms(keys, t) for t in range(2000)])                 # [T, 12]
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert len(set(u.flatten().tolist())) == u.numel()                         # no repeats
    # prompt 22's rows are the same whatever else is in the batch, and in whichever position
    alone = torch.stack([uniforms(row_keys([22], 4), t) for t in range(2000)])
    assert torch.equal(alone, u[:, 4:8])
    swapped = torch.stack([uniforms(row_keys([33, 22], 4), t) for t in range(5)])
    assert torch.equal(swapped[:, 4:], u[:5, 4:8])
    per_row_steps = uniforms(keys, torch.tensor([7] * 12))                     # a tensor of steps works too
    assert torch.equal(per_row_steps, u[7])


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs.double() * n
    return float(((counts.double() - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chi_square_against_the_softmax(temperature):
    """200,000 draws from softmax(logits / T) over 50 tokens (one of them banned)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 2
    logits[17] = float("-inf")
    probs = torch.softmax(logits / temperature, -1)
    n = 200_000
    keys = row_keys(range(n), group_size=1)
    tok = sample(probs.expand(n, -1).contiguous(), uniforms(keys, 0))
    counts = torch.bincount(tok, minlength=50)
    assert counts[17] == 0
    keep = probs > 0
    chi2 = _chi_square(counts[keep], probs[keep])
    # 48 degrees of freedom: mean 48, sd ~9.8; 90 is beyond the 99.99th percentile
    assert chi2 < 90, chi2


def test_rare_tokens_of_a_large_vocabulary_are_drawn_at_their_rate():
    """V = 151,936: token 0 holds 99.6% of the mass, the other 151,935 share 0.4% (p ~ 2.6e-8
    each, below half of float32's resolution near a cumulative mass of 1). A float32 inverse
    CDF cannot draw most of them; this sampler draws them at 0.4% in total, evenly over the vocabulary."""
    V, n, rows, r = 151_936, 200_000, 1_000, 0.004
    probs = torch.full((V,), r / (V - 1))
    probs[0] = 1 - r
    keys = row_keys(range(n // rows), group_size=rows)
    tok = torch.cat([sample(probs.expand(rows, -1), uniforms(keys[k:k + rows], 0)) for k in range(0, n, rows)])
    rare = tok[tok > 0]
    assert abs(rare.numel() / n - r) < 5 * math.sqrt(r * (1 - r) / n)         # 0.4% +- 5 sigma
    bins = torch.bincount((rare - 1) * 10 // (V - 1), minlength=10).double()   # 10 equal index ranges
    chi2 = float(((bins - bins.mean()) ** 2 / bins.mean()).sum())
    assert chi2 < 35, bins.tolist()                                            # 9 dof: 35 is p < 1e-4

    # the float32 inverse CDF this replaces can reach a token only where its float32 cumulative
    # sum steps up: under half of them here
    cdf = probs.cumsum(-1)
    assert (cdf[1:] > cdf[:-1]).float().mean() < 0.5


def test_blocks_and_edges():
    assert block_size(1161) == 64 and block_size(151_936) == 512 and block_size(50) == 8
    probs = torch.zeros(3, 70)
    probs[0, 69] = 1.0                                         # the last (ragged-block) token
    probs[1, 0] = 1.0
    probs[2, [5, 64]] = 1.0
    u = torch.tensor([1 - 2 ** -53, 1 - 2 ** -53, 0.75], dtype=torch.float64)
    assert sample(probs, u).tolist() == [69, 0, 64]
    assert sample(probs, torch.zeros(3, dtype=torch.float64)).tolist() == [69, 0, 5]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_random_python_reference_of_the_inverse_cdf():
    """Against a float64 Python loop over the cumulative sum (the textbook definition)."""
    rng = random.Random(1)
    for _ in range(200):
        V = rng.randrange(2, 300)
        p = [rng.random() ** 3 if rng.random() < 0.8 else 0.0 for _ in range(V)]
        if not any(p):
            p[rng.randrange(V)] = 1.0
        u = rng.random()
        target, acc, want = u * math.fsum(p), 0.0, None
        for v, x in enumerate(p):
            acc += x
            if acc > target:
                want = v
                break
        got = sample(torch.tensor([p], dtype=torch.float64), torch.tensor([u], dtype=torch.float64)).item()
        assert p[got] > 0
        if want is not None and abs(acc - target) > 1e-12:      # not within rounding of a boundary
            assert got == want
