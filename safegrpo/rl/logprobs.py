"""Fused, chunked per-token log-probabilities and entropies from last hidden states.

    logp[n] = log_softmax(hidden[n] @ W.T / T)[targets[n]]             docs/METHOD.md eq. (11), in fp32

For a Qwen vocabulary (V = 151,936) the [batch, length, V] logits tensor is the largest thing in
a GRPO step. `token_logprobs` never builds it: the forward pass walks the rows in chunks and
keeps only each row's log-sum-exp; the backward pass recomputes each chunk's logits and turns
them into gradients in place, in the same buffer,
    d logp[n] / d logits[n] = (onehot(target) - softmax) / T,
so peak memory is one chunk x V, whatever batch x length. Entropy is returned alongside, for
logging, or with its gradient -p (log p + H) for an entropy bonus.

Assumes hidden [..., H], lm_head weight [V, H] (no bias), targets [...] of token ids. Alignment
(hidden at position t scores token t+1) is the caller's; `shift_for_next_token` does it.
"""
from __future__ import annotations

import torch


def _default_chunk(vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 128 MB of fp32 logits on CPU, 1 GB on a GPU, where larger matmuls
    and fewer launches pay (H200, V 151,936, 32,768 tokens: 1.64x the naive time at 128 MB
    chunks, 1.35x at 1 GB; bench/gpu_logprobs.py)."""
    return max(16, (2 ** 28 if device.type == "cuda" else 2 ** 25) // vocab)


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cuda", enabled=False)   # fp32 log-probs even inside a bf16 autocast region
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, want_entropy):
        # hidden [N, H], weight [V, H], targets [N]; fp32 math (fp64 when given fp64, for gradcheck)
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w32 = weight.to(dt)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=dt, device=hidden.device)
        entropy = torch.zeros_like(logp)
        lse = torch.empty_like(logp)
        for s in range(0, n, chunk_size):
            logits = hidden[s:s + chunk_size].to(dt) @ w32.T                 # [C, V]
            if temperature != 1.0:
                logits.div_(temperature)
            top = logits.amax(-1, keepdim=True)                              # [C, 1]
            logits.sub_(top)                                                 # z = logits - max, in place
            target = logits.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)
            if want_entropy:      # one exp for both: with e = exp(z), S = sum e, H = log S - sum(e z) / S
                e = logits.exp()
                total = e.sum(-1)
                entropy[s:s + chunk_size] = total.log() - (e * logits).sum(-1) / total
            else:
                total = logits.exp_().sum(-1)
            log_total = total.log()
            lse[s:s + chunk_size] = top.squeeze(-1) + log_total              # log-sum-exp of the logits
            logp[s:s + chunk_size] = target - log_total
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp, entropy

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        with_entropy = grad_entropy is not None and bool(grad_entropy.any())
        T, C = ctx.temperature, ctx.chunk_size
        dt = lse.dtype
        w32 = weight.to(dt)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None
        for s in range(0, hidden.shape[0], C):
            h = hidden[s:s + C].to(dt)                                       # [C, H]
            buf = h @ w32.T                                                  # logits [C, V]
            if T != 1.0:
                buf.div_(T)
            g = grad_logp[s:s + C].to(dt)                                    # [C]
            buf.sub_(lse[s:s + C, None])                                     # log-probs
            if with_entropy:  # d H / d logits = -p (log p + H), needs log p and p at once
                probs = torch.exp(buf)
                ge = grad_entropy[s:s + C].to(dt)
                dlogits = probs * -g[:, None] - probs * (buf + entropy[s:s + C, None]) * ge[:, None]
            else:             # d logp / d logits = onehot - softmax, chained with g: in place
                dlogits = buf.exp_().mul_(-g[:, None])
            dlogits.scatter_add_(-1, targets[s:s + C, None], g[:, None])
            if T != 1.0:
                dlogits.div_(T)
            if grad_hidden is not None:
                grad_hidden[s:s + C] = (dlogits @ w32).to(hidden.dtype)
            if ctx.needs_input_grad[1]:   # the first chunk initialises the sum (no memset of [V, H])
                grad_w = dlogits.T @ h if grad_w is None else grad_w.addmm_(dlogits.T, h)
        return grad_hidden, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, chunk_size: int | None = None, return_entropy: bool = False,
                   entropy_grad: bool = False):
    """log p(targets | hidden) under softmax(hidden @ W.T / temperature), in fp32.

    hidden [..., H], lm_head_weight [V, H], targets [...] -> logp [...] (and entropy [...] when
    return_entropy; differentiable only with entropy_grad, for an entropy bonus). Gradients flow
    to hidden and weight; memory is one chunk x V.
    """
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not line up")
    chunk = chunk_size or _default_chunk(lm_head_weight.shape[0], hidden.device)
    logp, ent = _FusedLogProbs.apply(h, lm_head_weight, t, float(temperature), int(chunk),
                                     bool(return_entropy or entropy_grad))
    logp, ent = logp.view(lead), ent.view(lead)
    if not entropy_grad:
        ent = ent.detach()
    return (logp, ent) if return_entropy else logp


def shift_for_next_token(hidden: torch.Tensor, input_ids: torch.Tensor):
    """Align a full sequence: hidden [B, L, H] at positions 0..L-2 score ids [B, L] at 1..L-1."""
    return hidden[:, :-1], input_ids[:, 1:]
