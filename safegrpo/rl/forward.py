"""How prompts and completions go through a Hugging Face model, with the prompt computed once.

GRPO scores G completions of the same prompt. Both the rollout and the update run the prompt
(and its images, through the vision tower) once per prompt, keep its key/value cache, repeat
that cache G times, and run only the completions on top of it:

    prefill(prompts [B, Lp]) -> cache, last hidden [B, H]        vision features once per prompt
    cache.batch_repeat_interleave(G)                              [B*G, ...]
    completions [B*G, T] attend to the repeated cache             -> hidden [B*G, T, H]

This is exact (the same attention as the concatenated sequence) and differentiable: the update
backpropagates through the repeated cache into the prompt pass. It saves (G-1)/G of the prompt
compute in every phase. Exception: a model in training mode with Hugging Face's gradient
checkpointing on, which drops the cache; `full_sequence_hidden` then runs each prompt with its
completions as one sequence (exact, G copies of the prompt). The LM head is applied separately (fused log-probs, logprobs.py), so
prompt logits are never computed.

Positions: Qwen-VL models use 3D rotary positions (`model.model.get_rope_index`); text after the
prompt continues at max(prompt positions) + 1. Plain causal LMs use 1D positions that skip
left padding. Works for any model whose `model.model(...)` accepts `position_ids`, `cache`,
`attention_mask` and (for VL models) `pixel_values` / `image_grid_thw`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .logprobs import token_logprobs

VISION_KEYS = ("pixel_values", "image_grid_thw")


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose buffers [N, heads, prompt + reserve, head_dim] are allocated once, at
    the prefill, with room for `reserve` more tokens: each decode step writes its keys and values
    in place instead of concatenating the whole cache (O(T) instead of O(T^2) copying). Returns
    views of the filled part, as a DynamicLayer would return its tensors."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve, self.length = reserve, 0

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[-2]
        if not self.is_initialized or self.length + t > self._k.shape[-2]:
            old = (self._k[..., :self.length, :], self._v[..., :self.length, :]) if self.is_initialized else None
            n, h, _, d = key_states.shape
            size = self.length + t + self.reserve
            self._k = key_states.new_empty(n, h, size, d)
            self._v = value_states.new_empty(n, value_states.shape[1], size, value_states.shape[-1])
            if old is not None:
                self._k[..., :self.length, :], self._v[..., :self.length, :] = old
            self.device, self.is_initialized = key_states.device, True
        self._k[..., self.length:self.length + t, :] = key_states
        self._v[..., self.length:self.length + t, :] = value_states
        self.length += t
        self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]


def new_cache(model, reserve: int = 0) -> DynamicCache:
    """A DynamicCache for `model`; with reserve > 0 its layers pre-allocate room for that many
    tokens after the prefill (decoding). Autograd through in-place writes is not needed there."""
    cache = DynamicCache(config=model.config)
    if reserve > 0:
        cache.layers = [PreallocatedLayer(reserve) for _ in cache.layers]
    return cache


def is_vision_model(model) -> bool:
    return hasattr(model.config, "vision_config")


def lm_head_weight(model) -> torch.Tensor:
    """[V, H] weight of the output projection (tied or not)."""
    return model.get_output_embeddings().weight


def base_model(model):
    """The module under the LM head (Qwen2VLModel, LlamaModel, ...)."""
    return model.model


def prompt_positions(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of a left-padded prompt batch and the first position after each prompt.

    Returns (position_ids [3, B, Lp] for VL models or [B, Lp] otherwise, next_pos [B]).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if is_vision_model(model):
        mm = batch.get("mm_token_type_ids")
        if mm is None:
            mm = torch.zeros_like(ids, dtype=torch.int32)
        kw = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw") if batch.get(k) is not None}
        pos, _ = base_model(model).get_rope_index(input_ids=ids, mm_token_type_ids=mm, attention_mask=mask, **kw)
        next_pos = pos.amax(dim=(0, 2)) + 1                                   # [B]
        return pos, next_pos
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)                           # [B, Lp]
    return pos, pos[:, -1] + 1


def continuation_positions(model, next_pos: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """Positions of `length` tokens after the prompt: [3, N, length] (VL) or [N, length]."""
    pos = next_pos[:, None] + offset + torch.arange(length, device=next_pos.device)[None, :]
    return pos.unsqueeze(0).expand(3, -1, -1) if is_vision_model(model) else pos


def prefill(model, batch: dict, position_ids: torch.Tensor, reserve: int = 0):
    """Run prompts once; returns (hidden of the last prompt position [B, H], cache). `reserve`:
    tokens of decoding to pre-allocate in the cache (0: a plain DynamicCache, for autograd)."""
    cache = new_cache(model, reserve)
    kw = {k: batch[k] for k in VISION_KEYS if batch.get(k) is not None}
    out = base_model(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=position_ids, cache=cache, use_cache=True, **kw)
    return out.last_hidden_state[:, -1], cache


def step(model, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
    """Run new tokens ids [N, t] on top of `cache`; returns hidden [N, t, H] (cache grows)."""
    out = base_model(model)(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True)
    return out.last_hidden_state


def completion_hidden(model, batch: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """Hidden states that score each completion token: [B*G, T, H].

    batch: B left-padded prompts; completion_ids / completion_mask [B*G, T], rows grouped
    by prompt (rows g*G .. g*G+G-1 belong to prompt g). Entry t is the hidden state at the
    position before completion token t (the last prompt position for t = 0).
    """
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return full_sequence_hidden(model, batch, completion_ids, completion_mask, group_size)
    pos, next_pos = prompt_positions(model, batch)
    last, cache = prefill(model, batch, pos)                                  # [B, H]
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    prompt_mask = batch["attention_mask"].repeat_interleave(group_size, dim=0)
    T = completion_ids.shape[1]
    if T > 1:
        mask = torch.cat([prompt_mask, completion_mask[:, :-1].to(prompt_mask.dtype)], dim=1)
        cpos = continuation_positions(model, next_pos.repeat_interleave(group_size), T - 1)
        h = step(model, completion_ids[:, :-1], mask, cpos, cache)             # [B*G, T-1, H]
        return torch.cat([last.repeat_interleave(group_size, dim=0)[:, None], h], dim=1)
    return last.repeat_interleave(group_size, dim=0)[:, None]


def full_sequence_hidden(model, batch: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                         group_size: int) -> torch.Tensor:
    """`completion_hidden` without a cache: each prompt (and its images) repeated G times and run
    with its completions as one sequence. Hugging Face's gradient checkpointing drops the KV cache
    in training mode, which would leave the completions blind to the prompt, so the prompt-once
    path cannot be used there; this is the exact, slower equivalent. Returns [B*G, T, H]."""
    G, T, Lp = group_size, completion_ids.shape[1], batch["input_ids"].shape[1]
    rep = lambda x: x.repeat_interleave(G, dim=0)
    ids = torch.cat([rep(batch["input_ids"]), completion_ids], 1)                      # [B*G, Lp+T]
    mask = torch.cat([rep(batch["attention_mask"]), completion_mask.to(batch["attention_mask"].dtype)], 1)
    kw = {}
    if is_vision_model(model):
        mm = batch.get("mm_token_type_ids")
        mm = torch.zeros_like(batch["input_ids"], dtype=torch.int32) if mm is None else mm
        kw["mm_token_type_ids"] = torch.cat([rep(mm), torch.zeros_like(completion_ids, dtype=mm.dtype)], 1)
        if batch.get("image_grid_thw") is not None:                 # regroup each prompt's images G times
            grid, pix = batch["image_grid_thw"], batch["pixel_values"]
            per_prompt = (batch["input_ids"] == model.config.vision_start_token_id).sum(-1).tolist()
            patches = grid.prod(-1).tolist()
            grids, pixels, i, p = [], [], 0, 0
            for k in per_prompt:
                n = int(sum(patches[i:i + k]))
                grids += [grid[i:i + k]] * G
                pixels += [pix[p:p + n]] * G
                i, p = i + k, p + n
            kw["image_grid_thw"], kw["pixel_values"] = torch.cat(grids), torch.cat(pixels)
    else:                                                           # positions skip the left padding
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    h = base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False, **kw).last_hidden_state
    return h[:, Lp - 1:Lp - 1 + T]                                  # position t scores token t+1


def completion_logprobs(model, batch: dict, completion_ids: torch.Tensor, mask: torch.Tensor, group_size: int,
                        temperature: float = 1.0, entropy: bool = False, entropy_grad: bool = False):
    """log pi(o_t | q, o_<t) / T-tempered, for every completion token: [N, T] (and the entropy
    [N, T] when asked), through the prompt-once forward and the fused log-prob kernel."""
    h = completion_hidden(model, batch, completion_ids, mask, group_size)          # [N, T, H]
    return token_logprobs(h, lm_head_weight(model), completion_ids, temperature, return_entropy=entropy,
                          entropy_grad=entropy_grad)
