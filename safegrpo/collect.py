"""Steps 1-3 of a GRPO step: this rank's prompts, G sampled completions each, and their rewards.

    Collector.collect(step)   -> Groups     draw the step's prompts (data/samplers.py), take this
                                            rank's share, encode, roll out (rl/rollout.py), score;
                                            with DAPO (grpo.filter_zero_std + oversample) draw more
                                            until enough groups have reward spread
    Groups                                  what a rank holds of a step: records, encoded prompts,
                                            the rollout (G rows per prompt), reward parts, rewards

The reward (ALGO LOGIC) is the SafeGRPO rule, safety/reward.reward_breakdown, with the weights
reward.tag_weight / reward.behavior_weight, or a plug-in (reward.plugin, rl/reward_fn.py) that replaces
its total. Each prompt samples from its own seed (from the step and its position in the step's
draw), so where and when it is decoded does not matter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed as dist
from .config import Config
from .data.samplers import prompt_seed, rank_share
from .loggers import RankResult
from .optim import NonFiniteError
from .policy import Policy
from .rl.reward_fn import PluginReward
from .rl.rollout import Rollout, decode_completions, generate
from .safety.judge import refusal_rule
from .safety.prompting import encode_prompts
from .safety.reward import reward_breakdown


@dataclass
class Groups:
    """This rank's groups of a step: records, their positions in the step's draw, the encoded
    prompts, the rollout (G rows per record), the reward breakdowns and rewards [N]."""
    recs: list
    positions: list[int]
    batch: dict
    ro: Rollout
    parts: list[dict]         # reward breakdown per completion (safety/reward.reward_breakdown)
    gold: list[dict]          # gold tags per completion
    rewards: torch.Tensor     # [N = n * G]
    G: int
    errors: int = 0           # plug-in reward calls that raised (scored 0)
    timeouts: int = 0         # plug-in reward calls stopped at reward.timeout_s (scored 0)

    @property
    def n(self) -> int:
        return len(self.recs)

    @property
    def images(self) -> list[int]:
        return [len(r.images) for r in self.recs]

    def with_spread(self) -> list[int]:
        """Indices of the groups whose rewards have spread (DAPO: the others carry no advantage)."""
        return [i for i in range(self.n) if self.rewards[i * self.G:(i + 1) * self.G].std() > 0]

    def informative(self, encode) -> "Groups":
        """These groups without those whose rewards have no spread (prompts encoded anew)."""
        keep = self.with_spread()
        if len(keep) == self.n:
            return self
        rows = [i * self.G + g for i in keep for g in range(self.G)]
        batch = encode([self.recs[i] for i in keep], keep) if keep else {}
        T = int(self.ro.lengths[rows].max()) if rows else 1
        full = self.ro.full_logprobs
        ro = Rollout(self.ro.completion_ids[rows, :T], self.ro.lengths[rows], self.G,
                     logprobs=self.ro.logprobs[rows, :T], full_logprobs=full[rows, :T] if full is not None else None)
        return Groups([self.recs[i] for i in keep], [self.positions[i] for i in keep], batch, ro,
                      [self.parts[r] for r in rows], [self.gold[r] for r in rows], self.rewards[rows], self.G)

    def concat(self, other: "Groups", pad_id: int, encode) -> "Groups":
        """These groups followed by other's (prompts encoded anew together)."""
        recs = self.recs + other.recs
        T = max(self.ro.completion_ids.shape[1], other.ro.completion_ids.shape[1])
        pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)     # noqa: E731
        both = lambda a, b, v: torch.cat([pad(a, v), pad(b, v)]) if a is not None else None   # noqa: E731
        ro = Rollout(both(self.ro.completion_ids, other.ro.completion_ids, pad_id),
                     torch.cat([self.ro.lengths, other.ro.lengths]), self.G,
                     max(self.ro.peak_cached_tokens, other.ro.peak_cached_tokens),
                     logprobs=both(self.ro.logprobs, other.ro.logprobs, 0.0),
                     full_logprobs=both(self.ro.full_logprobs, other.ro.full_logprobs, 0.0))
        return Groups(recs, self.positions + other.positions, encode(recs, list(range(len(recs)))), ro,
                      self.parts + other.parts, self.gold + other.gold, torch.cat([self.rewards, other.rewards]), self.G,
                      self.errors + other.errors, self.timeouts + other.timeouts)

    def report(self, contrast_column: str = "") -> RankResult:
        """What this rank reports for the step's metrics (loggers.step_metrics); contrast_column:
        data.contrast_column (marks the completions of contrast-set records, for push/decoys)."""
        b = self.batch
        return RankResult(self.parts, self.gold, self.rewards.tolist(), self.ro.lengths.tolist(),
                          float(b["attention_mask"].sum()),
                          float(b["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in b else 0.0,
                          self.errors, self.timeouts,
                          [bool(contrast_column and r.meta.get(contrast_column)) for r in self.recs for _ in range(self.G)])


class Reward:
    """The reward of step 3 (ALGO LOGIC): the SafeGRPO rule with the weights reward.tag_weight /
    reward.behavior_weight, or a plug-in (reward.plugin) that replaces its total. Built at start-up,
    so that a plug-in that does not import is named before the warm start."""

    def __init__(self, cfg: Config):
        r = cfg.reward
        self.weights = (r.tag_weight, r.behavior_weight)
        self.refusal = refusal_rule(r.refusal_judge)
        self.plugin = PluginReward(r.plugin, r.timeout_s, r.workers) if r.plugin else None

    def __call__(self, texts: list[str], recs: list, labels: list[str]) -> tuple[list[dict], int, int]:
        """(reward breakdown per completion, plug-in errors, plug-in timeouts); texts: G
        completions per record of recs, in order; labels name them in a plug-in's errors."""
        G = len(texts) // max(1, len(recs))
        parts = [reward_breakdown(t, r.tags, self.refusal, self.weights)        # logged in any case
                 for t, r in zip(texts, (r for r in recs for _ in range(G)))]
        if self.plugin is None:
            return parts, 0, 0
        infos = [{**{k: v for k, v in r.meta.items() if k != "demo"}, **r.tags} for r in recs for _ in range(G)]
        out = self.plugin(texts, infos, labels)
        for p, s in zip(parts, out.scores):
            p["total"] = s
        return parts, len(out.errors), len(out.timeouts)

    def close(self) -> None:
        """Stop the plug-in's worker processes (if any)."""
        if self.plugin is not None:
            self.plugin.close()


class Collector:
    """Prompts, rollouts and rewards of GRPO steps (steps 1-3) for one rank."""

    def __init__(self, cfg: Config, policy: Policy, processor, records: list, sampler, reward: Reward, engine=None):
        """engine: a VLLMEngine (rollout.engine: vllm; synced from the policy before each step's
        rollout), or None for our engine (rl/rollout.py)."""
        self.cfg, self.policy, self.processor, self.records, self.sampler = cfg, policy, processor, records, sampler
        self.reward, self.engine = reward, engine
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.G = cfg.rollout.group_size

    def encode(self, recs, rows) -> dict:
        """Prompt tensors of records (on the device); `rows` name them in errors."""
        d = self.cfg.data
        return {k: v.to(self.policy.device) for k, v in
                encode_prompts(self.processor, recs, d.prompt_style, d.max_prompt_length, rows).items()}

    def collect(self, step: int) -> tuple[Groups, dict]:
        """The step's groups (and DAPO's counts). With grpo.filter_zero_std and grpo.oversample,
        more prompts are drawn (the same on every rank, at new positions, so with new seeds)
        until prompts_per_step groups over all ranks have reward spread, or (1 + oversample) x
        prompts_per_step prompts have been drawn."""
        if self.engine is not None:                     # the rollout always from the current policy
            self.engine.sync(self.policy.model)
        try:
            return self._collect(step)
        finally:
            if self.engine is not None:                 # (rollout.vllm.sleep) its memory is the update's now
                self.engine.sleep()

    def _collect(self, step: int) -> tuple[Groups, dict]:
        g, tr, W, R = self.cfg.grpo, self.cfg.train, dist.world_size(), dist.rank()
        positions, records = rank_share(self.sampler.take(tr.prompts_per_step), tr.mini_batch_prompts, W, R)
        groups = self.groups(step, positions, records)
        if not g.filter_zero_std:
            return groups, {}
        count = lambda x: int(dist.all_reduce_sum(torch.tensor(x)))                   # noqa: E731  (over all ranks)
        drawn, cap = tr.prompts_per_step, int((1 + g.oversample) * tr.prompts_per_step)
        have = count(len(groups.with_spread()))
        while g.oversample and have < tr.prompts_per_step and drawn < cap:
            missing = min(tr.prompts_per_step - have, cap - drawn)
            k = -(-missing // W) * W                  # rounded up to a multiple of W: each rank takes k / W
            extra = self.sampler.take(k)
            mine = range(R * k // W, (R + 1) * k // W)
            groups = groups.concat(self.groups(step, [drawn + i for i in mine], [extra[i] for i in mine]),
                                   self.tokenizer.pad_token_id, self.encode)
            drawn += k
            have = count(len(groups.with_spread()))
        return groups, {"dapo/kept": have, "dapo/dropped": count(groups.n) - have,
                        "dapo/refilled": drawn - tr.prompts_per_step}

    def groups(self, step: int, positions: list[int], records: list[int]) -> Groups:
        """Encode, roll out and score these records (the reward: `Reward`)."""
        recs = [self.records[i] for i in records]
        batch = self.encode(recs, records)
        ro = self.rollout(step, batch, positions, recs)
        texts = decode_completions(self.tokenizer, ro.completion_ids, ro.lengths)
        gold = [r.tags for r in recs for _ in range(self.G)]
        labels = [f"step {step + 1}, {r.origin or f'record {i}'}, sample {g}" for r, i in zip(recs, records)
                  for g in range(self.G)]
        parts, errors, timeouts = self.reward(texts, recs, labels)
        rewards = torch.tensor([p["total"] for p in parts], dtype=torch.float32)         # [N]
        return Groups(recs, positions, batch, ro, parts, gold, rewards, self.G, errors, timeouts)

    def rollout(self, step: int, batch: dict, positions: list[int], recs: list) -> Rollout:
        """G completions per prompt from the gathered policy, continuously batched under
        rollout.max_batch_tokens, each prompt from its own seed; or from vLLM."""
        c, model = self.cfg, self.policy.model
        if self.engine is not None:
            return self.engine.generate(batch, [r.images for r in recs], group_size=self.G,
                                        max_new_tokens=c.rollout.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                        temperature=c.rollout.temperature, top_p=c.rollout.top_p)
        model.eval()
        try:
            with self.policy.amp(), dist.gathered(self.policy.fwd):
                return generate(model, batch, group_size=self.G, max_new_tokens=c.rollout.max_new_tokens,
                                eos_token_id=model.generation_config.eos_token_id,
                                pad_token_id=self.tokenizer.pad_token_id, temperature=c.rollout.temperature,
                                top_p=c.rollout.top_p, seeds=[prompt_seed(c.train.seed, step, i) for i in positions],
                                max_batch_tokens=c.rollout.max_batch_tokens)
        except FloatingPointError as e:
            raise NonFiniteError(f"non-finite policy at step {step} ({e}); stopping without writing a checkpoint "
                                 "of this state. Lower optim.lr or resume from the last checkpoint.") from None
