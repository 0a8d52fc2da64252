"""Fused log-probs against the naive full-logits computation."""
import pytest
import torch

from safegrpo.rl.logprobs import shift_for_next_token, token_logprobs


def naive(hidden, w, targets, temperature):
    dt = torch.promote_types(hidden.dtype, torch.float32)           # fp32, or fp64 when given fp64
    logits = hidden.to(dt) @ w.to(dt).T / temperature
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, targets[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


def test_values_and_gradients_match_naive():
    torch.manual_seed(0)
    for temperature, chunk in ((1.0, 7), (0.7, 3), (1.3, 1000)):
        h = torch.randn(3, 11, 16, requires_grad=True)
        w = torch.randn(50, 16, requires_grad=True)
        t = torch.randint(0, 50, (3, 11))
        lp, ent = token_logprobs(h, w, t, temperature=temperature, chunk_size=chunk, return_entropy=True)
        g = torch.randn(3, 11)
        gh, gw = torch.autograd.grad((lp * g).sum(), (h, w))
        ref, ref_ent = naive(h, w, t, temperature)
        rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
        assert lp.shape == (3, 11) and not ent.requires_grad
        assert torch.allclose(lp, ref, atol=1e-5)
        assert torch.allclose(ent, ref_ent, atol=1e-5)
        assert torch.allclose(gh, rh, atol=1e-5)
        assert torch.allclose(gw, rw, atol=1e-5)


@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, False), (1.3, True)])
def test_gradcheck_float64(temperature, entropy):
    """The analytic backward (log-probs and, for an entropy bonus, entropy) against finite
    differences, in float64 (the kernel computes in float64 when given float64)."""
    torch.manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (5,))

    def f(h, w):
        lp, ent = token_logprobs(h, w, t, temperature=temperature, chunk_size=2, return_entropy=True,
                                 entropy_grad=entropy)
        return (lp, ent) if entropy else lp

    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-7, rtol=1e-5)
    lp = token_logprobs(h, w, t, temperature=temperature, chunk_size=2)
    ref, _ = naive(h, w, t, temperature)
    assert lp.dtype == torch.float64 and torch.allclose(lp, ref, atol=1e-12)


def test_next_token_alignment_against_full_sequence():
    """Logits at position t score token t+1: compare with a loop over a full sequence."""
    torch.manual_seed(2)
    V, H = 30, 8
    emb = torch.nn.Embedding(V, H)
    w = torch.randn(V, H)
    ids = torch.randint(0, V, (2, 6))
    hidden = torch.cumsum(emb(ids), dim=1)  # a causal "model": position t sees tokens <= t
    h, targets = shift_for_next_token(hidden, ids)
    lp = token_logprobs(h, w, targets)
    for b in range(2):
        for t in range(5):
            logits = hidden[b, t] @ w.T
            expected = torch.log_softmax(logits, -1)[ids[b, t + 1]]
            assert torch.allclose(lp[b, t], expected, atol=1e-5)


def test_entropy_gradient_matches_naive():
    torch.manual_seed(3)
    h = torch.randn(4, 6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.randint(0, 20, (4, 6))
    lp, ent = token_logprobs(h, w, t, temperature=0.8, chunk_size=5, return_entropy=True, entropy_grad=True)
    g1, g2 = torch.randn(4, 6), torch.randn(4, 6)
    gh, gw = torch.autograd.grad((lp * g1 + ent * g2).sum(), (h, w))
    ref, ref_ent = naive(h, w, t, 0.8)
    rh, rw = torch.autograd.grad((ref * g1 + ref_ent * g2).sum(), (h, w))
    assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)
