"""The SafeGRPO training loop. `Trainer.train_step` reads top to bottom like the seven steps of
one GRPO step (docs/DESIGN.md):

    1 prompts    draw the step's records; this rank's share becomes step-guided chat prompts
    2 rollout    sample G completions per prompt (rl/rollout.py)
    3 reward     decode and score each completion with the rule reward (safety/reward.py)
    4 advantage  group-relative, eq. (4)
    5 logprobs   reference (if beta > 0) and old policy (if the rollout feeds > 1 update), no grad
    6 update     per mini-batch: rl/grpo.grpo_loss per forward/backward pass, (+ the format
                 anchor), gradient clip, AdamW step; the schedule advances per update
    7 record     one JSON line in metrics.jsonl; validation and checkpoints every N steps

The policy, reference, optimizer, sampler and anchor are born in `setup`; all state lives here,
the math in rl/grpo.py, the warm start in warmstart.py. Lines marked ALGO LOGIC are where a
researcher changes what is optimised; the rest moves data.
Under torchrun every rank runs this same code on its share of the prompts (distributed.py).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import CheckpointError, claim_run_dir, load_trainer_state, lock_run_dir, prune_checkpoints, resumable_checkpoint, save_checkpoint
from .config import Config, save_config
from .data import synth
from .data.records import load_safetag
from .data.samplers import make_sampler, prompt_seed
from .data.tiny_model import build_tiny_model_dir
from .eval.metrics import evaluate as evaluate_model, generate_completions, score
from .files import atomic_path, write_atomic
from .loggers import Loggers, check_trackers
from .lora import apply_lora, base_fingerprint, check_base, check_targets, logprobs as lora_logprobs, read_adapter
from .memory import MemoryPlan, device_memory, model_size, plan_memory, prompt_copies
from .model import disable_dropout, load_model, load_processor, max_pixels, model_skeleton, resolve_model_path
from .optim import NonFiniteError, NothingToLearnError, autocast, check_finite, make_optimizer
from .rl.batching import micro_batches, slice_prompts, split_to
from .rl.decode import decode_path, lean_supported
from .rl.forward import completion_logprobs
from .rl.grpo import group_advantages, grpo_loss
from .rl.reward_fn import PluginReward
from .rl.rollout import Rollout, decode_completions, generate, kv_plan
from .safety.judge import refusal_rule
from .safety.prompting import encode_prompts, prompt_lengths
from .safety.reward import GOLD_KEYS, SHORT_NAMES, TAGS, reward_breakdown
from .warmstart import FormatAnchor, warm_start

__all__ = ["Trainer", "NonFiniteError", "NothingToLearnError"]


@dataclass
class Layout:
    """Which prompts of a GRPO step this rank owns. Every rank draws the same prompts; mini-batch
    u is global positions [u*MB, (u+1)*MB) whatever the world size, split evenly over the ranks."""
    positions: list[int]      # global positions in the step's draw, in this rank's order
    records: list[int]        # the training records at those positions
    mini: int                 # this rank's prompts per mini-batch


@dataclass
class Groups:
    """This rank's groups of a step: records, their positions in the step's draw, the encoded
    prompts, the rollout (G rows per record), the reward breakdowns and rewards [N]."""
    recs: list
    positions: list[int]
    batch: dict
    ro: Rollout
    parts: list[dict]
    gold: list[dict]
    rewards: torch.Tensor
    G: int
    errors: int = 0           # plug-in reward calls that raised (scored 0)
    timeouts: int = 0         # plug-in reward calls stopped at grpo.reward_timeout_s (scored 0)

    @property
    def n(self) -> int:
        return len(self.recs)

    @property
    def images(self) -> list[int]:
        return [len(r.images) for r in self.recs]

    def spread(self) -> list[int]:
        """The groups whose rewards have spread (DAPO: the others carry no advantage)."""
        return [i for i in range(self.n) if self.rewards[i * self.G:(i + 1) * self.G].std() > 0]

    def informative(self, encode) -> "Groups":
        """These groups without those whose rewards have no spread (prompts encoded anew)."""
        keep = self.spread()
        if len(keep) == self.n:
            return self
        rows = [i * self.G + g for i in keep for g in range(self.G)]
        batch = encode([self.recs[i] for i in keep], keep) if keep else {}
        T = int(self.ro.lengths[rows].max()) if rows else 1
        ro = Rollout(self.ro.completion_ids[rows, :T], self.ro.lengths[rows], self.G)
        return Groups([self.recs[i] for i in keep], [self.positions[i] for i in keep], batch, ro,
                      [self.parts[r] for r in rows], [self.gold[r] for r in rows], self.rewards[rows], self.G)

    def concat(self, other: "Groups", pad_id: int, encode) -> "Groups":
        """These groups followed by other's (prompts encoded anew together)."""
        recs = self.recs + other.recs
        T = max(self.ro.completion_ids.shape[1], other.ro.completion_ids.shape[1])
        pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=pad_id)     # noqa: E731
        ro = Rollout(torch.cat([pad(self.ro.completion_ids), pad(other.ro.completion_ids)]),
                     torch.cat([self.ro.lengths, other.ro.lengths]), self.G,
                     max(self.ro.peak_cached_tokens, other.ro.peak_cached_tokens))
        return Groups(recs, self.positions + other.positions, encode(recs, list(range(len(recs)))), ro,
                      self.parts + other.parts, self.gold + other.gold, torch.cat([self.rewards, other.rewards]), self.G,
                      self.errors + other.errors, self.timeouts + other.timeouts)


@dataclass
class RankResult:
    """What each rank reports of its rollout, gathered for the step's metrics."""
    parts: list[dict]         # reward breakdown per completion
    gold: list[dict]          # gold tags per completion
    rewards: list[float]
    lengths: list[int]
    prompt_tokens: float
    image_tokens: float
    errors: int = 0
    timeouts: int = 0


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        """Everything a run needs before its models: the run directory (claimed for this run:
        see checkpoint.claim_run_dir), the processor, and the data, checked when loaded."""
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.train.out_dir)
        if dist.is_main():
            self._lock = lock_run_dir(self.out)             # one live run per directory
            claim_run_dir(self.out, resume, overwrite)
        self.resume_from = resumable_checkpoint(self.out / "checkpoints", cfg, say=print if dist.is_main() else None) \
            if resume else None
        if self.resume_from is not None and cfg.model.lora.rank > 0:
            self._check_base(self.resume_from)              # the base the adapter was trained on, now
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = torch.device(cfg.train.device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self.G = cfg.rollout.group_size                     # samples per prompt
        self.temperature = cfg.rollout.temperature          # of sampling, and so of every log-prob
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        if not dist.is_main():
            dist.barrier()                      # rank 0 generates data and builds the tiny model first
        self.model_dir = self._model_dir()
        self.processor = load_processor(self.model_dir, cfg.model.trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.train_records, self.test_records = self._load_data()
        if dist.is_main():
            dist.barrier()
        check_trackers(cfg)                                 # a missing extra is named now, not after the warm start
        if cfg.model.lora.rank > 0:                         # so are target modules the model does not have
            check_targets(model_skeleton(self.model_dir, cfg.model.trust_remote_code), cfg.model.lora)
        self.refusal = refusal_rule(cfg.grpo.refusal_judge)
        self.reward_plugin = PluginReward(cfg.grpo.reward, cfg.grpo.reward_timeout_s, cfg.grpo.reward_workers) if cfg.grpo.reward else None
        if dist.is_main():
            save_config(cfg, self.out / "config.yaml")

    @staticmethod
    def _check_base(ckpt, base=None):
        try:
            check_base(ckpt, base)
        except RuntimeError as e:
            raise CheckpointError(str(e)) from None

    # --------------------------------------------------------------------------------- data
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
        r = self.cfg.rollout
        longest = max((n for n in lengths if n <= d.max_prompt_length or not d.filter_overlong_prompts), default=0)
        if r.max_batch_tokens:            # the KV budget must hold the longest prompt and one full row, now
            kv_plan(r.max_batch_tokens, longest, r.group_size, r.max_new_tokens, 1)
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

    def encode(self, recs, rows) -> dict:
        """Prompt tensors of records (on the device); `rows` name them in errors."""
        c = self.cfg
        return {k: v.to(self.device) for k, v in
                encode_prompts(self.processor, recs, c.data.prompt_style, c.data.max_prompt_length, rows).items()}

    # --------------------------------------------------------------------------------- models
    def amp(self):
        """bf16 autocast around model forwards when model.autocast is set (else a no-op)."""
        return autocast(self.device, self.cfg.model.autocast == "bf16")

    def load_model(self, path):
        """A model directory as this run loads its models (dtype, attention, device, checkpointing)."""
        m = load_model(path, self.dtype, self.cfg.model.attn_implementation or None,
                       self.cfg.model.trust_remote_code, self.device)
        if self.cfg.model.gradient_checkpointing:
            getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
        return m

    def warm_start(self) -> Path:
        """The model GRPO starts from: out_dir/sft after the warm start when sft.enabled (trained
        by rank 0, written atomically, reused when resuming), else the model directory."""
        c = self.cfg
        if not (c.sft.enabled and (c.sft.steps > 0 or c.sft.caption_steps > 0)):
            return self.model_dir
        sft_dir = self.out / "sft"
        if dist.is_main() and not (self.resume and (sft_dir / "config.json").is_file()):   # the others wait
            model = self.load_model(self.model_dir)
            t0 = time.time()
            warm_start(model, self.processor, self.train_records, c, self.device, self.out)
            print(f"[sft] {c.sft.caption_steps} caption + {c.sft.steps} demonstration steps in {time.time() - t0:.0f} s")
            with atomic_path(sft_dir, ours=lambda p: True) as tmp:     # a run file (checkpoint.RUN_FILES)
                model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
        dist.barrier()
        return sft_dir

    def setup(self, init_path) -> None:
        """Policy (from the resumed checkpoint, else init_path), reference (init_path, frozen,
        only when beta > 0), optimizer and schedule, prompt sampler and format anchor; restores
        their states when resuming."""
        c, tr = self.cfg, self.cfg.train
        ckpt = self.resume_from
        self.plan_memory(init_path)
        self.init_path = init_path
        self.lora = c.model.lora.rank > 0           # adapters train; the reference is the adapter-free network
        self.policy = self.load_model(init_path if self.lora else ckpt or init_path)
        if self.lora:
            apply_lora(self.policy, c.model.lora, seed=tr.seed)
            self.base_fingerprint = base_fingerprint(init_path)
            if ckpt is not None:
                self._check_base(ckpt, init_path)
                read_adapter(ckpt, self.policy)
        disable_dropout(self.policy)                # after the adapters: their lora_dropout too
        if dist.is_main():
            print(f"[rollout] decode path: {decode_path(self.policy)}")
            if c.rollout.top_p < 1:
                print(f"[rollout] warning: rollout.top_p={c.rollout.top_p} < 1 samples from the nucleus, but the "
                      "log-probs of the update use the full softmax, so the update is off-policy")
        if c.grpo.freeze_vision_tower and not self.lora:
            visual = getattr(getattr(self.policy, "model", None), "visual", None)
            if visual is None:
                raise ValueError("grpo.freeze_vision_tower is set but the model has no vision tower (model.visual)")
            visual.requires_grad_(False)
        self.has_ref = c.grpo.beta > 0
        self.ref = None
        if self.has_ref and not self.lora:
            self.ref = disable_dropout(self.load_model(init_path)).eval().requires_grad_(False)
        # our forward code runs inside these modules, so that FSDP2's root hooks wrap it
        self.policy_fwd = dist.Forward(self.policy, lora_logprobs if self.lora else dist.logprobs_all_params)
        self.ref_fwd = dist.Forward(self.ref, completion_logprobs) if self.ref is not None else self.policy_fwd
        if dist.active():                 # bf16 autocast: FSDP2 gathers bf16 copies of the fp32 shards
            dist.shard(self.policy_fwd, mixed_precision=c.model.autocast == "bf16")
            if self.ref is not None:
                dist.shard(self.ref_fwd, mixed_precision=c.model.autocast == "bf16")
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]     # (after sharding: DTensors)
        # tokens a pass runs per prompt token: 1, or G under Hugging Face's checkpointing (memory.prompt_copies)
        self.prompt_copies = prompt_copies(c.model.gradient_checkpointing, not lean_supported(self.policy), self.G)
        # the schedule steps once per optimizer update; warm-up and decay are given in GRPO steps
        n = self.updates_per_step = tr.prompts_per_step // tr.mini_batch_prompts
        self.opt, self.sched = make_optimizer(self.policy, c.optim.lr, c.optim, c.optim.warmup_steps * n, tr.steps * n,
                                              c.optim.schedule)
        self.sampler = make_sampler(self.train_records, c.data, tr.seed)
        self.anchor = FormatAnchor(self.train_records, self.processor, c, self.device) if c.grpo.ptx_coef > 0 else None
        self.start_step = 0
        if ckpt is not None:
            st = load_trainer_state(ckpt, self.opt, model=self.policy if dist.active() else None)
            self.sched.load_state_dict(st["scheduler"])
            self.sampler.load(st["sampler"])
            random.setstate(_to_tuple(st["python_random"]))
            self.start_step = st["step"]
        if dist.is_main() and self.resume:       # drop metrics of steps after the checkpoint (all, without one)
            self._truncate_metrics(self.start_step)
            if ckpt is not None:
                print(f"[resume] from {ckpt} (step {self.start_step})")

    def plan_memory(self, path) -> MemoryPlan | None:
        """The memory plan of this config and model (memory.py), printed by rank 0; stops with
        MemoryPlanError when a phase would not fit (train.check_memory)."""
        from transformers import AutoConfig
        dir_, gguf = resolve_model_path(path)
        try:
            model_config = AutoConfig.from_pretrained(dir_, gguf_file=gguf, trust_remote_code=self.cfg.model.trust_remote_code)
            size = model_size(model_config, self.cfg.grpo.freeze_vision_tower)
        except Exception as e:           # an architecture the meta-device count cannot build: no plan
            if dist.is_main():
                print(f"[memory] no plan ({type(e).__name__}: {e})")
            return None
        plan = plan_memory(self.cfg, size, dist.world_size(), device_memory(self.device))
        if dist.is_main():
            print(f"[memory] {plan.table()}")
        if self.cfg.train.check_memory:
            plan.check()
        return plan

    # ----------------------------------------------------------------------------- one step
    def layout(self, step: int) -> Layout:
        """Draw the step's prompts (the same on every rank) and take this rank's share."""
        tr, W, R = self.cfg.train, dist.world_size(), dist.rank()
        everyone = self.sampler.take(tr.prompts_per_step)
        mb = tr.mini_batch_prompts // W
        pos = [u * mb * W + R * mb + k for u in range(self.updates_per_step) for k in range(mb)]
        return Layout(pos, [everyone[i] for i in pos], mb)

    def train_step(self, step: int) -> dict:
        c, G = self.cfg, self.G
        # 1-3. prompts, rollout, reward (with DAPO: groups without reward spread leave, more are drawn)
        t0 = time.perf_counter()
        sampled, dapo = self.collect(step)
        grp = sampled.informative(self.encode) if c.grpo.filter_zero_std else sampled
        t_rollout = time.perf_counter() - t0
        # 4. advantage (ALGO LOGIC: groups are whole on each rank; batch std over all ranks) -------
        batch_std = dist.global_std(grp.rewards) if c.grpo.adv_scale == "batch" else None
        adv = group_advantages(grp.rewards, G, c.grpo.adv_scale, c.grpo.adv_eps, batch_std).to(self.device) \
            if grp.n else grp.rewards.to(self.device)                                              # [N]
        # 5. log-probs without grad: reference, and the old policy when a rollout feeds > 1 update
        t0 = time.perf_counter()
        passes = self.plan_passes(grp)                       # per mini-batch: prompt ranges of its passes
        ref_logp = self.no_grad_logprobs(self.ref_fwd, grp, passes, sampled, reference=True) if self.has_ref else None
        old_logp = self.no_grad_logprobs(self.policy_fwd, grp, passes, sampled) if self.updates_per_step > 1 else None
        t_ref = time.perf_counter() - t0
        # 6. update -------------------------------------------------------------------------------
        t0 = time.perf_counter()
        stats = self.update(step, grp, adv, old_logp, ref_logp, passes, spare=sampled)
        t_update = time.perf_counter() - t0
        # 7. record (figures of all ranks, over every sampled completion) ----------------------------
        b = sampled.batch
        mine = RankResult(sampled.parts, sampled.gold, sampled.rewards.tolist(), sampled.ro.lengths.tolist(),
                          float(b["attention_mask"].sum()),
                          float(b["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in b else 0.0,
                          sampled.errors, sampled.timeouts)
        return {**self.metrics(step, dist.gather_objects(mine), stats, (t_rollout, t_ref, t_update)), **dapo}

    def sample(self, step: int, positions: list[int], records: list[int]) -> Groups:
        """Steps 1-3 for this rank's prompts: encode, roll out, score (ALGO LOGIC: the reward)."""
        recs = [self.train_records[i] for i in records]
        batch = self.encode(recs, records)
        ro = self.rollout(step, batch, positions)
        texts = decode_completions(self.tokenizer, ro.completion_ids, ro.lengths)
        gold = [r.tags for r in recs for _ in range(self.G)]
        weights = (self.cfg.grpo.tag_weight, self.cfg.grpo.behavior_weight)
        parts = [reward_breakdown(t, g, self.refusal, weights) for t, g in zip(texts, gold)]   # logged in any case
        errors = timeouts = 0
        if self.reward_plugin is not None:                      # grpo.reward: a plug-in decides the reward
            infos = [{**{k: v for k, v in r.meta.items() if k != "demo"}, **r.tags} for r in recs for _ in range(self.G)]
            labels = [f"step {step + 1}, {r.origin or f'record {i}'}, sample {g}" for r, i in zip(recs, records)
                      for g in range(self.G)]
            out = self.reward_plugin(texts, infos, labels)
            for p, s in zip(parts, out.scores):
                p["total"] = s
            errors, timeouts = len(out.errors), len(out.timeouts)
        rewards = torch.tensor([p["total"] for p in parts], dtype=torch.float32)         # [N]
        return Groups(recs, positions, batch, ro, parts, gold, rewards, self.G, errors, timeouts)

    def collect(self, step: int) -> tuple[Groups, dict]:
        """The step's groups. With grpo.filter_zero_std and grpo.oversample, more prompts are drawn
        (the same on every rank, new positions so new seeds) until prompts_per_step groups over
        all ranks have reward spread, or (1 + oversample) x prompts_per_step have been drawn."""
        g, tr, W, R = self.cfg.grpo, self.cfg.train, dist.world_size(), dist.rank()
        lay = self.layout(step)
        groups = self.sample(step, lay.positions, lay.records)
        if not g.filter_zero_std:
            return groups, {}
        count = lambda x: int(dist.all_reduce_sum(torch.tensor(x)))                   # noqa: E731
        drawn, cap = tr.prompts_per_step, int((1 + g.oversample) * tr.prompts_per_step)
        have = count(len(groups.spread()))
        while g.oversample and have < tr.prompts_per_step and drawn < cap:
            k = -(-min(tr.prompts_per_step - have, cap - drawn) // W) * W                # a multiple of W
            extra = self.sampler.take(k)
            mine = list(range(R * k // W, (R + 1) * k // W))
            groups = groups.concat(self.sample(step, [drawn + i for i in mine], [extra[i] for i in mine]),
                                   self.tokenizer.pad_token_id, self.encode)
            drawn += k
            have = count(len(groups.spread()))
        return groups, {"dapo/kept": have, "dapo/dropped": count(groups.n) - have,
                        "dapo/refilled": drawn - tr.prompts_per_step}

    def plan_passes(self, grp: Groups) -> list[list]:
        """Per mini-batch, the prompt ranges [a, b) of its forward/backward passes (rl/batching.py),
        the same number on every rank (FSDP's collectives pair up pass by pass): a rank with too
        few prompts for them runs zero-weight passes (None)."""
        tr, U = self.cfg.train, self.updates_per_step
        # a pass's cost: the tokens it runs (each prompt once, or G times: memory.prompt_copies)
        costs = (self.prompt_copies * grp.batch["attention_mask"].sum(-1).cpu() + grp.ro.lengths.view(-1, self.G).sum(-1).cpu()
                 ).tolist() if grp.n else []
        # mini-batch u: the u-th of U equal shares of the step's groups over all ranks, in order of
        # position (without filtering: positions [u*MB, (u+1)*MB), see `layout`); a rank's
        # positions ascend, so its share of each mini-batch is contiguous
        everyone = sorted(p for r in dist.gather_objects(grp.positions) for p in r)
        u_of = {p: k * U // max(1, len(everyone)) for k, p in enumerate(everyone)}
        bounds = [sum(u_of[p] < u for p in grp.positions) for u in range(U + 1)]
        passes = [[(a + x, a + y) for x, y in micro_batches(costs[a:b], max(1, b - a), tr.micro_batch_prompts,
                                                             tr.micro_batch_tokens)[0]] if b > a else []
                  for a, b in zip(bounds, bounds[1:])]
        if dist.active():
            n_pass = dist.all_reduce_max(torch.tensor([len(p) for p in passes])).tolist()
            passes = [split_to(p, costs, min(n, p[-1][1] - p[0][0])) + [None] * (n - min(n, p[-1][1] - p[0][0]))
                      if p else [None] * n for p, n in zip(passes, n_pass)]
        return passes

    def update(self, step, grp: Groups, adv, old_logp, ref_logp, passes, spare: Groups) -> dict:
        """One optimizer update per mini-batch, gradients accumulated over its passes. Returns
        the step's loss, KL, clip fraction, entropy, grad norm and anchor loss, over all ranks.
        A zero-weight pass (None) runs a forward/backward of `spare`'s first group times 0, so
        that every rank joins the same collectives."""
        c, g, G, W = self.cfg, self.cfg.grpo, self.G, dist.world_size()
        ids, mask, batch, n_img = grp.ro.completion_ids, grp.ro.mask, grp.batch, grp.images
        all_tok = float(dist.all_reduce_sum(mask.sum()))         # completion tokens of the step, all ranks
        sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "ptx": 0.0}
        seq = g.importance_level == "sequence"
        clip_low, clip_high = (g.seq_clip_low, g.seq_clip_high) if seq else (g.clip_low, g.clip_high)
        self.policy.train()
        for u, mini in enumerate(passes):
            self.opt.zero_grad(set_to_none=True)
            real = [p for p in mini if p is not None]
            rows = slice(real[0][0] * G, real[-1][1] * G) if real else slice(0, 0)
            # the pass losses of a mini-batch add up to its loss over all ranks (eq. 9)
            here = mask[rows].sum() if g.loss_agg == "token-mean" else torch.tensor(float(rows.stop - rows.start))
            anywhere = dist.all_reduce_sum(here)
            total = anywhere.clamp(min=1)
            for p in mini:
                if p is None:
                    self.zero_weight_pass(spare)
                    continue
                a, b = p
                r = slice(a * G, b * G)
                with self.amp():
                    logp, ent = self.policy_fwd(slice_prompts(batch, a, b, n_img), ids[r], mask[r], G, self.temperature,
                                                entropy=True, entropy_grad=g.entropy_coef > 0)
                # ALGO LOGIC: the objective, eqs. (5)-(9), or GSPO's (12)
                loss, m = grpo_loss(logp, logp.detach() if old_logp is None else old_logp[r], adv[r], mask[r],
                                    ref_logp=None if ref_logp is None else ref_logp[r], entropy=ent,
                                    clip_low=clip_low, clip_high=clip_high, dual_clip=g.dual_clip or None,
                                    beta=g.beta, kl_estimator=g.kl_estimator, entropy_coef=g.entropy_coef,
                                    loss_agg=g.loss_agg, norm_constant=g.norm_constant or c.rollout.max_new_tokens,
                                    total=total, importance_level=g.importance_level)
                loss = loss * W              # FSDP averages gradients over ranks: scale so they add up
                check_finite(loss.detach(), "loss", step)
                loss.backward()
                sums["loss"] += loss.item() / W / len(passes)
                for k in ("clipped", "kl", "entropy"):
                    sums[k] += m.get(k, 0.0) / max(all_tok, 1.0)
            if self.anchor is not None:      # ALGO LOGIC: the format anchor, eq. (10)
                sums["ptx"] += self.anchor.backward(self.policy_fwd, step, u, dist.rank(), W) / len(passes)
            gn = torch.nn.utils.clip_grad_norm_(self.trainable, c.optim.grad_clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            check_finite(gn, "gradient norm", step)
            sums["grad_norm"] += gn.item() / len(passes)
            if anywhere.item() > 0 or self.anchor is not None:
                self.opt.step()              # (else no group anywhere in this mini-batch: nothing to learn)
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)  # no gradients held through the next rollout
        if dist.active():
            keys = ("loss", "clipped", "kl", "entropy")
            sums.update(zip(keys, dist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
        return sums

    def zero_weight_pass(self, spare: Groups) -> None:
        """A forward/backward whose loss is 0 x that of spare's first group (see `update`)."""
        G = self.G
        with self.amp():
            logp = self.policy_fwd(slice_prompts(spare.batch, 0, 1, spare.images), spare.ro.completion_ids[:G],
                                   spare.ro.mask[:G], G, self.temperature)
        (0.0 * logp.sum()).backward()

    def rollout(self, step, batch, positions: list[int]):
        """G completions per prompt from the gathered policy, continuously batched under
        rollout.max_batch_tokens; each prompt samples from its own seed (from the step and its
        position in the step's draw), so where and when it is decoded does not matter."""
        c = self.cfg
        self.policy.eval()
        try:
            with self.amp(), dist.gathered(self.policy_fwd):
                return generate(self.policy, batch, group_size=self.G, max_new_tokens=c.rollout.max_new_tokens,
                                eos_token_id=self.policy.generation_config.eos_token_id,
                                pad_token_id=self.tokenizer.pad_token_id, temperature=self.temperature,
                                top_p=c.rollout.top_p, seeds=[prompt_seed(c.train.seed, step, i) for i in positions],
                                max_batch_tokens=c.rollout.max_batch_tokens)
        except FloatingPointError as e:
            raise NonFiniteError(f"non-finite policy at step {step} ({e}); stopping without writing a checkpoint "
                                 "of this state. Lower optim.lr or resume from the last checkpoint.") from None

    @torch.no_grad()
    def no_grad_logprobs(self, fwd, grp: Groups, passes, spare: Groups, reference: bool = False) -> torch.Tensor | None:
        """Log-probs [N, T] of the completions under `fwd.model` (the old policy, or with
        reference=True the reference: the frozen model, or with LoRA the adapter-free network);
        None on a rank without groups (DAPO can leave one empty).
        Under FSDP every rank runs the same passes, as in `update`: a padding pass (None) runs
        spare's first group and drops the result. A rank that skipped them would miss the
        gather (a collective) or leave FSDP's recorded forward order, which the next backward
        uses to prefetch, different from the other ranks', and the job would hang."""
        was, G = fwd.model.training, self.G
        fwd.model.eval()
        ids, mask = grp.ro.completion_ids, grp.ro.mask
        kw = {"reference": True} if reference and self.lora else {}
        out = []
        # under FSDP: gathered once for all passes, and resharded on exit (a forward without
        # backward would otherwise leave the root unit holding a gathered copy that the next
        # optimizer step makes stale)
        with self.amp(), dist.gathered(fwd):
            for p in (p for mini in passes for p in mini):
                if p is None:
                    fwd(slice_prompts(spare.batch, 0, 1, spare.images), spare.ro.completion_ids[:G], spare.ro.mask[:G],
                        G, self.temperature, **kw)
                    continue
                a, b = p
                out.append(fwd(slice_prompts(grp.batch, a, b, grp.images), ids[a * G:b * G], mask[a * G:b * G], G,
                               self.temperature, **kw))
        fwd.model.train(was)
        return torch.cat(out) if out else None

    def metrics(self, step, ranks: list[RankResult], stats: dict, times) -> dict:
        """The step's line of metrics.jsonl, over the completions of all ranks."""
        parts, gold = [p for r in ranks for p in r.parts], [x for r in ranks for x in r.gold]
        rewards = torch.tensor([x for r in ranks for x in r.rewards])
        lengths = torch.tensor([x for r in ranks for x in r.lengths], dtype=torch.float32)
        prompt_tokens, image_tokens = sum(r.prompt_tokens for r in ranks), sum(r.image_tokens for r in ranks)
        n, t_all = len(parts), sum(times)
        m = {"step": step + 1, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()}
        m.update({f"reward/{k}": sum(p[k] for p in parts) / n for k in ("format", "tag", "behavior")})
        m.update({f"tag_acc/{short}": sum(p["pred"][tag] == g[GOLD_KEYS[tag]] for p, g in zip(parts, gold)) / n
                  for tag, short in SHORT_NAMES.items()})
        by_group = {}                     # combined-tag accuracy per SafeTag group (visual/text/combined)
        for p, g in zip(parts, gold):
            by_group.setdefault("/".join(g[GOLD_KEYS[t]] for t in TAGS), []).append(p["pred"]["combined_safe"]
                                                                                   == g["combine_tag"])
        m.update({f"group_acc/{k}": sum(v) / len(v) for k, v in sorted(by_group.items())})
        flat = {}                         # per SafeTag group: share of its prompts whose G rewards are all equal
        for i in range(0, n, self.G):
            key = "/".join(gold[i][GOLD_KEYS[t]] for t in TAGS)
            flat.setdefault(key, []).append(float(rewards[i:i + self.G].std() == 0))
        m.update({f"zero_std/{k}": sum(v) / len(v) for k, v in sorted(flat.items())})
        if self.reward_plugin is not None:
            m.update({"reward/errors": sum(r.errors for r in ranks), "reward/timeouts": sum(r.timeouts for r in ranks)})
        m.update({"kl": stats["kl"], "clip_frac": stats["clipped"], "entropy": stats["entropy"], "loss": stats["loss"],
                  "grad_norm": stats["grad_norm"], **({"ptx": stats["ptx"]} if self.anchor is not None else {}),
                  "lr": self.sched.get_last_lr()[0],
                  "response_len/mean": lengths.mean().item(), "response_len/max": lengths.max().item(),
                  "frac_truncated": (lengths >= self.cfg.rollout.max_new_tokens).float().mean().item(),
                  "frac_zero_std_groups": (rewards.view(-1, self.G).std(-1) == 0).float().mean().item(),
                  "time/rollout": times[0], "time/ref": times[1], "time/update": times[2],
                  "tokens_per_s": (float(lengths.sum()) + prompt_tokens) / t_all if t_all > 0 else 0.0,
                  "tokens/completion": float(lengths.sum()), "tokens/prompt": prompt_tokens, "tokens/image": image_tokens})
        return m

    # ------------------------------------------------------------------------------- the run
    def fit(self, init_path=None) -> Path:
        """Run GRPO for train.steps steps (from the last intact checkpoint when resuming); returns
        the final checkpoint."""
        c = self.cfg
        self.setup(init_path or self.model_dir)
        bar = tqdm(range(self.start_step, c.train.steps), desc="safegrpo", dynamic_ncols=True, mininterval=2,
                   initial=self.start_step, total=c.train.steps, disable=not dist.is_main())
        last = self.resume_from
        trackers = Loggers(c, self.out, self.start_step, self.resume) if dist.is_main() else None
        empty = 0                                  # DAPO: steps in a row that kept no group anywhere
        for step in bar:
            m = self.train_step(step)
            if c.train.eval_every and (step + 1) % c.train.eval_every == 0:
                m.update(self.validate())
            if dist.is_main():
                with open(self.out / "metrics.jsonl", "a") as fh:       # one write per line: whole or absent
                    fh.write(json.dumps(m) + "\n")
                trackers.log(m)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", comb=f"{m['tag_acc/combined']:.2f}",
                            kl=f"{m['kl']:.4f}", refresh=False)
            if c.grpo.filter_zero_std:
                empty = empty + 1 if m["dapo/kept"] == 0 else 0
                if empty and dist.is_main():
                    tqdm.write(f"[dapo] warning: step {step + 1}: no group had reward spread, nothing was learned "
                               f"({empty} step(s) in a row; the run stops at grpo.max_empty_steps="
                               f"{c.grpo.max_empty_steps})")
                if c.grpo.max_empty_steps and empty >= c.grpo.max_empty_steps:
                    raise NothingToLearnError(
                        f"grpo.filter_zero_std kept no group for {empty} steps in a row (up to step {step + 1}): the "
                        "reward gives every completion of a prompt the same value. Check the reward (grpo.reward), "
                        "or raise grpo.oversample / rollout.temperature")
            if (c.train.save_every and (step + 1) % c.train.save_every == 0) or step + 1 == c.train.steps:
                last = self.save(step + 1)
        if trackers is not None:
            trackers.close()
        if self.reward_plugin is not None:
            self.reward_plugin.close()
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
        if m["decoy_acc"] is not None:
            out["val/decoy_acc"] = m["decoy_acc"]
        return out

    def evaluate(self, name: str, model) -> dict | None:
        """Greedy evaluation of `model` (a module or a model directory) on the first
        train.eval_limit test records, written to eval_{name}.json (+ 50 samples); None without
        a test split. "before" is computed once per run (reused when resuming)."""
        c = self.cfg
        recs = self.test_records[:c.train.eval_limit or None]
        if not recs:
            return None
        path = self.out / f"eval_{name}.json"
        if name == "before" and path.is_file():      # the starting model does not change on --resume
            return json.loads(path.read_text())
        t0 = time.time()
        model = self.load_model(model) if isinstance(model, (str, Path)) else model
        metrics, completions = evaluate_model(model, self.processor, recs, c.data.prompt_style, c.rollout.max_new_tokens,
                                        judge=c.grpo.refusal_judge, desc=f"eval {name}")
        metrics["seconds"] = round(time.time() - t0, 1)
        write_atomic(self.out / f"eval_{name}_samples.jsonl", "".join(
            json.dumps({"prompt": r.prompt, "tags": r.tags, "meta": {k: v for k, v in r.meta.items() if k != "demo"},
                        "completion": comp}) + "\n" for r, comp in list(zip(recs, completions))[:50]))
        write_atomic(path, json.dumps(metrics, indent=1))        # last: its presence means both are complete
        return metrics

    def save(self, step) -> Path:
        state = {"sampler": self.sampler.state(), "scheduler": self.sched.state_dict(),
                 "python_random": random.getstate(), "init_path": str(self.model_dir), "config": self.cfg.to_dict()}
        p = save_checkpoint(self.out / "checkpoints", step, self.policy, self.processor, self.opt, state,
                            adapter=(self.cfg.model.lora, self.init_path, self.base_fingerprint) if self.lora else None)
        if dist.is_main():
            prune_checkpoints(self.out / "checkpoints", 3)
        return p

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
            write_atomic(f, "".join(line + "\n" for line in keep))


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, list) else x
