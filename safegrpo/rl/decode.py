"""A lean decode step: one new token per row through the decoder stack, without the Hugging Face
module machinery.

The rollout spends almost all of its time in decode steps that each run one token per sequence.
At that size the work per layer is a handful of small matmuls, and the Hugging Face forward
around them (building a causal mask every step, the cache object's bookkeeping, keyword
plumbing, attention-interface dispatch) adds fixed cost per step; with G samples per prompt the
repeated prompt cache also makes attention read each prompt's keys G times. On the 2-core CPU
(tiny recipe) the plain lean step saved about 8% of the rollout time and cascade attention
another ~18% (0.60 -> 0.55 -> 0.45 s). `LeanDecoder.step` runs the same math straight from the
model's own weights:

    x = embed(ids)                                                        [N, H]
    per layer:  h = RMSNorm(x); q, k, v = h Wq + bq, h Wk + bk, h Wv + bv  (q/k RMSNorm: Qwen3)
                q, k = RoPE(q, k, position); K, V = prompt cache ++ generated (k, v)
                x = x + Wo softmax(q K^T / sqrt(d) + mask) V               (grouped-query, cascade)
                x = x + W_down(act(h' W_gate) * h' W_up),   h' = RMSNorm(x)
    hidden = RMSNorm(x)                                                   [N, H]

Positions of generated text are the same on all three M-RoPE axes (Qwen-VL), so multimodal RoPE
reduces there to ordinary RoPE with the model's `inv_freq`; the prompt (and its images) still
goes through the Hugging Face forward once (`forward.prefill`), and its cache is kept once per
prompt, not repeated G times: the G samples of a prompt attend to it together (cascade
attention, below). The left padding of the prompts is masked.

`kv_plan` lays a KV budget (rollout.max_batch_tokens) out as the decoder's prompt slots and
pages of generated keys and values.

Supported: the text stacks of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen2, Qwen3 and Llama (SmolLM2)
with full attention and a static RoPE; anything else (sliding-window layers, dynamic RoPE,
another architecture, sharded parameters) falls back to the Hugging Face step. Tests check its
hidden states against the Hugging Face step and greedy rollouts against `model.generate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import effective_weight, rms_norm, rotate_half, text_model

SUPPORTED = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2", "qwen3", "llama"}


def lean_unsupported(model) -> str | None:
    """Why `LeanDecoder` would not compute exactly what the Hugging Face step does for this
    model (None: it does)."""
    if model.config.model_type not in SUPPORTED:
        return f"model type {model.config.model_type!r} is not one of {', '.join(sorted(SUPPORTED))}"
    tm = text_model(model)
    cfg = tm.config
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention layers"
    rot = getattr(tm, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return "no rotary embedding with inv_freq"
    if getattr(rot, "rope_type", "default") in ("dynamic", "longrope"):
        return f"{rot.rope_type} RoPE (changes with the length)"
    try:
        from torch.distributed.tensor import DTensor
        if any(isinstance(w, DTensor) for w in (tm.embed_tokens.weight, tm.layers[0].self_attn.q_proj.weight)):
            return "parameters are sharded (FSDP2, not gathered)"
    except ImportError:
        pass
    return None


def lean_supported(model) -> bool:
    """Whether `LeanDecoder` computes exactly what the Hugging Face step would for this model."""
    return lean_unsupported(model) is None


def decode_path(model) -> str:
    """One line naming the decode step the rollout will use for `model`, and why."""
    why = lean_unsupported(model)
    return "lean decoder (cascade attention over each prompt's cache)" if why is None else \
        f"Hugging Face step (the lean decoder does not apply: {why})"


PAGE = 16                     # tokens per page of generated keys and values


def kv_plan(budget: int, prompt_len: int, group_size: int, max_new_tokens: int, n_prompts: int,
            page: int = PAGE) -> tuple[int, int, int]:
    """(prompt slots, pages, tokens per page) for a KV budget of `budget` cached tokens.

    When the budget holds every prompt and every row at full length (or is 0: no bound), each
    row slot gets one page of max_new_tokens (dense). Otherwise prompt slots (prompt_len tokens
    each) take at most a quarter of the budget and the rest is pages of `page` tokens, a row
    taking pages as it grows; one row at full length must fit. Raises when the budget is smaller
    than one prompt and one full row."""
    rows = n_prompts * group_size
    if budget <= 0 or n_prompts * prompt_len + rows * max_new_tokens <= budget:
        return n_prompts, rows, max_new_tokens
    per_row = -(-max_new_tokens // page)
    prompts = max(1, min(n_prompts, budget // (4 * prompt_len)))
    while prompts > 1 and (budget - prompts * prompt_len) // page < per_row:
        prompts -= 1
    pages = (budget - prompts * prompt_len) // page
    if pages < per_row:
        raise ValueError(f"rollout.max_batch_tokens={budget} holds no prompt of {prompt_len} tokens with one row of "
                         f"{max_new_tokens} (needs {prompt_len + per_row * page}); raise it, or 0 for no bound")
    return prompts, pages, page


@dataclass
class StepPlan:
    """What every layer's attention needs of one decode step of n live rows."""
    P: int                    # prompt slots in use (rows read slots 0..P-1)
    canonical: bool           # row i is sample i % G of prompt slot i // G: prompt scores are views
    flat: torch.Tensor        # [n] row -> its (prompt slot, sample) entry, slot * G + sample
    at: object                # where each row writes this token's key: page ids [n] (or a slice) ...
    off: object               # ... and offsets in the page [n] (or one int)
    nb: int                   # pages read per row
    page: int                 # tokens per page read (dense: the current length)
    pages: torch.Tensor | None   # [n * nb] page ids to gather (None: dense, read in place)
    later: torch.Tensor | None   # [n, nb, 1, 1, page] True at positions after the row's t (None: none)


class LeanDecoder:
    """Decode steps for rows (samples), each prompt's cache stored once, generated keys and
    values in pages.

    Prompt slots: the cache of each resident prompt, [P, kvh, Lp, d] per layer (Lp the longest
    prompt of the call, padding masked by `prompt_bias` [P, Lp]). Pages: what the rows have
    generated, a pool [n_pages + 1, kvh, page, d] per layer (page 0 stays zero, for unused
    table entries); row r's token t lives in page `table[r, t // page]` at offset t % page, so a
    row holds only the pages it has filled, and attention reads them page by page. Dense mode
    (when the budget holds every row at full length): one page of max_new_tokens per row slot,
    row slot r owning page r + 1, read in place without a gather. A step runs the live rows
    0..n-1; the caller keeps them compact (moving page-table rows, or in dense mode the keys). Attention is cascaded: the queries of a
    prompt's rows meet that prompt's keys in one matmul per prompt slot ([G*g, d] x [d, Lp], the
    prompt read once, not G times), the generated keys (gathered from the row's pages) in one per
    row, and the two softmax parts are joined by a shared maximum.

    Weights: under bf16 autocast with fp32 weights the text stack's matrices are cast once here
    (once per rollout call, so once per GRPO step), not at every step."""

    def __init__(self, model, prompt_slots: int, prompt_len: int, n_pages: int, page: int, group_size: int,
                 kv_dtypes: tuple, device, dense: bool = False):
        tm = text_model(model)
        self.embed, self.layers, self.norm = tm.embed_tokens, tm.layers, tm.norm
        rot = tm.rotary_emb
        self.inv_freq, self.rope_scale = rot.inv_freq.float(), float(getattr(rot, "attention_scaling", 1.0))
        a = self.layers[0].self_attn
        self.head_dim = d = a.head_dim
        self.scaling = float(getattr(a, "scaling", d ** -0.5))
        self.kvh = a.k_proj.weight.shape[0] // d
        self.G, self.P, self.Lp, self.page, self.dense = group_size, prompt_slots, prompt_len, page, dense
        dev = torch.device(device).type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        self.weights = [self._layer_weights(layer, cast) for layer in self.layers]
        kd, vd = kv_dtypes                # as the prefill cache holds them (under autocast: RoPE'd keys fp32)
        self.prompt_kv = [(torch.zeros(prompt_slots, self.kvh, prompt_len, d, dtype=kd, device=device),
                           torch.zeros(prompt_slots, self.kvh, prompt_len, d, dtype=vd, device=device))
                          for _ in self.layers]
        self.prompt_bias = torch.full((prompt_slots, prompt_len), torch.finfo(torch.float32).min, device=device)
        self.pages = [(torch.zeros(n_pages + 1, self.kvh, page, d, dtype=kd, device=device),
                       torch.zeros(n_pages + 1, self.kvh, page, d, dtype=vd, device=device)) for _ in self.layers]

    @staticmethod
    def _layer_weights(layer, dtype):
        """The layer's projection weights (a LoRA layer's merged: layers.effective_weight) and
        biases, cast to `dtype` (None: as stored)."""
        a, mlp = layer.self_attn, layer.mlp
        mods = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.detach().to(dtype))
        return [(cast(effective_weight(m)), cast(getattr(m, "bias", None))) for m in mods]

    def add_prompt(self, slot: int, keys: list, values: list, mask: torch.Tensor) -> None:
        """Store one prompt's prefill cache (per layer [kvh, L, d], L <= Lp, mask [L]) in `slot`."""
        L = mask.shape[0]
        for (Kp, Vp), k, v in zip(self.prompt_kv, keys, values):
            Kp[slot].zero_()
            Vp[slot].zero_()
            Kp[slot, :, self.Lp - L:] = k
            Vp[slot, :, self.Lp - L:] = v
        self.prompt_bias[slot].fill_(torch.finfo(torch.float32).min)
        self.prompt_bias[slot, self.Lp - L:].masked_fill_(mask.bool(), 0.0)

    def move_rows(self, src, dst) -> None:
        """Dense mode: copy the pages of row slots src -> dst (compaction)."""
        for Kpool, Vpool in self.pages:
            Kpool[dst + 1], Vpool[dst + 1] = Kpool[src + 1], Vpool[src + 1]

    def move_prompt(self, src: list[int], dst: list[int]) -> None:
        """Copy prompt slots src -> dst (compaction)."""
        for Kp, Vp in self.prompt_kv:
            Kp[dst], Vp[dst] = Kp[src], Vp[src]
        self.prompt_bias[dst] = self.prompt_bias[src]

    def _rope(self, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos.float()[:, None] * self.inv_freq[None, :]                      # [n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                    # [n, d]
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]               # [n, 1, d]

    def _plan(self, prompt, g_idx, t, table, canonical: bool, t_max: int | None) -> "StepPlan":
        """What every layer's attention needs of this step, computed once (see StepPlan)."""
        n, page, dev = t.shape[0], self.page, t.device
        T_cur = (int(t.max()) if t_max is None else t_max) + 1
        rows = torch.arange(n, device=dev)
        P = int(prompt[-1]) + 1 if canonical else int(prompt.max()) + 1
        flat = prompt * self.G + g_idx
        if self.dense:                    # row slot r owns page r + 1: read in place
            if int(t.min()) == T_cur - 1:   # every row at the same position: slice writes, nothing to mask
                return StepPlan(P, canonical, flat, slice(1, n + 1), T_cur - 1, 1, T_cur, None, None)
            at, off, nb, span_page, pages = rows + 1, t, 1, T_cur, None
        else:
            at, off, nb, span_page = table[rows, t // page], t % page, (T_cur - 1) // page + 1, page
            pages = table[:, :nb].flatten()
        later = torch.arange(nb * span_page, device=dev).view(1, nb, 1, 1, span_page) > t.view(n, 1, 1, 1, 1)
        return StepPlan(P, canonical, flat, at, off, nb, span_page, pages, later)

    def _attention(self, q, k, v, layer_idx, plan: dict):
        """q [n, heads, d]; this token's k, v [n, kvh, d] -> attention output [n, heads * d]."""
        n, kvh, d, G = q.shape[0], self.kvh, self.head_dim, self.G
        g = q.shape[1] // kvh                             # query heads per kv head (head h reads kv h // g)
        P, nb, page, flat = plan.P, plan.nb, plan.page, plan.flat
        Kp, Vp = self.prompt_kv[layer_idx]                                         # [P, kvh, Lp, d]
        Kpool, Vpool = self.pages[layer_idx]                                       # [pages, kvh, page, d]
        Kpool[plan.at, :, plan.off], Vpool[plan.at, :, plan.off] = k, v
        if plan.pages is None:         # dense: row slot r owns page r + 1, read in place
            Kg, Vg = Kpool[1:n + 1, :, :page], Vpool[1:n + 1, :, :page]          # [n, kvh, T, d]
        else:                             # gather each row's pages
            Kg = Kpool.index_select(0, plan.pages).view(n, nb, kvh, page, d)   # [n, nb, kvh, page, d]
            Vg = Vpool.index_select(0, plan.pages).view(n, nb, kvh, page, d)
        q4 = q.view(n, kvh, g, d)
        # prompt part, cascaded: each prompt's G sample slots in one [G*g, Lp] block
        qd = q4 if plan.canonical else q4.new_zeros(P * G, kvh, g, d).index_copy_(0, flat, q4)
        qd = qd.view(P, G, kvh, g, d).transpose(1, 2).reshape(P, kvh, G * g, d)   # [P, kvh, G*g, d]
        sp = (torch.matmul(qd, Kp[:P].transpose(-1, -2)).float() * self.scaling
              + self.prompt_bias[:P, None, None, :]).view(P, kvh, G, g, -1)       # [P, kvh, G, g, Lp]
        # generated part, per row (and page); positions after t masked
        paged = plan.pages is not None
        sg = torch.matmul(q4[:, None] if paged else q4, Kg.transpose(-1, -2)).float() * self.scaling
        if plan.later is not None:     # sg: [n, nb, kvh, g, page] paged, [n, kvh, g, T] dense
            sg.masked_fill_(plan.later if paged else plan.later[:, 0], torch.finfo(torch.float32).min)
        mp = sp.amax(-1).transpose(1, 2).reshape(P * G, kvh, g)                  # [P*G, kvh, g]
        mp = mp if plan.canonical else mp.index_select(0, flat)
        m = torch.maximum(mp, sg.amax((1, -1)) if paged else sg.amax(-1))[..., None]   # [n, kvh, g, 1]
        md = m if plan.canonical else m.new_zeros(P * G, kvh, g, 1).index_copy_(0, flat, m)
        ep = torch.exp(sp - md.view(P, G, kvh, g, 1).transpose(1, 2))             # [P, kvh, G, g, Lp]
        eg = torch.exp(sg - (m[:, None] if paged else m))                          # like sg
        op = torch.matmul(ep.view(P, kvh, G * g, -1).to(Vp.dtype), Vp[:P]).view(P, kvh, G, g, d)
        sum_p = ep.sum(-1, keepdim=True)                                           # [P, kvh, G, g, 1]
        op, sum_p = op.transpose(1, 2).reshape(P * G, kvh, g, d), sum_p.transpose(1, 2).reshape(P * G, kvh, g, 1)
        if not plan.canonical:
            op, sum_p = op.index_select(0, flat), sum_p.index_select(0, flat)     # [n, kvh, g, .]
        og = torch.matmul(eg.to(Vg.dtype), Vg)                                     # [n, (nb,) kvh, g, d]
        og, sum_g = (og.sum(1), eg.sum((1, -1))[..., None]) if paged else (og, eg.sum(-1, keepdim=True))
        out = (op + og) / (sum_p + sum_g)
        return out.reshape(n, kvh * g * d).to(Vp.dtype)                            # as the HF attention returns

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, prompt: torch.Tensor, g_idx: torch.Tensor,
             t: torch.Tensor, table: torch.Tensor, canonical: bool = False, t_max: int | None = None) -> torch.Tensor:
        """Tokens ids [n] of live rows 0..n-1 (prompt slot, sample index, generated index t, all
        [n]; page table [n, pages]) at positions pos [n] -> last hidden state [n, H]. canonical:
        row i is sample i % G of prompt slot i // G (all G samples of each prompt, in order);
        t_max: max(t) when the caller knows it (saves a reduction)."""
        x = self.embed(ids)                                                        # [n, H]
        n = x.shape[0]
        cos, sin = self._rope(pos, x.dtype)
        plan = self._plan(prompt, g_idx, t, table, canonical, t_max)
        for i, (layer, w) in enumerate(zip(self.layers, self.weights)):
            a, mlp = layer.self_attn, layer.mlp
            (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wg, bg), (wu, bu), (wd, bd) = w
            h = rms_norm(x, layer.input_layernorm)
            q = F.linear(h, wq, bq).view(n, -1, self.head_dim)                     # [n, heads, d]
            k = F.linear(h, wk, bk).view(n, -1, self.head_dim)                     # [n, kvh, d]
            v = F.linear(h, wv, bv).view(n, -1, self.head_dim)
            if hasattr(a, "q_norm"):                                               # Qwen3: per-head RMSNorm
                q, k = rms_norm(q, a.q_norm), rms_norm(k, a.k_norm)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            x = x + F.linear(self._attention(q, k, v, i, plan), wo, bo)
            h = rms_norm(x, layer.post_attention_layernorm)
            x = x + F.linear(mlp.act_fn(F.linear(h, wg, bg)) * F.linear(h, wu, bu), wd, bd)
        return rms_norm(x, self.norm)
