"""The rollout engine: G completions per prompt, continuously batched under a KV budget.

    prompts [B, Lp] --prefill once per prompt--> prompt slots --> rows decode token by token

The prompt (and its images) goes through the model once per prompt (forward.py), so vision
features and prompt attention are computed B times, not B*G. For the supported architectures
(decode.py: the Qwen-VL families, Qwen2/3, Llama) each decode step runs the lean decoder, whose G
samples of a prompt attend to that prompt's cache stored once; other models repeat the cache G
times and decode with the Hugging Face forward (same numbers, slower).
Each step samples from softmax(logits / temperature) restricted to the top-p nucleus (exactly,
with per-row counter-based uniforms: sampling.py), never samples image or video placeholder ids,
and stops a row at its first EOS; the loop ends when every row has stopped or after
max_new_tokens.

Returns completion ids [B*G, T] (padded with pad_id after EOS), lengths [B*G] (first EOS
included) and two log-probabilities [B*G, T] of each sampled token, both from the logits the
sampler used (no extra forward pass) and, like the tokens, independent of the batching, the KV
budget and pre-emption:
    logprobs        under the distribution it was drawn from (temperature, banned placeholders and
                    the top-p nucleus applied): pi_rollout, for the importance weights and the
                    mismatch figures (correction.py)
    full_logprobs   under the full softmax at the temperature, the training forward's form: pi_old
                    for grpo.old_logprobs: rollout. A ratio needs numerator and denominator of one
                    form; against the nucleus's log-prob it would be Z_t < 1 at the rollout's own
                    parameters, clipping every negative-advantage token. `completion_mask(lengths, T)` rebuilds the mask from lengths, never from token values.
Temperature 0 means greedy decoding (it matches `model.generate(do_sample=False)` token for token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import slice_prompts
from .decode import LeanDecoder, kv_plan, lean_supported
from .forward import continuation_positions, lm_head_weight, prefill, prompt_positions, step
from .sampling import row_keys, sample, top_p_filter, uniforms


@dataclass
class Rollout:
    completion_ids: torch.Tensor  # [B*G, T]
    lengths: torch.Tensor         # [B*G], first EOS included
    group_size: int
    peak_cached_tokens: int = 0   # the most prompt + generated tokens held in the KV cache at once
    row_steps: int = 0            # decode-step rows computed (continuous batching: sum(lengths - 1) + redone)
    redone_steps: int = 0         # of those, steps of pre-empted rows computed again
    logprobs: torch.Tensor | None = None   # [B*G, T] fp32: log-prob of each sampled token under the
                                           # distribution it was drawn from (0 after the end, and greedy)
    full_logprobs: torch.Tensor | None = None   # [B*G, T] fp32: under the full softmax at the temperature

    @property
    def mask(self) -> torch.Tensor:
        return completion_mask(self.lengths, self.completion_ids.shape[1])


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


def _next_tokens(h: torch.Tensor, W: torch.Tensor, banned, temperature: float, top_p: float, keys, t,
                 check: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of hidden states h [n, H] and two log-probabilities [n] of it: under the
    distribution it was drawn from (fp32 logits, placeholders banned, divided by the temperature,
    cut to the top-p nucleus and renormalised), and under the full softmax of logits / temperature
    (the training forward's form). The token comes from the exact sampler with row keys [n] at
    generated index t [n]. Greedy (temperature 0): the argmax, log-probs 0. check: a non-finite
    logit raises (a broken policy shows at its first step)."""
    with torch.autocast(h.device.type, enabled=False):                          # sample from fp32 logits
        logits = h.float() @ W.T                                                 # [n, V]
    if check and not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("non-finite logits at the first decode step")
    if temperature == 0:
        if banned:
            logits[:, banned] = float("-inf")
        tok = logits.argmax(-1)
        zero = torch.zeros(tok.shape, dtype=torch.float32, device=tok.device)
        return tok, zero, zero
    logits = logits / temperature
    lse = torch.logsumexp(logits, -1)                                            # [n], full softmax's
    full_lse = lse
    if banned:     # the mass left without the few banned ids: no second pass over the vocabulary
        lse = lse + torch.log1p(-torch.exp(logits[:, banned] - lse[:, None]).sum(-1).clamp(max=1.0))
        logits[:, banned] = float("-inf")
    sampled = logits
    if top_p < 1.0:
        sampled = top_p_filter(logits, top_p)
        lse = torch.logsumexp(sampled, -1)
    tok = sample(torch.softmax(sampled, -1), uniforms(keys, t))
    picked = logits.gather(1, tok[:, None]).squeeze(1)                                  # [n], tempered logit
    return tok, picked - lse, picked - full_lse                                         # pi_rollout, full softmax


@torch.no_grad()
def generate(model, batch: dict, *, group_size: int, max_new_tokens: int, eos_token_id, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, seeds=None, banned_ids: list[int] | None = None,
             lean: bool = True, max_batch_tokens: int = 0) -> Rollout:
    """Sample group_size completions for each of the B prompts in `batch` (left-padded).

    seeds: one int per prompt; sample g of prompt b draws its t-th token from a uniform that is a
        pure function of (seeds[b], g, t) (sampling.py), so its completion does not depend on the
        other prompts in the call, nor on when it was decoded. None: seeds from torch's generator.
    max_batch_tokens: the KV cache budget in tokens (prompt slots x longest prompt + row slots x
        max_new_tokens, see `decode.kv_plan`); 0 = every prompt and row at once.
    lean: decode with `decode.LeanDecoder` where the model is supported: continuous batching
        (rows join as slots free, a finished row stops costing compute at once); else the
        Hugging Face step, in static batches of as many prompts as the budget holds."""
    device = batch["input_ids"].device
    B, G = batch["input_ids"].shape[0], group_size
    if seeds is None:
        seeds = torch.randint(0, 2 ** 62, (B,)).tolist()
    if len(seeds) != B:
        raise ValueError(f"generate: {len(seeds)} seeds for {B} prompts")
    sampler = dict(eos=torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                                    device=device),
                   W=lm_head_weight(model).float(),                                       # [V, H], cast once
                   banned=banned_ids if banned_ids is not None else banned_token_ids(model),
                   temperature=temperature, top_p=top_p, keys=row_keys(seeds, G, device))   # keys [B*G]
    run = _continuous if lean and lean_supported(model) else _static
    out, logp, lengths, peak, row_steps, redone = run(model, batch, G, max_new_tokens, pad_token_id,
                                                      max_batch_tokens, **sampler)
    T = int(lengths.max())
    return Rollout(out[:, :T].contiguous(), lengths, G, peak, row_steps, redone, logp[0, :, :T].contiguous(),
                   logp[1, :, :T].contiguous())


def _images_per_prompt(model, batch) -> list[int]:
    start = getattr(model.config, "vision_start_token_id", None)
    if start is None or batch.get("image_grid_thw") is None:
        return [0] * batch["input_ids"].shape[0]
    return (batch["input_ids"] == start).sum(-1).tolist()


class _LiveRows:
    """The live rows of a continuous batch, compact in slots 0..n-1, and their state: global row
    id, prompt slot, sample index g, tokens so far t, the key of their sampler, the position
    after their prompt, the token to feed next, their hidden state [R, H] and page table
    [R, pages]. `drop` removes rows by moving the last live rows into their slots."""
    FIELDS = ("id", "prompt", "g", "t", "order", "key", "pos0", "tok")

    def __init__(self, R: int, per_row: int, hidden: int, dtype, device):
        for f in self.FIELDS:
            setattr(self, f, torch.zeros(R, dtype=torch.long, device=device))
        self.h = torch.zeros(R, hidden, dtype=dtype, device=device)
        self.table = torch.zeros(R, per_row, dtype=torch.long, device=device)
        self.n, self.admitted, self.changed = 0, 0, True

    def add(self, row_id: int, g: int, slot: int, key, pos0, h) -> None:
        n = self.n
        self.id[n], self.g[n], self.prompt[n], self.t[n], self.order[n] = row_id, g, slot, 0, self.admitted
        self.key[n], self.pos0[n], self.h[n] = key, pos0, h
        self.n, self.admitted, self.changed = n + 1, self.admitted + 1, True

    def drop(self, idx: torch.Tensor, with_table: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove rows idx; returns (movers, holes): rows that moved, and the slots they moved to."""
        keep = torch.ones(self.n, dtype=torch.bool, device=idx.device)
        keep[idx] = False
        n = int(keep.sum())
        holes, movers = idx[idx < n], keep.nonzero().flatten()
        movers = movers[movers >= n]
        for buf in [getattr(self, f) for f in self.FIELDS] + [self.h] + ([self.table] if with_table else []):
            buf[holes] = buf[movers]
        self.n, self.changed = n, True
        return movers, holes

    def canonical(self, G: int) -> bool:
        """Whether row i is sample i % G of prompt slot i // G: every live prompt has all its G
        samples live, in order (G is the group size, never inferred from the live rows: sample 0
        of two prompts is not two groups of one)."""
        n = self.n
        if n % G:
            return False
        ar = torch.arange(n, device=self.g.device)
        return bool(((self.prompt[:n] == ar // G) & (self.g[:n] == ar % G)).all())


def _continuous(model, batch, G, T, pad_id, budget, **sampler):
    """Continuous batching (see LeanDecoder and `_ContinuousBatch`). Returns (ids [B*G, T],
    log-probs [B*G, T], lengths [B*G], peak cached tokens, rows computed, of which computed again
    after pre-emption)."""
    return _ContinuousBatch(model, batch, G, T, pad_id, budget, sampler).run()


class _ContinuousBatch:
    """One continuous-batching rollout. Each round of `run`:

        admit     rows join in prompt order while a row slot, a prompt slot and a free page per
                  live row are available; a prompt is prefilled when its first row joins and
                  keeps its prompt slot until its last row ends
        sample    the next token of every live row; finished rows leave at once, freeing their
                  pages, and prompts without live rows give their slot up
        pages     a row about to write the first token of a page gets one; when none is free
                  the newest rows are pre-empted (they start again later and, their samples
                  being a function of (seed, sample, step), produce the same tokens)
        decode    one lean decode step of the live rows
    """

    def __init__(self, model, batch, G, T, pad_id, budget, sampler: dict):
        self.model, self.batch, self.G, self.T, self.sampler = model, batch, G, T, sampler
        self.B, self.device = batch["input_ids"].shape[0], batch["input_ids"].device
        self.Lp = batch["input_ids"].shape[1]
        self.P, self.n_pages, self.page = kv_plan(budget, self.Lp, G, T, self.B)
        self.dense = self.page == T and self.n_pages == self.P * G       # a page per row slot, no gather
        self.R = self.P * G                                              # the most rows live at once
        self.n_img, self.lp = _images_per_prompt(model, batch), batch["attention_mask"].sum(-1).tolist()
        self.pending = [(b, g) for b in range(self.B) for g in range(G)]  # FIFO of rows to start
        self.out = torch.full((self.B * G, T), pad_id, dtype=torch.long, device=self.device)
        self.logp = torch.zeros(2, self.B * G, T, dtype=torch.float32, device=self.device)  # sampled, full
        self.lengths = torch.full((self.B * G,), T, dtype=torch.long, device=self.device)
        self.free = [] if self.dense else list(range(self.n_pages, 0, -1))   # page 0 is the zero page
        self.dec = self.rows = None       # LeanDecoder and _LiveRows, made at the first prefill
        # per prompt slot: its prompt; per prompt: rows not yet finished, position after it, last hidden state
        self.slot_prompt, self.left, self.slot_pos, self.slot_last = [], {}, {}, {}
        self.peak = self.row_steps = self.redone = self.stored = self.t_max = 0
        self.first, self.canonical = True, False

    def live(self) -> int:
        return self.rows.n if self.rows is not None else 0

    def run(self):
        while self.pending or self.live():
            self.admit()
            self.sample()
            need = self.pages()
            if self.live():
                self.decode(need)
        return self.out, self.logp, self.lengths, self.peak, self.row_steps, self.redone

    def admit(self) -> None:
        """Pending rows join while there are row slots, prompt slots and free pages."""
        n, k, new_prompts = self.live(), 0, []
        while k < len(self.pending) and n + k < self.R and (self.dense or len(self.free) > n + k):
            b = self.pending[k][0]
            if b not in self.slot_prompt and b not in new_prompts:
                if len(self.slot_prompt) + len(new_prompts) >= self.P:
                    break
                new_prompts.append(b)
            k += 1
        if new_prompts:
            self._prefill(new_prompts[0], new_prompts[-1] + 1)
        G = self.G
        for b, g in self.pending[:k]:
            self.rows.add(b * G + g, g, self.slot_prompt.index(b), self.sampler["keys"][b * G + g],
                          self.slot_pos[b], self.slot_last[b])
            if not self.dense:
                self.rows.table[self.rows.n - 1] = 0                   # its pages come as it writes
        del self.pending[:k]

    def _prefill(self, a: int, e: int) -> None:
        """Prefill prompts a..e-1 (a contiguous range) into new prompt slots."""
        sub = slice_prompts(self.batch, a, e, self.n_img)
        pos, nxt = prompt_positions(self.model, sub)
        last, cache = prefill(self.model, sub, pos)                      # [e-a, H]
        if self.dec is None:
            kv = (cache.layers[0].keys.dtype, cache.layers[0].values.dtype)
            self.dec = LeanDecoder(self.model, self.P, self.Lp, self.n_pages, self.page, self.G, kv, self.device,
                                   self.dense)
            self.rows = _LiveRows(self.R, -(-self.T // self.page), last.shape[-1], last.dtype, self.device)
            if self.dense:
                self.rows.table[:, 0] = torch.arange(1, self.R + 1, device=self.device)   # row slot r owns page r + 1
        for j, b in enumerate(range(a, e)):
            self.dec.add_prompt(len(self.slot_prompt), [cl.keys[j] for cl in cache.layers],
                                [cl.values[j] for cl in cache.layers], sub["attention_mask"][j])
            self.slot_prompt.append(b)
            self.slot_pos[b], self.slot_last[b], self.left[b] = nxt[j], last[j], self.G

    def sample(self) -> None:
        """The next token of every live row; rows at EOS or max_new_tokens leave."""
        rows, n, s = self.rows, self.rows.n, self.sampler
        tok, logp, full = _next_tokens(rows.h[:n], s["W"], s["banned"], s["temperature"], s["top_p"],
                                       rows.key[:n], rows.t[:n], check=self.first)
        self.first = False
        self.out[rows.id[:n], rows.t[:n]] = rows.tok[:n] = tok
        self.logp[0, rows.id[:n], rows.t[:n]] = logp
        self.logp[1, rows.id[:n], rows.t[:n]] = full
        stop = torch.isin(tok, s["eos"]) | (rows.t[:n] + 1 >= self.T)
        if bool(stop.any()):
            self._retire(stop.nonzero().flatten())

    def _retire(self, gone: torch.Tensor) -> None:
        """Finished rows `gone` leave at once (pages freed); their prompts, when no row of theirs
        is left, give their slot up (the remaining slots compacted)."""
        rows, G = self.rows, self.G
        self.lengths[rows.id[gone]] = rows.t[gone] + 1
        self.stored -= int(rows.t[gone].sum())
        for r in rows.id[gone].tolist():
            self.left[r // G] -= 1
        if not self.dense:
            self.free.extend(p for p in rows.table[gone].flatten().tolist() if p)
        movers, holes = rows.drop(gone, with_table=not self.dense)
        if self.dense and holes.numel():
            self.dec.move_rows(movers, holes)
        done = [s for s, b in enumerate(self.slot_prompt) if self.left[b] == 0]
        if done:
            stay = [s for s in range(len(self.slot_prompt)) if s not in done]
            remap = torch.zeros(len(self.slot_prompt), dtype=torch.long, device=self.device)
            remap[stay] = torch.arange(len(stay), device=self.device)
            self.dec.move_prompt(stay, list(range(len(stay))))
            self.slot_prompt = [self.slot_prompt[s] for s in stay]
            rows.prompt[:rows.n] = remap[rows.prompt[:rows.n]]
        self.t_max = int(rows.t[:rows.n].max()) if rows.n else 0

    def pages(self) -> torch.Tensor | None:
        """The rows about to write the first token of a page (None in dense mode), after
        pre-empting the newest rows while there are fewer free pages than such rows."""
        if self.dense:
            return None
        rows, G = self.rows, self.G
        need = (rows.t[:rows.n] % self.page == 0).nonzero().flatten()
        while len(self.free) < need.numel():
            victim = int(rows.order[:rows.n].argmax())
            self.redone += int(rows.t[victim])
            self.stored -= int(rows.t[victim])
            self.pending.insert(0, divmod(int(rows.id[victim]), G))
            self.pending.sort(key=lambda bg: bg[0] * G + bg[1])      # back in prompt order
            self.free.extend(p for p in rows.table[victim].tolist() if p)
            rows.drop(torch.tensor([victim], device=self.device), with_table=True)
            need = (rows.t[:rows.n] % self.page == 0).nonzero().flatten()
            self.t_max = int(rows.t[:rows.n].max()) if rows.n else 0
        return need

    def decode(self, need: torch.Tensor | None) -> None:
        """Give the rows in `need` a page each, then one decode step of the live rows."""
        rows, n = self.rows, self.rows.n
        for r in (need.tolist() if need is not None else ()):
            rows.table[r, int(rows.t[r]) // self.page] = self.free.pop()
        self.stored += n                                                 # this step writes one token per row
        self.peak = max(self.peak, sum(self.lp[b] for b in self.slot_prompt) + self.stored)
        if rows.changed:                  # rows i = sample i % G of prompt slot i // G: no scatter in attention
            self.canonical, rows.changed = rows.canonical(self.G), False
        t = rows.t[:n]
        rows.h[:n] = self.dec.step(rows.tok[:n], rows.pos0[:n] + t, rows.prompt[:n], rows.g[:n], t, rows.table[:n],
                                   self.canonical, self.t_max)
        t += 1
        self.t_max += 1
        self.row_steps += n


def _static(model, batch, G, T, pad_id, budget, *, eos, W, banned, temperature, top_p, keys):
    """The Hugging Face step (models the lean decoder does not cover), in static batches of as
    many prompts as the budget holds (each prompt's cache repeated G times, as the Hugging Face
    step needs); a batch runs until its longest row ends."""
    B, n_img, Lp = batch["input_ids"].shape[0], _images_per_prompt(model, batch), batch["input_ids"].shape[1]
    per_call = B if budget <= 0 else budget // (G * (Lp + T))
    if per_call < 1:
        raise ValueError(f"rollout.max_batch_tokens={budget} holds no prompt on the Hugging Face step "
                         f"(G x (prompt + max_new_tokens) = {G * (Lp + T)}); raise it, or 0 for no bound")
    outs, logps, lens, peak, row_steps = [], [], [], 0, 0
    for a in range(0, B, per_call):
        e = min(a + per_call, B)
        sub = slice_prompts(batch, a, e, n_img) if (a, e) != (0, B) else batch
        pos, next_pos = prompt_positions(model, sub)
        last, cache = prefill(model, sub, pos, reserve=T)                        # [b, H]
        cache.batch_repeat_interleave(G)
        N = (e - a) * G
        h = last.repeat_interleave(G, dim=0)                                     # [N, H]
        next_pos = next_pos.repeat_interleave(G)
        attn = sub["attention_mask"].repeat_interleave(G, dim=0)                 # [N, Lp]
        Lp = attn.shape[1]
        attn = torch.cat([attn, attn.new_ones(N, T)], dim=1)                     # [N, Lp + T], allocated once
        out = torch.full((N, T), pad_id, dtype=torch.long, device=h.device)
        logps.append(torch.zeros(2, N, T, dtype=torch.float32, device=h.device))      # sampled, full
        lengths = torch.full((N,), T, dtype=torch.long, device=h.device)
        done = torch.zeros(N, dtype=torch.bool, device=h.device)
        ks = keys[a * G:e * G]
        for t in range(T):
            tok, logp, full = _next_tokens(h, W, banned, temperature, top_p, ks, t, check=t == 0)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out[:, t] = tok
            logps[-1][:, :, t] = torch.stack([logp, full]).masked_fill(done, 0.0)
            hit = torch.isin(tok, eos) & ~done
            lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
            done |= hit
            peak = max(peak, int(sub["attention_mask"].sum()) * G + N * (t + 1))
            if bool(done.all()) or t == T - 1:
                break
            h = step(model, tok[:, None], attn[:, :Lp + t + 1], continuation_positions(model, next_pos, 1, offset=t),
                     cache)[:, -1]
            row_steps += N
        outs.append(out)
        lens.append(lengths)
    return torch.cat(outs), torch.cat(logps, 1), torch.cat(lens), peak, row_steps, 0
