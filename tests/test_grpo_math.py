"""GRPO math against hand-computed numbers and a float64 reference."""
import math

import pytest
import torch

from safegrpo.rl.grpo import (aggregate, clip_fraction, group_advantages, grpo_loss, kl_penalty, policy_loss,
                              sequence_policy_loss, sequence_ratio)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 0.75])
    a = group_advantages(r, 2)
    s = math.sqrt(0.5)  # Bessel std of {1, 0}
    assert torch.allclose(a, torch.tensor([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0, 0, -0.25 / (math.sqrt(0.125) + 1e-6),
                                           0.25 / (math.sqrt(0.125) + 1e-6)]), atol=1e-6)
    a3 = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert torch.allclose(a3, torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std + 1e-6), atol=1e-6)


def test_group_advantages_modes_and_errors():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.equal(group_advantages(r, 2, scale="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    b = group_advantages(r, 2, scale="batch")
    assert torch.allclose(b, torch.tensor([0.5, -0.5, 0, 0]) / (r.std() + 1e-6))
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="unknown"):
        group_advantages(r, 2, scale="x")


def test_group_advantages_float64_reference():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(64, generator=g)
    ref = []
    for grp in r.double().view(-1, 8):
        m = grp.mean()
        s = math.sqrt(sum((x - m) ** 2 for x in grp) / 7)
        ref += [(x - m) / (s + 1e-6) for x in grp]
    assert torch.allclose(group_advantages(r, 8).double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    d = torch.tensor([-0.5, 1.0])
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.exp(d) - d - 1)
    big = kl_penalty(torch.tensor([-50.0]), torch.tensor([0.0]), "k3")  # d clamped to 20, kl to 10
    assert big.item() == 10.0
    assert kl_penalty(ref, ref, "k3").abs().max() == 0


def test_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 5.0]]))  # ratios 1.5, 0.5, 1.1, 5.0
    mask = torch.ones(1, 4)
    pos = policy_loss(logp, old, torch.tensor([2.0]), mask)
    assert torch.allclose(pos, torch.tensor([[-2 * 1.2, -2 * 0.5, -2 * 1.1, -2 * 1.2]]))
    neg = policy_loss(logp, old, torch.tensor([-1.0]), mask)
    # max(-A r, -A clip(r)): 1.5, 0.8, 1.1, 5.0 -> dual clip caps at 3.0
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 1.1, 3.0]]))
    nodual = policy_loss(logp, old, torch.tensor([-1.0]), mask, dual_clip=None)
    assert torch.allclose(nodual, torch.tensor([[1.5, 0.8, 1.1, 5.0]]))
    asym = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    assert torch.allclose(asym, -torch.tensor([[1.28, 0.5, 1.1, 1.28]]))
    masked = policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert masked[0, 2:].abs().sum() == 0
    per_tok = policy_loss(logp, old, torch.tensor([[1.0, -1.0, 1.0, -1.0]]), mask)
    assert torch.allclose(per_tok, torch.tensor([[-1.2, 0.8, -1.1, 3.0]]))
    assert torch.isclose(clip_fraction(logp, old, torch.tensor([2.0]), mask), torch.tensor(0.5))


def _reference_loss(logp, old, adv, mask, cl, ch, c):
    """Float64 loop version of eqs. (2)-(3)."""
    out = torch.zeros_like(logp, dtype=torch.float64)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(max(-20, min(20, float(logp[i, t] - old[i, t]))))
            a = float(adv[i])
            v = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if a < 0:
                v = min(v, -a * c)
            out[i, t] = v * float(mask[i, t])
    return out


def test_policy_loss_float64_reference():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(6, 9, generator=g) * 3
    old = logp + torch.randn(6, 9, generator=g) * 0.5
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 9, generator=g) > 0.2).float()
    ours = policy_loss(logp.double(), old.double(), adv.double(), mask.double(), 0.2, 0.28, 3.0)
    assert torch.allclose(ours, _reference_loss(logp, old, adv, mask, 0.2, 0.28, 3.0), atol=1e-10)


def test_aggregate_modes_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(x, m) == pytest.approx(10 / 4)
    assert aggregate(x, m, "seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    assert aggregate(x, m, "seq-mean-token-sum-norm") == pytest.approx((6 / 3 + 4 / 3) / 2)
    assert aggregate(x, m, "seq-mean-token-sum-norm", norm_constant=10) == pytest.approx((0.6 + 0.4) / 2)
    with pytest.raises(ValueError):
        aggregate(x, m, "sum")


def test_token_mean_is_invariant_to_micro_batch_split():
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    feats = torch.randn(8, 12, 5)
    mask = (torch.rand(8, 12) > 0.3).float()
    adv = torch.randn(8)
    old = torch.randn(8, 12) * 0.1 - 1

    def per_token(f):
        return torch.nn.functional.logsigmoid(f @ w)

    full = aggregate(policy_loss(per_token(feats), old, adv, mask), mask)
    g_full, = torch.autograd.grad(full, w)
    n_tok = mask.sum()
    for split in ([8], [4, 4], [1, 3, 4], [2, 2, 2, 2]):
        w.grad = None
        s = 0
        for n in split:
            sl = slice(s, s + n)
            aggregate(policy_loss(per_token(feats[sl]), old[sl], adv[sl], mask[sl]), mask[sl],
                      total=n_tok).backward()
            s += n
        assert torch.allclose(w.grad, g_full, atol=1e-6), split
    # the naive per-micro-batch mean is not invariant (why norm_constant exists)
    w.grad = None
    for sl in (slice(0, 1), slice(1, 8)):
        (aggregate(policy_loss(per_token(feats[sl]), old[sl], adv[sl], mask[sl]), mask[sl]) / 2).backward()
    assert not torch.allclose(w.grad, g_full, atol=1e-4)


def test_kl_gradients_by_hand():
    """d KL / d logp of each estimator against its closed form, inside and outside k3's clamps:
    k1: 1; k2: logp - ref; k3: 1 - exp(ref - logp) while |ref - logp| <= 20 and kl <= 10, else 0."""
    logp = torch.tensor([-1.0, -2.0, -0.3, -30.0, -1.0, -4.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.3, -1.0, -25.0, -1.0], dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        g, = torch.autograd.grad(kl_penalty(logp, ref, kind).sum(), logp)
        d = (ref - logp).detach()
        if kind == "k1":
            want = torch.ones_like(d)
        elif kind == "k2":
            want = -d
        else:
            kl = torch.exp(d) - d - 1
            live = (d.abs() <= 20) & (kl <= 10)                  # the clamps cut the gradient outside
            want = torch.where(live, 1 - torch.exp(d), torch.zeros_like(d))
        assert torch.allclose(g, want, atol=1e-12), (kind, g, want)
    assert g[2] == 0 and g[3] == 0 and g[4] == 0                 # equal: 0; beyond the clamps: 0


def test_gspo_sequence_ratio_and_loss_by_hand():
    """Eq. (12): s = exp(mean log-ratio over the sequence's tokens); the clipped surrogate of s
    is every token's loss."""
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.3, -0.1, 0.4], [0.02, 0.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])               # row 1: the 5.0 is padding
    s = sequence_ratio(logp, old, mask)
    assert torch.allclose(s, torch.tensor([math.exp(0.2), math.exp(0.01)]))
    adv = torch.tensor([1.0, -2.0])
    loss = sequence_policy_loss(logp, old, adv, mask, clip_low=0.05, clip_high=0.1)
    # row 0: s = 1.2214 > 1.1, A > 0 -> clipped: -1 x 1.1; row 1: s = 1.01 inside -> -(-2) x 1.01
    assert torch.allclose(loss, torch.tensor([[-1.1] * 3, [2 * math.exp(0.01)] * 2 + [0.0]]), atol=1e-6)
    # the gradient of row 1 reaches each of its tokens as -A s / |o| (row 0 is clipped: none)
    lp = logp.clone().requires_grad_()
    aggregate(sequence_policy_loss(lp, old, adv, mask, 0.05, 0.1), mask, "seq-mean-token-mean").backward()
    want = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]) * (2 * math.exp(0.01) / 2) / 2   # / 2 sequences
    assert torch.allclose(lp.grad, want, atol=1e-6)


def test_gspo_against_a_float64_loop():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(5, 7, generator=g, dtype=torch.float64)
    old = logp + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.01
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=g) > 0.3).double()
    mask[:, 0] = 1
    cl, ch = 3e-4, 4e-4
    ours = sequence_policy_loss(logp, old, adv, mask, cl, ch)
    for i in range(5):
        n = float(mask[i].sum())
        s = math.exp(sum(float(logp[i, t] - old[i, t]) for t in range(7) if mask[i, t]) / n)
        a = float(adv[i])
        v = max(-a * s, -a * min(max(s, 1 - cl), 1 + ch))
        for t in range(7):
            assert abs(float(ours[i, t]) - v * float(mask[i, t])) < 1e-12
    loss, m = grpo_loss(logp, old, adv, mask, clip_low=cl, clip_high=ch, importance_level="sequence",
                        loss_agg="seq-mean-token-mean")
    assert torch.isclose(loss, aggregate(ours, mask, "seq-mean-token-mean"))
    with pytest.raises(ValueError, match="importance_level"):
        grpo_loss(logp, old, adv, mask, importance_level="word")
