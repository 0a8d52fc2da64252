"""How prompts and completions go through a Hugging Face model, with the prompt computed once.

GRPO scores G completions of the same prompt. Both the rollout and the update run the prompt
(and its images, through the vision tower) once per prompt, keep its key/value cache, repeat
that cache G times, and run only the completions on top of it:

    prefill(prompts [B, Lp]) -> cache, last hidden [B, H]        vision features once per prompt
    cache.batch_repeat_interleave(G)                              [B*G, ...]
    completions [B*G, T] attend to the repeated cache             -> hidden [B*G, T, H]

This is exact (the same attention as the concatenated sequence) and differentiable: the update
backpropagates through the repeated cache into the prompt pass. It saves (G-1)/G of the prompt
compute in every phase. For the models the lean decoder covers, `lean_completion_hidden` runs the
completions through the layers' own weights (bit-identical to the Hugging Face step in the
tests), which also works under gradient checkpointing: the prompt's pass is checkpointed layer
by layer (its keys and values go to a `ReplayableLayer` cache) and each completion layer with
the prompt's keys and values as inputs, so the prompt is still computed once and every layer
keeps only its input. Other models under
Hugging Face's checkpointing (which drops the cache) take `full_sequence_hidden`: each prompt with
its completions as one sequence (exact, G copies of the prompt); so do models sharded by FSDP2
outside a gathered context. The LM head is applied separately (fused log-probs, logprobs.py),
so prompt logits are never computed.

Positions: Qwen-VL models use 3D rotary positions (`model.model.get_rope_index`); text after the
prompt continues at max(prompt positions) + 1. Plain causal LMs use 1D positions that skip
left padding. Works for any model whose `model.model(...)` accepts `position_ids`, `cache`,
`attention_mask` and (for VL models) `pixel_values` / `image_grid_thw`.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .decode import lean_supported
from .layers import rms_norm, rotate_half, text_model
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


class ReplayableLayer(DynamicLayer):
    """A prefill's cache layer whose decoder layer is checkpointed: the layer writes it in the
    forward and again when the backward replays the layer, and each write replaces the keys and
    values (a prefill writes once), so the replay computes what the forward did."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.device, self.is_initialized = key_states.device, True
        self.keys, self.values = key_states, value_states
        return key_states, value_states


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


def _with_cache(module, cache) -> dict:
    """The cache keyword of `module`'s forward: transformers 5.2x renamed past_key_values to
    cache (a forward given the other name ignores it: the cache would stay empty)."""
    params = inspect.signature(module.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


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


def prefill(model, batch: dict, position_ids: torch.Tensor, reserve: int = 0, cache=None):
    """Run prompts once; returns (hidden of the last prompt position [B, H], cache). `reserve`:
    tokens of decoding to pre-allocate in the cache (0: a plain DynamicCache, for autograd)."""
    cache = new_cache(model, reserve) if cache is None else cache
    kw = {k: batch[k] for k in VISION_KEYS if batch.get(k) is not None}
    base = base_model(model)
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
               use_cache=True, **_with_cache(base, cache), **kw)
    return out.last_hidden_state[:, -1], cache


def step(model, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache):
    """Run new tokens ids [N, t] on top of `cache`; returns hidden [N, t, H] (cache grows)."""
    base = base_model(model)
    out = base(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
               **_with_cache(base, cache))
    return out.last_hidden_state


def completion_hidden(model, batch: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """Hidden states that score each completion token: [B*G, T, H].

    batch: B left-padded prompts; completion_ids / completion_mask [B*G, T], rows grouped
    by prompt (rows g*G .. g*G+G-1 belong to prompt g). Entry t is the hidden state at the
    position before completion token t (the last prompt position for t = 0).
    """
    if lean_supported(model):             # our layer math: the prompt once, also under checkpointing
        return lean_completion_hidden(model, batch, completion_ids, completion_mask, group_size)
    if _checkpointing(model):             # Hugging Face's checkpointing drops the cache: G prompt copies
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


def _checkpointing(model) -> bool:
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class _no_layer_checkpointing:
    """Context: the given modules (the text model and its decoder layers) run without Hugging
    Face's gradient checkpointing, which would drop the cache; restored on exit. With
    `checkpoint_layers` the decoder layers' forwards are checkpointed by us instead (module hooks,
    FSDP's too, stay outside), writing the prompt's keys and values to a `ReplayableLayer` cache:
    the prompt pass then keeps each layer's input, not its activations."""

    def __init__(self, text, layers, checkpoint_layers: bool = False):
        self.off = [m for m in (text, *layers) if getattr(m, "gradient_checkpointing", False)]
        self.wrapped = list(layers) if checkpoint_layers else []

    def __enter__(self):
        from torch.utils.checkpoint import checkpoint
        for m in self.off:
            m.gradient_checkpointing = False
        for m in self.wrapped:       # the layer's own forward, without Hugging Face's checkpointing
            # wrapper, which the backward's replay (outside this context) would otherwise run
            fwd = getattr(type(m).forward, "__wrapped__", type(m).forward).__get__(m)
            m.forward = lambda *a, _f=fwd, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)

    def __exit__(self, *exc):
        for m in self.off:
            m.gradient_checkpointing = True
        for m in self.wrapped:
            del m.forward                                  # the class's forward again
        return False


def _completion_layer(layer, x, Kp, Vp, prompt_ok, cos, sin, G: int, scaling: float):
    """One decoder layer over completion tokens x [N, T, H] (N = B*G rows) attending to their
    prompt's keys and values Kp, Vp [B, kvh, Lp, d] (padding: prompt_ok [B, Lp] False) and,
    causally, to each other; cos, sin [N, T, d]. The layers' own weights, Hugging Face's math."""
    a, mlp = layer.self_attn, layer.mlp
    N, T, _ = x.shape
    d = Kp.shape[-1]
    h = rms_norm(x, layer.input_layernorm)
    q = a.q_proj(h).view(N, T, -1, d)                                            # [N, T, heads, d]
    k = a.k_proj(h).view(N, T, -1, d)                                            # [N, T, kvh, d]
    v = a.v_proj(h).view(N, T, -1, d)
    if hasattr(a, "q_norm"):                                                     # Qwen3: per-head RMSNorm
        q, k = rms_norm(q, a.q_norm), rms_norm(k, a.k_norm)
    q = (q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]).transpose(1, 2)   # [N, heads, T, d]
    k = (k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]).transpose(1, 2)   # [N, kvh, T, d]
    v = v.transpose(1, 2)
    K = torch.cat([Kp.repeat_interleave(G, 0), k.to(Kp.dtype)], 2)              # [N, kvh, Lp + T, d]
    V = torch.cat([Vp.repeat_interleave(G, 0), v.to(Vp.dtype)], 2)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    ok = torch.cat([prompt_ok.repeat_interleave(G, 0)[:, None, :].expand(N, T, -1), causal.expand(N, T, T)], 2)
    out = F.scaled_dot_product_attention(q, K.to(q.dtype), V.to(q.dtype), attn_mask=ok[:, None], scale=scaling,
                                         enable_gqa=True)                       # [N, heads, T, d]
    x = x + a.o_proj(out.transpose(1, 2).reshape(N, T, -1))
    h = rms_norm(x, layer.post_attention_layernorm)
    return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))


def lean_completion_hidden(model, batch: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """`completion_hidden` for the models the lean decoder covers, with autograd: the prompt
    (and its images) through the Hugging Face forward once, then the completions through the
    decoder layers' own weights, each layer attending to its prompt's cache. Under gradient
    checkpointing each layer is checkpointed with the prompt's keys and values as inputs, so the
    prompt is still computed once, not G times. Returns [B*G, T, H]."""
    from torch.utils.checkpoint import checkpoint
    tm = text_model(model)
    ckpt = _checkpointing(model)
    pos, next_pos = prompt_positions(model, batch)
    cache = new_cache(model)
    if ckpt:                                     # the prompt pass checkpointed too, layer by layer
        cache.layers = [ReplayableLayer() for _ in cache.layers]
    with _no_layer_checkpointing(tm, tm.layers, checkpoint_layers=ckpt):
        last, cache = prefill(model, batch, pos, cache=cache)                 # [B, H], keys [B, kvh, Lp, d]
    G, T = group_size, completion_ids.shape[1]
    first = last.repeat_interleave(G, dim=0)[:, None]                           # [N, 1, H]
    if T == 1:
        return first
    x = tm.embed_tokens(completion_ids[:, :-1])                                  # [N, T-1, H]
    cpos = next_pos.repeat_interleave(G)[:, None] + torch.arange(T - 1, device=x.device)     # [N, T-1]
    rot = tm.rotary_emb
    freqs = cpos.float()[..., None] * rot.inv_freq.float()                      # [N, T-1, d/2]
    emb = torch.cat((freqs, freqs), -1) * float(getattr(rot, "attention_scaling", 1.0))
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    ok = batch["attention_mask"].bool()
    scaling = float(getattr(tm.layers[0].self_attn, "scaling", cache.layers[0].keys.shape[-1] ** -0.5))
    for layer, cl in zip(tm.layers, cache.layers):
        args = (layer, x, cl.keys, cl.values, ok, cos, sin, G, scaling)
        x = checkpoint(_completion_layer, *args, use_reentrant=False) if ckpt else _completion_layer(*args)
    return torch.cat([first, rms_norm(x, tm.norm)], dim=1)


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
