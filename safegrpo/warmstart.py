"""Before and beside GRPO: the warm start and the format anchor (docs/METHOD.md, "What this project adds").

    warm_start(...)          sft.caption_steps of caption pretraining, then sft.steps of
                             demonstration SFT (cross-entropy on the completion tokens)
    FormatAnchor.backward    anchor.coef x the cross-entropy of fresh demonstrations with the
                             three tag values masked out (eq. 10), once per optimizer update

1. Caption pretraining: image + "What does the image show?" -> "The image shows a X, a KIND."
   Short sequences teach a randomly initialised vision tower and LM to name what they see,
   the alignment a pretrained VLM brings with it.
2. Demonstration SFT: the step-guided prompt -> a demonstration in the target format. For
   SafeTag-Synth and Text-Safety rows the demonstration is drawn afresh at every use. Its tags
   follow sft.tags (synth.demonstration_tags): random teaches the format and an even coin on
   every tag, not memorised, input-dependent wrong tags; per_modality writes the right visual
   and text tags and the naive combined tag (unsafe if either side is): a start that judges each
   modality and misses every compositional risk; partial (configs/tiny.yaml) is per_modality
   with the gold combined tag on sft.partial_share of the compositional demonstrations, a start
   partly aware of compositional risks like the paper's pretrained models; per_modality_coin
   flips a coin for the combined tag where both sides are safe. Other data uses its fixed
   `demo` column.
3. The format anchor (not in the paper; InstructGPT's PPO-ptx idea): during GRPO the words
   nothing rewards (caption, restatement, answer wording) would random-walk away; the anchor
   holds them where the warm start put them, and teaches no safety because the tag values
   are left out of its loss.
Draws depend only on seeds (the anchor's on (seed, step, update, rank)), so a resumed run
repeats them.
"""
from __future__ import annotations

import json
import random
import re

import torch
from tqdm import tqdm

from .config import Config
from .data import synth, textsafety
from .data.records import SafeTagRecord
from .data.samplers import EpochSampler, prompt_seed
from .files import atomic_path
from .optim import autocast, check_finite, make_optimizer
from .rl.forward import completion_logprobs
from .rl.grpo import masked_mean
from .rl.rollout import completion_mask
from .safety.prompting import encode_prompts
from .safety.reward import TAGS

_TAG_VALUE = re.compile(r"<(" + "|".join(TAGS) + r")>(.*?)</\1>", re.IGNORECASE | re.DOTALL)


def demonstration_records(records: list[SafeTagRecord], tags: str = "random", share: float = 0.5,
                          topic: bool = False, compare: bool = False) -> list[SafeTagRecord]:
    """Records whose meta["target"] is their demonstration: a function of an rng where one can be
    drawn afresh (SafeTag-Synth, with `tags` and `share` as synth.demonstration_tags writes them,
    step 3 with the request's topic when `topic`, step 4 with the comparison when `compare`;
    Text-Safety), else the row's fixed `demo` text."""
    def fresh(r):
        if r.meta.get("concept"):
            return lambda rng: synth.demonstration(r, rng, tags, share, topic, compare)
        if r.meta.get("demo_source") == "textsafety":
            return lambda rng: textsafety.demonstration(r.prompt, rng)
        return r.meta["demo"]
    demos = [r for r in records if r.meta.get("demo")]
    if not demos:
        raise ValueError("the training records carry no 'demo' column, which sft and anchor.coef need "
                         "(SafeTag-Synth emits them; other data needs its own demonstrations)")
    return [SafeTagRecord(r.prompt, r.images, r.image_tag, r.text_tag, r.combine_tag, {"target": fresh(r)})
            for r in demos]


def tokenize_completions(tokenizer, texts: list[str], device, mask_tag_values: bool = False):
    """Padded ids [N, T] and loss mask [N, T]; with mask_tag_values, the tokens overlapping the
    value of a <visual_safe>/<text_safe>/<combined_safe> tag are left out of the mask."""
    enc = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=mask_tag_values) for t in texts]
    T = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((len(enc), T), tokenizer.pad_token_id, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
    mask = completion_mask(torch.tensor([len(e["input_ids"]) for e in enc]), T)
    if mask_tag_values:
        for i, (t, e) in enumerate(zip(texts, enc)):
            spans = [m.span(2) for m in _TAG_VALUE.finditer(t)]
            for j, (a, b) in enumerate(e["offset_mapping"]):
                if any(a < y and b > x for x, y in spans):
                    mask[i, j] = 0
    return ids.to(device), mask.to(device)


def eos_text(tokenizer, model) -> str:
    """The text of the token that ends a completion (the model's EOS id, else the tokenizer's)."""
    eos = model.generation_config.eos_token_id
    return tokenizer.convert_ids_to_tokens(eos) if isinstance(eos, int) else tokenizer.eos_token


def _targets(records, rng) -> list[str]:
    return [t(rng) if callable(t) else t for t in (r.meta["target"] for r in records)]


def cross_entropy_stage(model, processor, records, prompt_style: str, steps: int, lr: float, cfg: Config,
                        device, log_path) -> None:
    """`steps` of AdamW on the cross-entropy of each record's meta["target"] after its prompt
    (warm-up then cosine to 0); one JSON line per step in log_path (written whole at the end)."""
    s, tok = cfg.sft, getattr(processor, "tokenizer", processor)
    opt, sched = make_optimizer(model, lr, cfg.optim, s.warmup_steps, steps, "cosine")
    sampler = EpochSampler(len(records), cfg.train.seed + 1)
    rng = random.Random(cfg.train.seed + 2)                  # draws for targets given as rng -> text
    eos = eos_text(tok, model)
    model.train()
    bar = tqdm(range(steps), desc=log_path.stem.removesuffix("_metrics"), dynamic_ncols=True, mininterval=2)
    with atomic_path(log_path) as tmp, open(tmp, "w") as log:
        for step in bar:
            recs = [records[i] for i in sampler.take(s.batch_size)]
            batch = {k: v.to(device) for k, v in
                     encode_prompts(processor, recs, prompt_style, cfg.data.max_prompt_length).items()}
            ids, mask = tokenize_completions(tok, [t + eos for t in _targets(recs, rng)], device)
            with autocast(device, cfg.model.autocast == "bf16"):
                logp = completion_logprobs(model, batch, ids, mask, 1)
            loss = -masked_mean(logp, mask)
            check_finite(loss.detach(), f"{log_path.stem} loss", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            log.write(json.dumps({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]}) + "\n")


def warm_start(model, processor, train_records, cfg: Config, device, out_dir) -> None:
    """Caption pretraining (sft.caption_steps) then demonstration SFT (sft.steps) of `model`,
    in place; logs caption_metrics.jsonl and sft_metrics.jsonl under out_dir."""
    s = cfg.sft
    demos = [r for r in train_records if r.meta.get("demo")]
    if not demos:
        raise ValueError("sft.enabled but the training records carry no 'demo' column "
                         "(SafeTag-Synth emits them; other data needs its own demonstrations)")
    if s.caption_steps:
        captions = [SafeTagRecord(synth.CAPTION_QUESTION, r.images, r.image_tag, r.text_tag, r.combine_tag,
                                  {"target": synth.caption_demo(r)}) for r in demos]
        cross_entropy_stage(model, processor, captions, "none", s.caption_steps, s.caption_lr, cfg, device,
                            out_dir / "caption_metrics.jsonl")
    if s.steps:
        demos = demonstration_records(train_records, s.tags, s.partial_share, s.step3 == "topic",
                                     s.step4 == "compare")
        cross_entropy_stage(model, processor, demos, cfg.data.prompt_style, s.steps, s.lr, cfg, device,
                            out_dir / "sft_metrics.jsonl")


class FormatAnchor:
    """anchor.coef > 0: the cross-entropy of anchor.batch fresh demonstrations under the
    policy, on every token but the tag values (eq. 10). Their tags are always random (whatever
    sft.tags is): the answer follows the written combined tag, so an even coin keeps the anchor
    from teaching any refuse-or-help choice."""

    def __init__(self, train_records, processor, cfg: Config, device):
        self.records = demonstration_records(train_records, topic=cfg.sft.step3 == "topic",   # steps 3-4 as the warm start's
                                            compare=cfg.sft.step4 == "compare")
        self.processor, self.cfg, self.device = processor, cfg, device
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def loss(self, policy_fwd, step: int, update: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        c = self.cfg
        rng = random.Random(prompt_seed(c.train.seed, step, 1_000_003 + update * world + rank))
        recs = rng.sample(self.records, min(c.anchor.batch, len(self.records)))
        texts = _targets(recs, rng)
        batch = {k: v.to(self.device) for k, v in
                 encode_prompts(self.processor, recs, c.data.prompt_style, c.data.max_prompt_length).items()}
        eos = eos_text(self.tokenizer, policy_fwd.model)
        ids, mask = tokenize_completions(self.tokenizer, [t + eos for t in texts], self.device, mask_tag_values=True)
        with autocast(self.device, c.model.autocast == "bf16"):
            logp = policy_fwd(batch, ids, mask, 1, 1.0)                        # [B, T]
        return -masked_mean(logp, mask)

    def backward(self, policy_fwd, step: int, update: int, rank: int = 0, world: int = 1) -> float:
        """Backward of anchor.coef x the anchor loss; returns the loss."""
        loss = self.loss(policy_fwd, step, update, rank, world)
        check_finite(loss.detach(), "ptx loss", step)
        (self.cfg.anchor.coef * loss).backward()
        return loss.item()
