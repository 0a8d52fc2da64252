"""Batched sampling with a KV cache: G completions per prompt.

    prompts [B, Lp] --prefill once--> cache [B] --> decode [B*G] token by token

The prompt (and its images) goes through the model once per prompt (forward.py), so vision
features and prompt attention are computed B times, not B*G. For the supported architectures
(decode.py: the Qwen-VL families, Qwen2/3, Llama) each decode step runs the lean decoder, whose G
samples of a prompt attend to that prompt's cache stored once; other models repeat the cache G
times and decode with the Hugging Face forward (same numbers, slower).
Each step samples from softmax(logits / temperature) restricted to the top-p nucleus (exactly,
with per-row counter-based uniforms: sampling.py), never samples image or video placeholder ids,
and stops a row at its first EOS; the loop ends when every row has stopped or after
max_new_tokens.

Returns completion ids [B*G, T] (padded with pad_id after EOS) and lengths [B*G] (first EOS
included). `completion_mask(lengths, T)` rebuilds the mask from lengths, never from token values.
Temperature 0 means greedy decoding (it matches `model.generate(do_sample=False)` token for token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode import LeanDecoder, lean_supported
from .forward import continuation_positions, lm_head_weight, prefill, prompt_positions, step
from .sampling import row_keys, sample, top_p_filter, uniforms


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # [B*G, T]
    lengths: torch.Tensor         # [B*G], first EOS included
    group_size: int

    @property
    def mask(self) -> torch.Tensor:
        return completion_mask(self.lengths, self.completion_ids.shape[1])


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One Rollout from several (rows in order), completions right-padded to the longest."""
    T = max(r.completion_ids.shape[1] for r in parts)
    ids = torch.cat([torch.nn.functional.pad(r.completion_ids, (0, T - r.completion_ids.shape[1]), value=pad_token_id)
                     for r in parts])
    return Rollout(ids, torch.cat([r.lengths for r in parts]), parts[0].group_size)


def completion_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[N, T] float mask: 1 for the first lengths[n] tokens."""
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).float()


def decode_completions(tokenizer, ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Text of each completion (up to its length; special tokens such as EOS dropped)."""
    return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(ids, lengths.tolist())],
                                  skip_special_tokens=True)


def banned_token_ids(model) -> list[int]:
    """Image / video placeholder ids (and vision delimiters) that must never be sampled."""
    ids = set()
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        v = getattr(model.config, key, None)
        if isinstance(v, int):
            ids.add(v)
    return sorted(ids)


@torch.no_grad()
def generate(model, batch: dict, *, group_size: int, max_new_tokens: int, eos_token_id, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, seeds=None, banned_ids: list[int] | None = None,
             lean: bool = True) -> Rollout:
    """Sample group_size completions for each of the B prompts in `batch` (left-padded).

    seeds: one int per prompt; sample g of prompt b draws its t-th token from a uniform that is a
        pure function of (seeds[b], g, t) (sampling.py), so its completion does not depend on the
        other prompts in the call. None: seeds drawn from torch's global generator.
    lean: decode with `decode.LeanDecoder` where the model is supported (the same numbers
        without the Hugging Face forward's per-step overhead), else with the Hugging Face step."""
    device = batch["input_ids"].device
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=device)
    B = batch["input_ids"].shape[0]
    if seeds is None:
        seeds = torch.randint(0, 2 ** 62, (B,)).tolist()
    if len(seeds) != B:
        raise ValueError(f"generate: {len(seeds)} seeds for {B} prompts")
    keys = row_keys(seeds, group_size, device)                                    # [B*G]
    W = lm_head_weight(model).float()                                            # [V, H], cast once
    banned = banned_ids if banned_ids is not None else banned_token_ids(model)
    pos, next_pos = prompt_positions(model, batch)
    fast = lean and lean_supported(model)
    last, cache = prefill(model, batch, pos, reserve=0 if fast else max_new_tokens)  # [B, H]
    if fast:        # the prompt cache stays once per prompt (cascade attention, decode.py)
        dec = LeanDecoder(model, cache, batch["attention_mask"], group_size, max_new_tokens)
    elif group_size > 1:
        cache.batch_repeat_interleave(group_size)
    N = last.shape[0] * group_size
    h = last.repeat_interleave(group_size, dim=0)                                # [N, H]
    next_pos = next_pos.repeat_interleave(group_size)
    attn = batch["attention_mask"].repeat_interleave(group_size, dim=0)          # [N, Lp]
    Lp = attn.shape[1]
    attn = torch.cat([attn, attn.new_ones(N, max_new_tokens)], dim=1)            # [N, Lp + T], allocated once
    out = torch.full((N, max_new_tokens), pad_token_id, dtype=torch.long, device=h.device)
    lengths = torch.full((N,), max_new_tokens, dtype=torch.long, device=h.device)
    done = torch.zeros(N, dtype=torch.bool, device=h.device)
    for t in range(max_new_tokens):
        with torch.autocast(h.device.type, enabled=False):                      # sample from fp32 logits
            logits = h.float() @ W.T                                             # [N, V]
        if t == 0 and not bool(torch.isfinite(logits).all()):  # a broken policy shows at once
            raise FloatingPointError("non-finite logits at the first decode step")
        if banned:
            logits[:, banned] = float("-inf")
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_p < 1.0:
                logits = top_p_filter(logits, top_p)
            tok = sample(torch.softmax(logits, -1), uniforms(keys, t))
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        out[:, t] = tok
        hit = torch.isin(tok, eos) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
        done |= hit
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if fast:
            h = dec.step(tok, next_pos + t)
        else:
            h = step(model, tok[:, None], attn[:, :Lp + t + 1], continuation_positions(model, next_pos, 1, offset=t),
                     cache)[:, -1]
    T = int(lengths.max())
    return Rollout(out[:, :T].contiguous(), lengths, group_size)
