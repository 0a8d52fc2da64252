"""The SafeGRPO training loop. `Trainer.train_step` reads top to bottom like DESIGN.md's seven steps:

    1 prompts    draw B records, build step-guided chat prompts, run the processor
    2 rollout    sample G completions per prompt with a KV cache (rollout.py)
    3 reward     decode and score each completion with the rule reward (reward.py)
    4 advantage  group-relative (grpo.group_advantages)
    5 logprobs   reference (if beta > 0) and old policy (if the rollout feeds > 1 update), no grad
    6 update     per mini-batch: clipped surrogate + beta * KL per token, token-mean over the
                 mini-batch, backward per micro-batch, (optional: + ptx_coef * cross-entropy on
                 warm-start demonstrations, tag values masked), gradient clip, AdamW step
    7 record     one JSON line in metrics.jsonl; checkpoint every save_every steps

An optional warm-start (`sft`) stage trains on demonstrations first (cross-entropy on the
completion tokens). State lives here and nowhere else; the math is in grpo.py.
Assumes one process (distributed training: see distributed.py).
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .data import synth, textsafety
from .checkpoint import claim_run_dir, load_trainer_state, prune_checkpoints, resumable_checkpoint, save_checkpoint
from .config import Config, save_config
from .data.records import SafeTagRecord, load_safetag
from .files import atomic_path, write_atomic
from .eval.metrics import decode_completions
from .rl.forward import completion_hidden, lm_head_weight
from .rl.grpo import aggregate, clip_fraction, group_advantages, kl_penalty, masked_mean, policy_loss
from .rl.logprobs import token_logprobs
from .rl.decode import decode_path
from .eval.metrics import generate_completions, score
from .data.tiny_model import build_tiny_model_dir
from .model import disable_dropout, load_model, load_processor, max_pixels, resolve_model_path
from .safety.prompting import encode_prompts, prompt_lengths
from . import distributed as dist
from .safety.judge import refusal_rule
from .safety.reward import GOLD_KEYS, reward_breakdown
from .rl.rollout import concat_rollouts, completion_mask, generate


_TAG_VALUE = re.compile(r"<(visual_safe|text_safe|combined_safe)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the run stops and writes no checkpoint of that state."""


# ------------------------------------------------------------------------------------ helpers
def completion_logprobs(model, batch, completion_ids, mask, group_size, temperature=1.0, entropy=False,
                        entropy_grad=False):
    """log pi(o_t | q, o_<t) for every completion token: [N, T] (and entropy [N, T])."""
    h = completion_hidden(model, batch, completion_ids, mask, group_size)          # [N, T, H]
    return token_logprobs(h, lm_head_weight(model), completion_ids, temperature, return_entropy=entropy,
                          entropy_grad=entropy_grad)


def logprobs_all_params(model, batch, *args, **kw):
    """`completion_logprobs`, and under FSDP a zero-weighted use of a trainable vision tower when
    this micro-batch has no image: every rank must produce gradients for the same parameters, or
    the gradient reduce-scatter of a rank with images waits forever for one without."""
    out = completion_logprobs(model, batch, *args, **kw)
    visual = getattr(getattr(model, "model", None), "visual", None)
    if dist.active() and batch.get("pixel_values") is None and visual is not None:
        params = [p for p in visual.parameters() if p.requires_grad]
        if params:
            zero = 0.0 * sum(p.sum() for p in params)
            out = (out[0] + zero, out[1]) if isinstance(out, tuple) else out + zero
    return out


def micro_batches(costs: list[int], mini: int, prompts: int, token_budget: int = 0) -> list[list[tuple[int, int]]]:
    """Per mini-batch (`mini` consecutive prompts), the prompt ranges [a, b) of its
    forward/backward passes: `prompts` per pass, or with token_budget > 0 as many whole groups as
    fit in that many tokens (`costs[i]`: prompt i once plus its G completions, the prompt-once
    forward), at least one. The token-mean loss does not depend on the split."""
    out = []
    for lo in range(0, len(costs), mini):
        hi, a, passes = min(lo + mini, len(costs)), lo, []
        while a < hi:
            b = a + 1
            if token_budget > 0:
                used = costs[a]
                while b < hi and used + costs[b] <= token_budget:
                    used += costs[b]
                    b += 1
            else:
                b = min(a + prompts, hi)
            passes.append((a, b))
            a = b
        out.append(passes)
    return out


def split_to(passes: list[tuple[int, int]], costs: list[int], n: int) -> list[tuple[int, int]]:
    """The same prompts in exactly n passes (n >= len(passes), n <= number of prompts): split the
    costliest pass of more than one prompt where its halves' costs balance, until there are n.
    Under torchrun every rank must run the same number of forward/backward passes per
    mini-batch (FSDP's collectives pair up pass by pass), so ranks whose prompts are shorter
    split further; no pass grows, so the token budget still holds."""
    passes = list(passes)
    while len(passes) < n:
        k = max((i for i, (a, b) in enumerate(passes) if b - a > 1), key=lambda i: sum(costs[slice(*passes[i])]))
        a, b = passes[k]
        run = [sum(costs[a:m]) for m in range(a + 1, b)]          # cost of [a, m) for each cut m
        total = sum(costs[a:b])
        m = a + 1 + min(range(len(run)), key=lambda i: abs(2 * run[i] - total))
        passes[k:k + 1] = [(a, m), (m, b)]
    return passes


def prompt_seed(seed: int, step: int, position: int) -> int:
    """Seed of the sampling generator of the `position`-th prompt of GRPO step `step`: a prompt's
    completions do not depend on which rank or micro-batch it lands in, or on a resume."""
    return (seed * 1_000_003 + step) * 1_000_033 + position


def slice_prompts(batch: dict, a: int, b: int, images_per_prompt: list[int]) -> dict:
    """Prompts a..b-1 of an encoded batch, with their images' patches, left padding trimmed."""
    mask = batch["attention_mask"][a:b]
    keep = int(mask.sum(-1).max())
    out = {k: batch[k][a:b, -keep:] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
    if batch.get("image_grid_thw") is not None:
        i0, i1 = sum(images_per_prompt[:a]), sum(images_per_prompt[:b])
        patches = batch["image_grid_thw"].prod(-1)
        p0, p1 = int(patches[:i0].sum()), int(patches[:i1].sum())
        if i1 > i0:
            out["image_grid_thw"] = batch["image_grid_thw"][i0:i1]
            out["pixel_values"] = batch["pixel_values"][p0:p1]
    return out


class EpochSampler:
    """Deterministic shuffled passes over n items; state is (epoch, position)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._make()

    def _make(self):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, st: dict):
        self.epoch, self.pos = st["epoch"], st["pos"]
        self._perm = self._make()


class BalancedSampler:
    """Fixed shares of each draw from several pools of indices (e.g. combined-safe and
    combined-unsafe records), each pool an EpochSampler. Pool i gets weights[i] of every
    sum(weights) draws (equal shares by default), interleaved smoothly (weighted round robin), and
    the turns carry across draws. Counters majority-label shortcuts."""

    def __init__(self, pools: list[list[int]], seed: int, what: str = "data.balance_combined",
                 weights: list[int] | None = None):
        if len(pools) < 2 or any(not p for p in pools):
            raise ValueError(f"{what} needs records of at least two kinds to balance")
        weights = weights or [1] * len(pools)
        self.pools, self.turn = pools, 0
        self.samplers = [EpochSampler(len(p), seed + 7919 * k) for k, p in enumerate(pools)]
        credit, self.cycle = [0] * len(pools), []
        for _ in range(sum(weights)):                        # smooth weighted round robin
            credit = [c + w for c, w in zip(credit, weights)]
            i = max(range(len(pools)), key=lambda k: credit[k])
            credit[i] -= sum(weights)
            self.cycle.append(i)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            pool = self.cycle[self.turn % len(self.cycle)]
            out.append(self.pools[pool][self.samplers[pool].take(1)[0]])
            self.turn += 1
        return out

    def state(self) -> dict:
        return {"pools": [s.state() for s in self.samplers], "turn": self.turn}

    def load(self, st: dict):
        for s, ps in zip(self.samplers, st["pools"]):
            s.load(ps)
        self.turn = st.get("turn", 0)


def lr_lambda(warmup: int, total: int, schedule: str):
    def f(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            prog = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * prog))
        if schedule != "constant":
            raise ValueError(f"unknown optim.schedule {schedule!r}; use constant or cosine")
        return 1.0
    return f


def _check_finite(value: torch.Tensor, what: str, step: int):
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"non-finite {what} at step {step}: {value.item() if value.numel() == 1 else value}; "
                             "stopping without writing a checkpoint of this state. Lower optim.lr, check the data, "
                             "or resume from the last checkpoint.")


# ------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        """Everything a run needs before its models: the run directory (claimed for this run:
        see checkpoint.claim_run_dir), the processor, and the data, checked when loaded."""
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.train.out_dir)
        if dist.is_main():
            claim_run_dir(self.out, resume, overwrite)
        self.resume_from = None
        if resume:
            self.resume_from = resumable_checkpoint(self.out / "checkpoints", cfg, say=print if dist.is_main() else None)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = torch.device(cfg.train.device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self._seed(cfg.train.seed)
        if not dist.is_main():
            dist.barrier()                      # rank 0 generates data and builds the tiny model first
        self.model_dir = self._model_dir()
        self.processor = load_processor(self.model_dir, cfg.model.trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.train_records, self.test_records = self._load_data()
        if dist.is_main():
            dist.barrier()
        self.refusal = refusal_rule(cfg.grpo.refusal_judge)
        if dist.is_main():
            save_config(cfg, self.out / "config.yaml")

    # -------------------------------------------------------------------------------- setup
    @staticmethod
    def _seed(seed):
        random.seed(seed)
        torch.manual_seed(seed)

    def _load_data(self):
        """Train and test records, checked now rather than when drawn: every row valid (or
        skipped and reported), images shrunk to the processor's pixel limit, every prompt
        within data.max_prompt_length (or dropped and reported)."""
        d = self.cfg.data
        if not d.train:
            root = synth.write_synth(d.synth_dir, d.synth)
            train_path, test_path = root / "train.parquet", root / "test.parquet"
        else:
            train_path, test_path = d.train, d.test
        kw = dict(skip_invalid=d.skip_invalid, image_root=d.image_root or None, max_pixels=max_pixels(self.processor),
                  allow_outside=d.allow_outside_images)
        train = self._check_lengths(load_safetag(train_path, split=d.train_split, **kw), f"data.train ({train_path})")
        test = self._check_lengths(load_safetag(test_path, split=d.test_split, **kw), f"data.test ({test_path})") \
            if test_path else []
        return train, test

    def _check_lengths(self, records, name):
        """Records whose prompt fits data.max_prompt_length; a longer one is an error naming its
        file and row, or with data.filter_overlong_prompts dropped and reported."""
        d = self.cfg.data
        lengths = prompt_lengths(self.processor, records, d.prompt_style)
        over = [(r, n) for r, n in zip(records, lengths) if n > d.max_prompt_length]
        if not over:
            return records
        if not d.filter_overlong_prompts:
            r, n = over[0]
            raise ValueError(f"{r.origin or name}: the prompt has {n} tokens, more than data.max_prompt_length="
                             f"{d.max_prompt_length} ({len(over)} such row(s); set data.filter_overlong_prompts "
                             "to drop them)")
        keep = [r for r, n in zip(records, lengths) if n <= d.max_prompt_length]
        if dist.is_main():
            rows = ", ".join(r.origin.rsplit(": ", 1)[-1] for r, _ in over[:20]) + (" ..." if len(over) > 20 else "")
            print(f"[data] {name}: dropped {len(over)} prompt(s) longer than {d.max_prompt_length} tokens "
                  f"(filter_overlong_prompts): {rows}")
        if not keep:
            raise ValueError(f"{name}: every prompt is longer than data.max_prompt_length={d.max_prompt_length}")
        return keep

    def _model_dir(self) -> Path:
        m = self.cfg.model
        if m.path:
            if not Path(resolve_model_path(m.path)[0]).is_dir():
                raise FileNotFoundError(f"model.path {m.path} is not a directory (a local Hugging Face model "
                                        "directory is expected; see data/README.md)")
            return Path(m.path)
        tiny = Path(m.tiny_dir)
        meta = tiny / "safegrpo_tiny.json"
        want = {"model": vars(m.tiny), "seed": self.cfg.train.seed, "family": "qwen2_vl"}
        if dist.is_main() and not (meta.is_file() and json.loads(meta.read_text()) == want):
            build_tiny_model_dir(tiny, vars(m.tiny), seed=self.cfg.train.seed)
        return tiny

    def amp(self):
        """bf16 autocast around model forwards when model.autocast is set (else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.autocast == "bf16")

    def _load(self, path):
        m = load_model(path, self.dtype, self.cfg.model.attn_implementation or None,
                       self.cfg.model.trust_remote_code, self.device)
        if self.cfg.model.gradient_checkpointing:
            getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
        return m

    def _optimizer(self, model, lr, warmup, total, schedule):
        o = self.cfg.optim
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(o.betas), eps=o.eps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, schedule))

    # ---------------------------------------------------------------------------------- SFT
    def sft(self, model) -> None:
        """Warm start: cross-entropy on completion tokens, in up to two stages.

        1. caption pretraining (sft.caption_steps): image + "What does the image show?" ->
           "The image shows a X." Short sequences teach the randomly initialised vision tower and
           the LM to name what they see, the alignment a pretrained VLM brings with it.
        2. format warm start (sft.steps): the step-guided prompt -> the demonstrations, whose
           tags are random, so the model learns the format and nothing about safety. For
           SafeTag-Synth rows the tags are drawn afresh each time a row is used: a fixed random
           draw per row would be memorised over the epochs, leaving the warm start with
           confident, input-dependent wrong tags (little exploration, associations GRPO must
           first unlearn) instead of an even coin on every tag.
        """
        s = self.cfg.sft
        demos = [r for r in self.train_records if r.meta.get("demo")]
        if not demos:
            raise ValueError("sft.enabled but the training records carry no 'demo' column "
                             "(SafeTag-Synth emits them; other data needs its own demonstrations)")
        if s.caption_steps:
            caption_recs = [SafeTagRecord(synth.CAPTION_QUESTION, r.images, r.image_tag, r.text_tag, r.combine_tag,
                                          {"target": synth.caption_demo(r)}) for r in demos]
            self._cross_entropy_stage(model, caption_recs, "none", s.caption_steps, s.caption_lr, "caption")
        if s.steps:
            self._cross_entropy_stage(model, self._demo_targets(), self.cfg.data.prompt_style, s.steps, s.lr, "sft")

    def _demo_targets(self) -> list[SafeTagRecord]:
        """Training records whose meta["target"] is a demonstration, drawn anew at each use where we
        know how to draw one (SafeTag-Synth, Text-Safety), else the row's fixed `demo`."""
        def fresh(r):
            if r.meta.get("concept"):
                return lambda rng: synth.demonstration(r, rng)
            if r.meta.get("demo_source") == "textsafety":
                return lambda rng: textsafety.demonstration(r.prompt, rng)
            return r.meta["demo"]
        demos = [r for r in self.train_records if r.meta.get("demo")]
        if not demos:
            raise ValueError("the training records carry no 'demo' column, which sft and grpo.ptx_coef need "
                             "(SafeTag-Synth emits them; other data needs its own demonstrations)")
        return [SafeTagRecord(r.prompt, r.images, r.image_tag, r.text_tag, r.combine_tag, {"target": fresh(r)})
                for r in demos]

    def _cross_entropy_stage(self, model, records, prompt_style, steps, lr, name):
        s = self.cfg.sft
        opt, sched = self._optimizer(model, lr, s.warmup_steps, steps, "cosine")
        sampler = EpochSampler(len(records), self.cfg.train.seed + 1)
        rng = random.Random(self.cfg.train.seed + 2)  # draws for targets given as rng -> text
        eos = self._eos_text(model)
        model.train()
        bar = tqdm(range(steps), desc=name, dynamic_ncols=True, mininterval=2)
        with atomic_path(self.out / f"{name}_metrics.jsonl") as tmp, open(tmp, "w") as log:
            for step in bar:
                recs = [records[i] for i in sampler.take(s.batch_size)]
                batch = encode_prompts(self.processor, recs, prompt_style, self.cfg.data.max_prompt_length)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                targets = [t(rng) if callable(t) else t for t in (r.meta["target"] for r in recs)]
                ids, mask = self._tokenize_completions([t + eos for t in targets])
                with self.amp():
                    logp = completion_logprobs(model, batch, ids, mask, 1)
                loss = -masked_mean(logp, mask)
                _check_finite(loss.detach(), f"{name} loss", step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")

    def _tokenize_completions(self, texts, mask_tag_values: bool = False):
        """Padded ids [N, T] and loss mask [N, T]; with mask_tag_values, the tokens overlapping the
        value of a <visual_safe>/<text_safe>/<combined_safe> tag are left out of the mask."""
        enc = [self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=mask_tag_values) for t in texts]
        T = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(enc), T), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        lengths = torch.tensor([len(e["input_ids"]) for e in enc])
        mask = completion_mask(lengths, T)
        if mask_tag_values:
            for i, (t, e) in enumerate(zip(texts, enc)):
                spans = [m.span(2) for m in _TAG_VALUE.finditer(t)]
                for j, (a, b) in enumerate(e["offset_mapping"]):
                    if any(a < y and b > x for x, y in spans):
                        mask[i, j] = 0
        return ids.to(self.device), mask.to(self.device)

    def _eos_text(self, model) -> str:
        """The text of the token that ends a completion (the model's EOS id, else the tokenizer's)."""
        eos = model.generation_config.eos_token_id
        return self.tokenizer.convert_ids_to_tokens(eos) if isinstance(eos, int) else self.tokenizer.eos_token

    # --------------------------------------------------------------------------------- GRPO
    def setup_grpo(self, init_path):
        c = self.cfg
        tr = c.train
        ckpt = self.resume_from
        self.policy = disable_dropout(self._load(ckpt or init_path))   # old, reference and new log-probs alike
        if dist.is_main():
            print(f"[rollout] decode path: {decode_path(self.policy)}")
            if c.rollout.top_p < 1:
                print(f"[rollout] warning: rollout.top_p={c.rollout.top_p} < 1 samples from the nucleus, but the "
                      "log-probs of the update use the full softmax, so the update is off-policy")
        if c.grpo.freeze_vision_tower:
            visual = getattr(getattr(self.policy, "model", None), "visual", None)
            if visual is None:
                raise ValueError("grpo.freeze_vision_tower is set but the model has no vision tower (model.visual)")
            visual.requires_grad_(False)
        self.ref = None
        if c.grpo.beta > 0:
            self.ref = disable_dropout(self._load(init_path)).eval()
            self.ref.requires_grad_(False)
        # our forward code runs inside these modules, so that FSDP2's root hooks wrap it
        self.policy_fwd = dist.Forward(self.policy, logprobs_all_params)
        self.ref_fwd = dist.Forward(self.ref, completion_logprobs) if self.ref is not None else None
        if dist.active():
            dist.shard(self.policy_fwd)
            if self.ref_fwd is not None:
                dist.shard(self.ref_fwd)
        # the schedule steps once per optimizer update; warm-up and decay are given in GRPO steps
        n = self.updates_per_step = tr.prompts_per_step // tr.mini_batch_prompts
        self.opt, self.sched = self._optimizer(self.policy, c.optim.lr, c.optim.warmup_steps * n, tr.steps * n,
                                               c.optim.schedule)
        if c.data.balance_combined:
            pools = [[i for i, r in enumerate(self.train_records) if r.combine_tag == t] for t in ("safe", "unsafe")]
            self.sampler = BalancedSampler(pools, tr.seed)
        elif c.data.balance_groups:   # half per combined tag, each half split evenly over its groups
            group = lambda r: (r.image_tag, r.text_tag, r.combine_tag)           # noqa: E731
            kinds = sorted({group(r) for r in self.train_records})
            pools = [[i for i, r in enumerate(self.train_records) if group(r) == g] for g in kinds]
            per_tag = {t: sum(g[2] == t for g in kinds) for t in ("safe", "unsafe")}
            lcm = math.lcm(*(n for n in per_tag.values() if n))
            self.sampler = BalancedSampler(pools, tr.seed, "data.balance_groups",
                                           [lcm // per_tag[g[2]] for g in kinds])
        else:
            self.sampler = EpochSampler(len(self.train_records), tr.seed)
        self.ptx_records = self._demo_targets() if c.grpo.ptx_coef > 0 else None
        self.start_step = 0
        if ckpt is not None:
            st = load_trainer_state(ckpt, self.opt, model=self.policy if dist.active() else None)
            self.sched.load_state_dict(st["scheduler"])
            self.sampler.load(st["sampler"])
            random.setstate(_to_tuple(st["python_random"]))
            self.start_step = st["step"]
            if dist.is_main():
                self._truncate_metrics(self.start_step)
                print(f"[resume] from {ckpt} (step {self.start_step})")
        elif (self.out / "metrics.jsonl").exists() and dist.is_main():
            (self.out / "metrics.jsonl").unlink()

    def _truncate_metrics(self, step):
        """Keep the metrics lines up to `step` (a line cut short by a kill mid-append is dropped)."""
        f = self.out / "metrics.jsonl"
        if f.exists():
            keep = []
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step", step + 1) <= step:
                    keep.append(line)
            write_atomic(f, "".join(l + "\n" for l in keep))

    def train_step(self, step: int) -> dict:
        c, G = self.cfg, self.cfg.rollout.group_size
        W, R = dist.world_size(), dist.rank()
        P = c.train.prompts_per_step // W                     # this rank's prompts: whole groups
        mb = c.train.mini_batch_prompts // W                  # this rank's share of each mini-batch
        # 1. prompts: the same draw on every rank; mini-batch u is prompts [u*MB, (u+1)*MB) of the
        #    step whatever the world size, split evenly over the ranks ---------------------------
        everyone = self.sampler.take(c.train.prompts_per_step)
        pos = [u * mb * W + R * mb + k for u in range(P // mb) for k in range(mb)]   # global positions
        idx = [everyone[i] for i in pos]
        recs = [self.train_records[i] for i in idx]
        batch = self._encode(recs, idx)
        n_img = [len(r.images) for r in recs]
        # 2. rollout -------------------------------------------------------------------------
        t0 = time.perf_counter()
        self.policy.eval()
        seeds = [prompt_seed(c.train.seed, step, i) for i in pos]   # sampling independent of how prompts are split
        k = c.rollout.prompts_per_call or P
        calls = [(a, min(a + k, P)) for a in range(0, P, k)]
        try:
            with self.amp(), dist.gathered(self.policy_fwd):
                ro = concat_rollouts([generate(
                    self.policy, batch if k >= P else self._encode(recs[a:b], idx[a:b]), group_size=G,
                    max_new_tokens=c.rollout.max_new_tokens, eos_token_id=self.policy.generation_config.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id, temperature=c.rollout.temperature,
                    top_p=c.rollout.top_p, seeds=seeds[a:b]) for a, b in calls], self.tokenizer.pad_token_id)
        except FloatingPointError as e:
            raise NonFiniteError(f"non-finite policy at step {step} ({e}); stopping without writing a checkpoint "
                                 "of this state. Lower optim.lr or resume from the last checkpoint.") from None
        ids, mask = ro.completion_ids, ro.mask                                          # [N, T]
        t_rollout = time.perf_counter() - t0
        # 3. reward --------------------------------------------------------------------------
        texts = decode_completions(self.tokenizer, ids, ro.lengths)
        gold = [r.tags for r in recs for _ in range(G)]
        parts = [reward_breakdown(t, g, self.refusal) for t, g in zip(texts, gold)]
        rewards = torch.tensor([p["total"] for p in parts], dtype=torch.float32)       # [N]
        # 4. advantage (groups are whole on each rank) ----------------------------------------
        batch_std = dist.global_std(rewards) if c.grpo.adv_scale == "batch" else None   # over every rank's rewards
        adv = group_advantages(rewards, G, c.grpo.adv_scale, c.grpo.adv_eps, batch_std).to(self.device)
        # 5. logprobs without grad: reference and old policy ----------------------------------
        t0 = time.perf_counter()
        n_updates = P // mb
        costs = (batch["attention_mask"].sum(-1).cpu() + ro.lengths.view(-1, G).sum(-1).cpu()).tolist()
        per_mini = micro_batches(costs, mb, c.train.micro_batch_prompts, c.train.micro_batch_tokens)
        if dist.active() and c.train.micro_batch_tokens > 0:       # the same number of passes on every rank
            n_pass = dist.all_reduce_max(torch.tensor([len(p) for p in per_mini])).tolist()
            per_mini = [split_to(p, costs, n) for p, n in zip(per_mini, n_pass)]
        micro = [ab for p in per_mini for ab in p]
        ref_logp = self._no_grad_logprobs(self.ref_fwd, batch, ids, mask, n_img, micro) if self.ref is not None else None
        old_logp = self._no_grad_logprobs(self.policy_fwd, batch, ids, mask, n_img, micro) if n_updates > 1 else None
        t_ref = time.perf_counter() - t0
        # 6. update --------------------------------------------------------------------------
        t0 = time.perf_counter()
        self.policy.train()
        all_tok = float(dist.all_reduce_sum(mask.sum()))           # completion tokens of the step, all ranks
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        for u in range(n_updates):
            self.opt.zero_grad(set_to_none=True)
            lo, hi = u * mb * G, (u + 1) * mb * G
            n_tok = dist.all_reduce_sum(mask[lo:hi].sum())          # token-mean over the global mini-batch
            for a, b in per_mini[u]:
                rows = slice(a * G, b * G)
                m = mask[rows]
                with self.amp():
                    logp, ent = self.policy_fwd(slice_prompts(batch, a, b, n_img), ids[rows], m, G,
                                                c.rollout.temperature or 1.0, entropy=True,
                                                entropy_grad=c.grpo.entropy_coef > 0)
                old = old_logp[rows] if old_logp is not None else logp.detach()
                per_tok = policy_loss(logp, old, adv[rows], m, c.grpo.clip_low, c.grpo.clip_high, c.grpo.dual_clip)
                if ref_logp is not None:
                    kl = kl_penalty(logp, ref_logp[rows], c.grpo.kl_estimator)
                    per_tok = per_tok + c.grpo.beta * kl * m
                    stats["kl"] += (kl.detach() * m).sum().item() / all_tok
                if c.grpo.entropy_coef > 0:
                    per_tok = per_tok - c.grpo.entropy_coef * ent * m
                    ent = ent.detach()
                # FSDP averages gradients over ranks: scale by W so they add up to the global loss's
                loss = self._micro_loss(per_tok, m, n_tok, (b - a) * G, mb * G * W) * W
                _check_finite(loss.detach(), "loss", step)
                loss.backward()
                stats["loss"] += loss.item() / W / n_updates
                stats["entropy"] += (ent * m).sum().item() / all_tok
                stats["clip_frac"] += clip_fraction(logp.detach(), old, adv[rows], m, c.grpo.clip_low,
                                                    c.grpo.clip_high).item() * m.sum().item() / all_tok
            if self.ptx_records is not None:
                stats["ptx"] = stats.get("ptx", 0.0) + self._ptx_backward(step, u) / n_updates
            gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.optim.grad_clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            _check_finite(gn, "gradient norm", step)
            stats["grad_norm"] += gn.item() / n_updates
            self.opt.step()
            self.sched.step()
        t_update = time.perf_counter() - t0
        # 7. record (figures of all ranks) ----------------------------------------------------
        if dist.active():
            summed = dist.all_reduce_sum(torch.tensor([stats[k] for k in ("loss", "kl", "clip_frac", "entropy")],
                                                      dtype=torch.float64))
            stats.update(zip(("loss", "kl", "clip_frac", "entropy"), summed.tolist()))
        local = (parts, gold, rewards.tolist(), ro.lengths.tolist(), float(batch["attention_mask"].sum()),
                 float(batch["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in batch else 0.0)
        ranks = dist.gather_objects(local)
        parts, gold = [p for r in ranks for p in r[0]], [g for r in ranks for g in r[1]]
        rewards = torch.tensor([x for r in ranks for x in r[2]])
        lengths = torch.tensor([x for r in ranks for x in r[3]], dtype=torch.float32)
        tokens = {"prompt": sum(r[4] for r in ranks), "image": sum(r[5] for r in ranks)}
        return self._metrics(step, parts, gold, rewards, lengths, tokens, stats, t_rollout, t_ref, t_update)

    def _ptx_backward(self, step: int, u: int) -> float:
        """Format anchor (grpo.ptx_coef > 0): backward of ptx_coef x `_ptx_loss`; returns the latter."""
        loss = self._ptx_loss(step, u)
        _check_finite(loss.detach(), "ptx loss", step)
        (self.cfg.grpo.ptx_coef * loss).backward()
        return loss.item()

    def _ptx_loss(self, step: int, u: int) -> torch.Tensor:
        """Cross-entropy of grpo.ptx_batch fresh warm-start demonstrations under the policy, on every
        token but the tag values (their random draws would pull the tags back to a coin; the reward
        alone decides them). As a loss term it holds the words nothing rewards (caption, restatement,
        answer wording) where the warm start put them, as InstructGPT's PPO-ptx holds pretraining
        text. Draws depend only on (seed, step, update, rank), so a resumed run repeats them."""
        c = self.cfg
        rng = random.Random(prompt_seed(c.train.seed, step, 1_000_003 + u * dist.world_size() + dist.rank()))
        recs = rng.sample(self.ptx_records, min(c.grpo.ptx_batch, len(self.ptx_records)))
        texts = [t(rng) if callable(t) else t for t in (r.meta["target"] for r in recs)]
        batch = {k: v.to(self.device) for k, v in
                 encode_prompts(self.processor, recs, c.data.prompt_style, c.data.max_prompt_length).items()}
        ids, mask = self._tokenize_completions([t + self._eos_text(self.policy) for t in texts],
                                               mask_tag_values=True)
        with self.amp():
            logp = self.policy_fwd(batch, ids, mask, 1, 1.0)                        # [B, T]
        return -masked_mean(logp, mask)

    def _encode(self, recs, rows) -> dict:
        """Prompt tensors of records (on the device); `rows` name them in errors."""
        c = self.cfg
        return {k: v.to(self.device) for k, v in
                encode_prompts(self.processor, recs, c.data.prompt_style, c.data.max_prompt_length, rows).items()}

    def _micro_loss(self, per_tok, m, n_tok, micro_rows, mini_rows):
        """This micro-batch's share of the mini-batch loss (so shares add up exactly)."""
        agg, nc = self.cfg.grpo.loss_agg, self.cfg.grpo.norm_constant
        if agg == "token-mean":
            return aggregate(per_tok, m, agg, norm_constant=n_tok.clamp(min=1))
        if agg == "seq-mean-token-mean":
            return aggregate(per_tok, m, agg, norm_constant=mini_rows)
        return aggregate(per_tok, m, agg, norm_constant=nc or self.cfg.rollout.max_new_tokens) * micro_rows / mini_rows

    @torch.no_grad()
    def _no_grad_logprobs(self, fwd, batch, ids, mask, n_img, micro):
        """Log-probs of the completions under `fwd.model` (reference or old policy), no grad."""
        was = fwd.model.training
        fwd.model.eval()
        G = self.cfg.rollout.group_size
        # under FSDP: gathered once for all micro-batches, and resharded on exit (a forward without
        # backward would otherwise leave the root unit holding a gathered copy that the next
        # optimizer step makes stale)
        with self.amp(), dist.gathered(fwd):
            out = torch.cat([fwd(slice_prompts(batch, a, b, n_img), ids[a * G:b * G], mask[a * G:b * G], G,
                                 self.cfg.rollout.temperature or 1.0)
                             for a, b in micro])
        fwd.model.train(was)
        return out

    def _metrics(self, step, parts, gold, rewards, lengths, tokens, stats, t_rollout, t_ref, t_update):
        G = self.cfg.rollout.group_size
        n = len(parts)
        tags = {"visual": "visual_safe", "text": "text_safe", "combined": "combined_safe"}
        zero_std = (rewards.view(-1, G).std(-1) == 0).float().mean().item()
        n_tokens = float(lengths.sum()) + tokens["prompt"]
        t_all = t_rollout + t_ref + t_update
        m = {"step": step + 1,
             "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
             "reward/format": sum(p["format"] for p in parts) / n,
             "reward/tag": sum(p["tag"] for p in parts) / n,
             "reward/behavior": sum(p["behavior"] for p in parts) / n}
        for short, tag in tags.items():
            m[f"tag_acc/{short}"] = sum(p["pred"][tag] == g[GOLD_KEYS[tag]] for p, g in zip(parts, gold)) / n
        m.update({"kl": stats["kl"], "clip_frac": stats["clip_frac"], "entropy": stats["entropy"],
                  "loss": stats["loss"], "grad_norm": stats["grad_norm"], **({"ptx": stats["ptx"]} if "ptx" in stats else {}), "lr": self.sched.get_last_lr()[0],
                  "response_len/mean": lengths.mean().item(), "response_len/max": lengths.max().item(),
                  "frac_truncated": (lengths >= self.cfg.rollout.max_new_tokens).float().mean().item(),
                  "frac_zero_std_groups": zero_std,
                  "time/rollout": t_rollout, "time/ref": t_ref, "time/update": t_update,
                  "tokens_per_s": n_tokens / t_all if t_all > 0 else 0.0,
                  "tokens/completion": float(lengths.sum()), "tokens/prompt": tokens["prompt"],
                  "tokens/image": tokens["image"]})
        return m

    def fit(self, init_path=None) -> Path:
        """Run GRPO for train.steps steps (from the last intact checkpoint when resuming); returns
        the final checkpoint."""
        c = self.cfg
        self.setup_grpo(init_path or self.model_dir)
        bar = tqdm(range(self.start_step, c.train.steps), desc="safegrpo", dynamic_ncols=True, mininterval=2,
                   initial=self.start_step, total=c.train.steps, disable=not dist.is_main())
        last = self.resume_from
        for step in bar:
            m = self.train_step(step)
            if c.train.eval_every and (step + 1) % c.train.eval_every == 0:
                m.update(self.validate())
            if dist.is_main():
                with open(self.out / "metrics.jsonl", "a") as fh:       # one write per line: whole or absent
                    fh.write(json.dumps(m) + "\n")
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", comb=f"{m['tag_acc/combined']:.2f}",
                            kl=f"{m['kl']:.4f}", refresh=False)
            if (c.train.save_every and (step + 1) % c.train.save_every == 0) or step + 1 == c.train.steps:
                last = self.save(step + 1)
        return last

    @torch.no_grad()
    def validate(self) -> dict:
        """Greedy evaluation of the current policy on the first train.eval_limit test records
        (all when 0): {"val/...": figure}, complete on rank 0 ({} elsewhere). Under torchrun each
        rank decodes a share of the records with the gathered policy and rank 0 scores them all."""
        c = self.cfg
        recs = self.test_records[:c.train.eval_limit or None]
        if not recs:
            return {}
        W, R = dist.world_size(), dist.rank()
        mine = list(range(R, len(recs), W))
        with self.amp(), dist.gathered(self.policy_fwd):
            texts = generate_completions(self.policy, self.processor, [recs[i] for i in mine], c.data.prompt_style,
                                         c.rollout.max_new_tokens, max_prompt_length=c.data.max_prompt_length)
        done = {i: t for r in dist.gather_objects(list(zip(mine, texts))) for i, t in r}
        if not dist.is_main():
            return {}
        m = score(recs, [done[i] for i in range(len(recs))], c.grpo.refusal_judge)
        out = {"val/reward/mean": m["reward_mean"], "val/format": m["format_rate"],
               "val/refusal_rate_unsafe": m["refusal_rate_unsafe"], "val/refusal_rate_safe": m["refusal_rate_safe"]}
        out.update({f"val/tag_acc/{k}": v for k, v in m["tag_acc"].items()})
        out.update({f"val/group_acc/{g}": v for g, v in m["group_acc"].items()})
        return out

    def save(self, step) -> Path:
        state = {"sampler": self.sampler.state(), "scheduler": self.sched.state_dict(),
                 "python_random": random.getstate(), "init_path": str(self.model_dir), "config": self.cfg.to_dict()}
        p = save_checkpoint(self.out / "checkpoints", step, self.policy, self.processor, self.opt, state)
        if dist.is_main():
            prune_checkpoints(self.out / "checkpoints", 3)
        return p


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, list) else x
