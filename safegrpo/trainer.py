"""The SafeGRPO training loop: state and order. `Trainer.train_step` reads top to bottom like the
seven steps of one GRPO step (docs/METHOD.md), each a call into the module that owns it:

    1-3 collect    draw the step's prompts, sample G completions each, score them  (collect.py)
    4 advantage    group-relative, eq. (4)                                          (rl/grpo.py)
    5 logprobs     pi_ref (if beta > 0) and pi_old (if the rollout feeds > 1 update, or a rollout
                   correction is on), no grad
    6 update       per mini-batch: grpo_loss per pass (+ the format anchor), clip, AdamW step
                                                                                    (update.py)
    7 record       one line of metrics.jsonl; validation and checkpoints every N steps
                                                                                    (loggers.py)

The models are policy.py's, the data data/prepare.py's, the warm start warmstart.py's, the
checkpoints checkpoint.py's. Under torchrun every rank runs this same code on its share of the
prompts (distributed.py); rank 0 alone runs the warm start and the before/after evaluations.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import load_trainer_state, open_run_dir, prune_checkpoints, resumable_checkpoint, save_checkpoint
from .collect import Collector, Reward
from .config import Config, save_config
from .data.prepare import load_data, model_dir
from .data.samplers import make_sampler
from .eval.metrics import evaluate, validation_line
from .files import atomic_path, write_atomic
from .loggers import Loggers, MetricsFile, check_trackers, step_metrics
from .lora import check_targets
from .memory import print_memory_plan
from .model import load_processor, model_skeleton
from .optim import NonFiniteError, NothingToLearnError
from .policy import Policy, check_adapter_base, load
from .rl.grpo import group_advantages
from .update import Updater
from .warmstart import FormatAnchor, warm_start

__all__ = ["Trainer", "NonFiniteError", "NothingToLearnError"]
WARM_START_FILE = "safegrpo_warmstart.json"     # in sft/: the fingerprint it was made under


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        """Everything a run needs before its models: the run directory (ours, locked and claimed
        for this run: see checkpoint.open_run_dir), the processor, and the data, checked when loaded."""
        self.cfg, self.resume = cfg, resume
        if cfg.rollout.engine == "vllm":                    # a missing engine is named before anything is written
            from .rl.vllm_engine import vllm_module
            vllm_module()
        self.out = Path(cfg.train.out_dir)
        if dist.is_main():                                  # a folder of ours, one live run in it
            self._lock = open_run_dir(self.out, resume, overwrite)
        self.resume_from = resumable_checkpoint(self.out / "checkpoints", cfg, say=print if dist.is_main() else None) \
            if resume else None
        if self.resume_from is not None and cfg.model.lora.rank > 0:
            check_adapter_base(self.resume_from)            # the base the adapter was trained on, now
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = torch.device(cfg.train.device)
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        if not dist.is_main():
            dist.barrier()                      # rank 0 generates data and builds the tiny model first
        self.model_dir = model_dir(cfg)
        self.processor = load_processor(self.model_dir, cfg.model.trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.train_records, self.test_records = load_data(cfg, self.processor)
        if dist.is_main():
            dist.barrier()
        check_trackers(cfg)                                 # a missing extra is named now, not after the warm start
        if cfg.rollout.engine == "vllm" and not cfg.sft.enabled:     # (the warm start writes a folder)
            from .rl.vllm_engine import check_model_dir
            check_model_dir(self.model_dir)
        if cfg.model.lora.rank > 0:                         # so are target modules the model does not have
            check_targets(model_skeleton(self.model_dir, cfg.model.trust_remote_code), cfg.model.lora)
        self.reward = Reward(cfg)                           # and a reward plug-in that does not import
        if dist.is_main():
            save_config(cfg, self.out / "config.yaml")

    def warm_start(self) -> Path:
        """The model GRPO starts from: out_dir/sft after the warm start when sft.enabled (trained
        by rank 0, written atomically, reused when resuming under the same fingerprint), else the
        model directory."""
        c = self.cfg
        if not (c.sft.enabled and (c.sft.steps > 0 or c.sft.caption_steps > 0)):
            return self.model_dir
        sft_dir = self.out / "sft"
        if dist.is_main() and not self._reusable(sft_dir / WARM_START_FILE):      # the others wait
            model = load(c, self.model_dir, self.device)
            t0 = time.time()
            warm_start(model, self.processor, self.train_records, c, self.device, self.out)
            print(f"[sft] {c.sft.caption_steps} caption + {c.sft.steps} demonstration steps in {time.time() - t0:.0f} s")
            with atomic_path(sft_dir) as tmp:              # replaces only an sft/ of ours
                model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
                (tmp / WARM_START_FILE).write_text(json.dumps({"fingerprint": self.fingerprint()}, indent=1))
        dist.barrier()
        return sft_dir

    def fingerprint(self, evaluation: bool = False) -> dict:
        """What the model GRPO starts from depends on (the model, the warm start, the data, the
        optimizer settings and the seed), and with evaluation=True how it is evaluated: a file a
        run reuses from its folder (sft/, eval_before.json) is reused only when it recorded the
        same, else made again. As stored (JSON: tuples become lists)."""
        c, cfg = self.cfg.to_dict(), self.cfg
        fp = {"model": c["model"], "sft": c["sft"], "data": c["data"], "optim": c["optim"], "seed": cfg.train.seed}
        if evaluation:
            fp["eval"] = {"limit": cfg.train.eval_limit, "max_new_tokens": cfg.rollout.max_new_tokens,
                          "judge": cfg.reward.refusal_judge}
        return json.loads(json.dumps(fp))

    def _reusable(self, path: Path, evaluation: bool = False) -> bool:
        """Whether `path`, left by an earlier start of this run, recorded this run's fingerprint
        (only when resuming: a fresh run makes everything anew)."""
        if not (self.resume and path.is_file()):
            return False
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            return False
        same = isinstance(saved, dict) and saved.get("fingerprint") == self.fingerprint(evaluation)
        if not same and dist.is_main():
            print(f"[resume] {path} was made under other settings: made again")
        return same

    def setup(self, init_path) -> None:
        """pi_theta (from the resumed checkpoint, else init_path) and pi_ref (policy.py), the
        optimizer and schedule (update.py), the prompt sampler, rollouts and rewards
        (collect.py), the format anchor; restores their states when resuming."""
        c, ckpt = self.cfg, self.resume_from
        print_memory_plan(c, init_path, self.device)
        self.init_path = init_path
        self.policy = Policy(c, init_path, self.device, resume_from=ckpt)
        anchor = FormatAnchor(self.train_records, self.processor, c, self.device) if c.anchor.coef > 0 else None
        self.updater = Updater(c, self.policy, anchor)
        self.sampler = make_sampler(self.train_records, c.data, c.train.seed)
        self.collector = Collector(c, self.policy, self.processor, self.train_records, self.sampler, self.reward,
                                   self.rollout_engine(init_path))
        self.start_step = 0
        self.empty_steps = 0                       # DAPO: steps in a row that kept no group anywhere
        if ckpt is not None:
            st = load_trainer_state(ckpt, self.updater.opt, model=self.policy.model if dist.active() else None)
            self.updater.sched.load_state_dict(st["scheduler"])
            self.sampler.load(st["sampler"])
            random.setstate(_to_tuple(st["python_random"]))
            self.start_step = st["step"]
            self.empty_steps = st.get("dapo_empty_steps", 0)
            if dist.is_main():
                print(f"[resume] from {ckpt} (step {self.start_step})")
        # on --resume, the metrics lines of steps after the checkpoint (all, without one) are dropped
        self.metrics_file = MetricsFile(self.out, self.start_step if self.resume else None) if dist.is_main() else None

    def rollout_engine(self, init_path):
        """rollout.engine: vllm: a vLLM engine loaded from init_path (the folder GRPO starts from;
        under LoRA the base), one per rank; native: None (rl/rollout.py)."""
        c = self.cfg
        if c.rollout.engine != "vllm":
            return None
        from .rl.rollout import banned_token_ids
        from .rl.vllm_engine import VLLMEngine
        model = self.policy.model
        return VLLMEngine(c, init_path, seed=c.train.seed + dist.rank(), banned_ids=banned_token_ids(model),
                          eos_token_id=model.generation_config.eos_token_id,
                          image_token_id=getattr(model.config, "image_token_id", None), launched=dist.active())

    def train_step(self, step: int) -> dict:
        c, G = self.cfg, self.cfg.rollout.group_size
        # 1-3. prompts, rollout, reward (with DAPO: groups without reward spread leave, more are drawn)
        t0 = time.perf_counter()
        sampled, dapo = self.collector.collect(step)
        grp = sampled.informative(self.collector.encode) if c.grpo.filter_zero_std else sampled
        t_rollout = time.perf_counter() - t0
        # 4. advantage (ALGO LOGIC: groups are whole on each rank; batch std over all ranks)
        batch_std = dist.global_std(grp.rewards) if c.grpo.adv_scale == "batch" else None
        adv = group_advantages(grp.rewards, G, c.grpo.adv_scale, c.grpo.adv_eps, batch_std).to(self.device) \
            if grp.n else grp.rewards.to(self.device)                                              # [N]
        # 5. log-probs without grad: reference, and the old policy when a rollout feeds > 1 update
        #    (grpo.old_logprobs: rollout takes the rollout engine's instead)
        t0 = time.perf_counter()
        up, pol = self.updater, self.policy
        plan = up.plan(grp)                                  # per mini-batch: its passes (prompt ranges)
        ref_logp = up.logprobs(pol.ref_fwd, grp, plan, sampled, **pol.ref_kwargs()) if pol.has_ref else None
        if c.grpo.old_logprobs == "rollout":                 # the engine's log-probs are pi_old: no pass
            old_logp = grp.ro.full_logprobs                  # (full softmax at T: the training forward's form)
        else:
            rc = c.grpo.rollout_correction          # a correction weighs pi_old at the rollout's parameters
            need = up.updates_per_step > 1 or bool(rc.rollout_is or rc.rollout_rs)
            old_logp = up.logprobs(pol.fwd, grp, plan, sampled) if need else None
        t_ref = time.perf_counter() - t0
        # 6. update
        t0 = time.perf_counter()
        stats = up.update(step, grp, adv, old_logp, ref_logp, plan, spare=sampled)
        t_update = time.perf_counter() - t0
        # 7. record (figures of all ranks, over every sampled completion)
        ranks = dist.gather_objects(sampled.report(c.data.contrast_column))
        lr = up.sched.get_last_lr()[0]
        return {**step_metrics(step, ranks, stats, (t_rollout, t_ref, t_update), lr, c), **dapo}

    def fit(self, init_path=None) -> Path:
        """Run GRPO for train.steps steps (from the last intact checkpoint when resuming); returns
        the final checkpoint."""
        c = self.cfg
        self.setup(init_path or self.model_dir)
        bar = tqdm(range(self.start_step, c.train.steps), desc="safegrpo", dynamic_ncols=True, mininterval=2,
                   initial=self.start_step, total=c.train.steps, disable=not dist.is_main())
        last = self.resume_from
        trackers = Loggers(c, self.out, self.start_step, self.resume) if dist.is_main() else None
        try:
            for step in bar:
                m = self.train_step(step)
                if c.train.eval_every and (step + 1) % c.train.eval_every == 0:
                    m.update(self.validate())
                if dist.is_main():
                    self.metrics_file.append(m)
                    trackers.log(m)
                bar.set_postfix(reward=f"{m['reward/mean']:.3f}", comb=f"{m['tag_acc/combined']:.2f}",
                                kl=f"{m['kl']:.4f}", refresh=False)
                if c.grpo.filter_zero_std:
                    self.empty_steps = self.empty_steps + 1 if m["dapo/kept"] == 0 else 0
                    self._check_not_empty(step, self.empty_steps)
                if (c.train.save_every and (step + 1) % c.train.save_every == 0) or step + 1 == c.train.steps:
                    last = self.save(step + 1)
        finally:                                   # also when a step raises: trackers flushed, plug-in workers stopped
            if trackers is not None:
                trackers.close()
            self.reward.close()
        return last

    def close(self) -> None:
        """Shut the vLLM engine down (rollout.engine: vllm), the last thing a run does: it tears
        down the process group it shares with training."""
        engine = getattr(getattr(self, "collector", None), "engine", None)
        if engine is not None:
            engine.close()

    def _check_not_empty(self, step: int, empty: int) -> None:
        """DAPO: warn for a step that kept no group, stop after grpo.max_empty_steps in a row."""
        g = self.cfg.grpo
        if empty and dist.is_main():
            tqdm.write(f"[dapo] warning: step {step + 1}: no group had reward spread, nothing was learned "
                       f"({empty} step(s) in a row; the run stops at grpo.max_empty_steps={g.max_empty_steps})")
        if g.max_empty_steps and empty >= g.max_empty_steps:
            raise NothingToLearnError(
                f"grpo.filter_zero_std kept no group for {empty} steps in a row (up to step {step + 1}): the "
                "reward gives every completion of a prompt the same value. Check the reward (reward.plugin), "
                "or raise grpo.oversample / rollout.temperature")

    def _eval_records(self) -> list:
        return self.test_records[:self.cfg.train.eval_limit or None]

    @torch.no_grad()
    def validate(self) -> dict:
        """Greedy evaluation of the current policy on the first train.eval_limit test records
        (all when 0): {"val/...": figure}, complete on rank 0 ({} elsewhere). Under torchrun each
        rank decodes a share of the records with the gathered policy and rank 0 scores them all."""
        c, recs = self.cfg, self._eval_records()
        if not recs:
            return {}
        with self.policy.amp(), dist.gathered(self.policy.fwd):
            m, _ = evaluate(self.policy.model, self.processor, recs, c.data.prompt_style, c.rollout.max_new_tokens,
                            judge=c.reward.refusal_judge, split_ranks=True, max_prompt_length=c.data.max_prompt_length)
        return validation_line(m) if m is not None else {}

    def evaluate(self, name: str, model) -> dict | None:
        """Greedy evaluation of `model` (a module or a model directory) on the first
        train.eval_limit test records, by this process alone, written to eval_{name}.json
        (+ 50 samples); None without a test split. "before" is computed once per run (reused
        when resuming)."""
        c, recs = self.cfg, self._eval_records()
        if not recs:
            return None
        path = self.out / f"eval_{name}.json"
        if name == "before" and self._reusable(path, evaluation=True):     # the same starting model, evaluated alike
            return {k: v for k, v in json.loads(path.read_text()).items() if k != "fingerprint"}
        t0 = time.time()
        model = load(c, model, self.device) if isinstance(model, (str, Path)) else model
        metrics, completions = evaluate(model, self.processor, recs, c.data.prompt_style, c.rollout.max_new_tokens,
                                        judge=c.reward.refusal_judge, desc=f"eval {name}")
        metrics["seconds"] = round(time.time() - t0, 1)
        write_atomic(self.out / f"eval_{name}_samples.jsonl", "".join(
            json.dumps({"prompt": r.prompt, "tags": r.tags, "meta": {k: v for k, v in r.meta.items() if k != "demo"},
                        "completion": comp}) + "\n" for r, comp in list(zip(recs, completions))[:50]))
        write_atomic(path, json.dumps({**metrics, "fingerprint": self.fingerprint(evaluation=True)}, indent=1))   # last: both complete
        return metrics

    def save(self, step: int) -> Path:
        up, pol = self.updater, self.policy
        state = {"sampler": self.sampler.state(), "scheduler": up.sched.state_dict(),
                 "python_random": random.getstate(), "init_path": str(self.model_dir), "config": self.cfg.to_dict(),
                 "dapo_empty_steps": self.empty_steps}
        p = save_checkpoint(self.out / "checkpoints", step, pol.model, self.processor, up.opt, state,
                            adapter=(self.cfg.model.lora, self.init_path, pol.base_fingerprint) if pol.lora else None)
        if dist.is_main():
            prune_checkpoints(self.out / "checkpoints", self.cfg.train.keep_checkpoints)
        return p


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, list) else x
