"""The decoder-layer pieces that the lean decoder (decode.py) and the prompt-once forward
(forward.py) both compute with, written once:

    text_model        the decoder stack (embeddings, layers, final norm, rotary) of a model
    rms_norm          Hugging Face's RMSNorm, exactly
    rotate_half       RoPE's half rotation
    effective_weight  the weight a linear layer applies: W, or with an active LoRA adapter
                      W + (alpha / r) B A (peft's layer attributes, read without importing peft)
"""
from __future__ import annotations

import torch


def text_model(model):
    """The decoder stack (embeddings, layers, final norm, rotary) of a VL or plain causal LM."""
    base = model.model
    return getattr(base, "language_model", base)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """Hugging Face's RMSNorm, exactly: normalise in fp32, cast back, then scale."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def effective_weight(module) -> torch.Tensor:
    """The weight a linear layer applies: W, or for an active LoRA layer (peft's lora_A, lora_B,
    active_adapters) W + (alpha / r) B A."""
    w = module.weight
    if getattr(module, "lora_A", None) is None or module.disable_adapters or module.merged:
        return w
    for name in module.active_adapters:
        if name in module.lora_A:
            w = w + module.get_delta_weight(name).to(w.dtype)
    return w
