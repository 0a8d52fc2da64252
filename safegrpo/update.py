"""Steps 5-6 of a GRPO step: the no-gradient log-probs and the optimizer updates (the math is
rl/grpo.py's).

    Updater.plan(groups)          per mini-batch, the prompt ranges of its forward/backward passes
    Updater.logprobs(fwd, ...)    log pi_old or log pi_ref of every completion token, no grad [N, T]
    Updater.update(...)           per mini-batch: a forward/backward per pass (grpo_loss, eqs. 5-9,
                                  + the format anchor), gradient clip, AdamW step, schedule step

A step's prompts are cut into `train.prompts_per_step / train.mini_batch_prompts` mini-batches
(one optimizer update each), and a mini-batch into passes (rl/batching.py) of whole groups.
Under torchrun every rank runs the same number of passes per mini-batch, because FSDP's
collectives pair up pass by pass: a rank with fewer prompts runs zero-weight passes (`None` in
the plan) on a spare group, whose loss is 0 x a real one.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from . import distributed as dist
from .collect import Groups
from .config import Config
from .memory import prompt_copies
from .optim import check_finite, make_optimizer
from .policy import Policy
from .rl.batching import passes_of, slice_prompts, split_to
from .rl.correction import is_weights, mismatch, rejection_mask
from .rl.grpo import grpo_loss

Pass = tuple[int, int] | None            # prompts [a, b) of this rank's groups, or a zero-weight pass


class Updater:
    """The optimizer of pi_theta, its schedule, and the passes that feed it."""

    def __init__(self, cfg: Config, policy: Policy, anchor=None):
        c, tr = cfg, cfg.train
        self.cfg, self.policy, self.anchor, self.G = cfg, policy, anchor, cfg.rollout.group_size
        self.temperature = cfg.rollout.temperature    # of sampling, and so of every log-prob
        # tokens a pass runs per prompt token: 1, or G under Hugging Face's checkpointing (memory.prompt_copies)
        self.prompt_copies = prompt_copies(c.model.gradient_checkpointing, not policy.lean, self.G)
        # the schedule steps once per optimizer update; warm-up and decay are given in GRPO steps
        n = self.updates_per_step = tr.prompts_per_step // tr.mini_batch_prompts
        self.opt, self.sched = make_optimizer(policy.model, c.optim.lr, c.optim, c.optim.warmup_steps * n,
                                              tr.steps * n, c.optim.schedule)

    def plan(self, grp: Groups) -> list[list[Pass]]:
        """Per mini-batch, its passes: prompt ranges [a, b) of grp (rl/batching.passes_of), the
        same number on every rank, zero-weight passes (None) filling up a rank with fewer."""
        tr, U, G = self.cfg.train, self.updates_per_step, self.G
        # a pass's cost: the tokens it runs (each prompt once, or G times: memory.prompt_copies)
        costs = (self.prompt_copies * grp.batch["attention_mask"].sum(-1).cpu()
                 + grp.ro.lengths.view(-1, G).sum(-1).cpu()).tolist() if grp.n else []
        # mini-batch u holds the u-th of U equal shares of the step's groups over all ranks, in
        # order of position (unfiltered: positions [u*MB, (u+1)*MB), data/samplers.rank_share);
        # a rank's positions ascend, so its part of each mini-batch is contiguous: [first[u], first[u+1])
        everyone = sorted(p for r in dist.gather_objects(grp.positions) for p in r)
        minibatch_of = {p: k * U // max(1, len(everyone)) for k, p in enumerate(everyone)}
        first = [sum(minibatch_of[p] < u for p in grp.positions) for u in range(U + 1)]
        plan = [[(a + x, a + y) for x, y in passes_of(costs[a:b], tr.micro_batch_prompts, tr.micro_batch_tokens)]
                for a, b in zip(first, first[1:])]
        if dist.active():                 # as many passes per mini-batch as the rank that needs most
            n_pass = dist.all_reduce_max(torch.tensor([len(p) for p in plan])).tolist()
            plan = [self._pad_to(p, costs, n) for p, n in zip(plan, n_pass)]
        return plan

    @staticmethod
    def _pad_to(passes: list[Pass], costs: list[int], n: int) -> list[Pass]:
        """passes as n passes: split further while a pass has more than one prompt
        (rl/batching.split_to), then zero-weight passes (None)."""
        if not passes:
            return [None] * n
        prompts = passes[-1][1] - passes[0][0]
        return split_to(passes, costs, min(n, prompts)) + [None] * (n - min(n, prompts))

    @torch.no_grad()
    def logprobs(self, fwd, grp: Groups, plan: list[list[Pass]], spare: Groups, **kw) -> torch.Tensor | None:
        """Log-probs [N, T] of grp's completions under `fwd` (policy.fwd: pi_old; policy.ref_fwd
        with policy.ref_kwargs(): pi_ref), without gradients; None on a rank without groups
        (DAPO can leave one empty). Under FSDP every rank runs the same passes, as in `update`:
        a rank that skipped one would miss the gather (a collective) or record a forward order
        different from the other ranks', which the next backward uses to prefetch: a hang."""
        model, G, T = fwd.model, self.G, self.temperature
        was = model.training
        model.eval()
        out = []
        # under FSDP: gathered once for all passes, and resharded on exit (a forward without
        # backward would otherwise leave the root unit holding a gathered copy that the next
        # optimizer step makes stale)
        with self.policy.amp(), dist.gathered(fwd):
            for p in (p for minibatch in plan for p in minibatch):
                if p is None:            # zero-weight pass: run, result dropped
                    fwd(slice_prompts(spare.batch, 0, 1, spare.images), spare.ro.completion_ids[:G],
                        spare.ro.mask[:G], G, T, **kw)
                    continue
                rows = slice(p[0] * G, p[1] * G)
                out.append(fwd(slice_prompts(grp.batch, *p, grp.images), grp.ro.completion_ids[rows],
                               grp.ro.mask[rows], G, T, **kw))
        model.train(was)
        return torch.cat(out) if out else None

    def update(self, step: int, grp: Groups, adv, old_logp, ref_logp, plan: list[list[Pass]], spare: Groups) -> dict:
        """One optimizer update per mini-batch, gradients accumulated over its passes. adv [N],
        old_logp / ref_logp [N, T] or None (old_logp None: pi_old is the policy itself, one update
        per step). Returns the step's loss, KL, clip fraction, entropy, grad norm, anchor loss and
        rollout/training mismatch (rl/correction.py), over all ranks."""
        c, g, G, W = self.cfg, self.cfg.grpo, self.G, dist.world_size()
        ids, batch, sampled = grp.ro.completion_ids, grp.batch, grp.ro.mask    # sampled: every completion token
        rc = g.rollout_correction
        recomputed = old_logp is not None and g.old_logprobs == "recompute"
        mask, weights = self.correction(step, grp, old_logp if recomputed else None)    # [N, T] each
        step_tokens = float(dist.all_reduce_sum(mask.sum()))        # completion tokens of the step, all ranks
        sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "ptx": 0.0,
                "mm_tokens": 0.0, "mm_k3": 0.0, "mm_abs": 0.0, "mm_out": 0.0, "mm_abs_max": 0.0,
                "is_weight": float((weights * mask).sum()) if weights is not None else float(mask.sum()),
                "rejected": float((sampled - mask).sum()) if rc.rollout_rs else 0.0}
        seq = g.importance_level == "sequence"
        clip_low, clip_high = (g.seq_clip_low, g.seq_clip_high) if seq else (g.clip_low, g.clip_high)
        self.policy.model.train()
        for u, passes in enumerate(plan):
            self.opt.zero_grad(set_to_none=True)
            # eq. (9)'s denominator for this mini-batch over all ranks: its completion tokens
            # (token-mean) or completions, so that the pass losses of all ranks add up to its loss
            real = [p for p in passes if p is not None]
            mine = slice(real[0][0] * G, real[-1][1] * G) if real else slice(0, 0)     # this rank's rows
            here = mask[mine].sum() if g.loss_agg == "token-mean" else torch.tensor(float(mine.stop - mine.start))
            everywhere = dist.all_reduce_sum(here)
            for p in passes:
                if p is None:
                    self._zero_weight_pass(spare)
                    continue
                rows = slice(p[0] * G, p[1] * G)
                with self.policy.amp():
                    logp, ent = self.policy.fwd(slice_prompts(batch, *p, grp.images), ids[rows], sampled[rows],
                                                G, self.temperature, entropy=True, entropy_grad=g.entropy_coef > 0)
                # the rollout/training mismatch, eq. (13), where pi_train is at the rollout's parameters:
                # the recomputed pi_old, or before the first update this forward
                train = old_logp[rows] if recomputed else logp.detach() if u == 0 else None
                if train is not None:
                    self._add_mismatch(sums, train, grp.ro.logprobs[rows], sampled[rows])
                # ALGO LOGIC: the objective, eqs. (5)-(9), or GSPO's (12)
                loss, m = grpo_loss(logp, logp.detach() if old_logp is None else old_logp[rows], adv[rows],
                                    mask[rows], ref_logp=None if ref_logp is None else ref_logp[rows], entropy=ent,
                                    weights=None if weights is None else weights[rows],
                                    clip_low=clip_low, clip_high=clip_high, dual_clip=g.dual_clip or None,
                                    beta=g.beta, kl_estimator=g.kl_estimator, entropy_coef=g.entropy_coef,
                                    loss_agg=g.loss_agg, norm_constant=g.norm_constant or c.rollout.max_new_tokens,
                                    total=everywhere.clamp(min=1), importance_level=g.importance_level)
                loss = loss * W              # FSDP averages gradients over ranks: scale so they add up
                check_finite(loss.detach(), "loss", step)
                loss.backward()
                sums["loss"] += loss.item() / W / len(plan)
                for k in ("clipped", "kl", "entropy"):
                    sums[k] += m.get(k, 0.0) / max(step_tokens, 1.0)
            if self.anchor is not None:      # ALGO LOGIC: the format anchor, eq. (10)
                sums["ptx"] += self.anchor.backward(self.policy.fwd, step, u, dist.rank(), W) / len(plan)
            gn = torch.nn.utils.clip_grad_norm_(self.policy.trainable, c.optim.grad_clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            check_finite(gn, "gradient norm", step)
            sums["grad_norm"] += gn.item() / len(plan)
            if everywhere.item() > 0 or self.anchor is not None:
                self.opt.step()              # the schedule advances with applied updates only
                self.sched.step()            # (else no group anywhere in this mini-batch: nothing to learn)
        self.opt.zero_grad(set_to_none=True)  # no gradients held through the next rollout
        if dist.active():
            keys = ("loss", "clipped", "kl", "entropy", "mm_tokens", "mm_k3", "mm_abs", "mm_out", "is_weight", "rejected")
            sums.update(zip(keys, dist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
            sums["mm_abs_max"] = float(dist.all_reduce_max(torch.tensor(sums["mm_abs_max"], dtype=torch.float64)))
        return sums

    def correction(self, step: int, grp: Groups, train) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ALGO LOGIC, eqs. (14)-(15), as verl applies them: (response mask [N, T] with rejected
        tokens set to 0, importance weights [N, T] for the policy-gradient term or None). train:
        the recomputed pi_old [N, T] (always there when a correction is on: config.validate and
        trainer.train_step see to it). Warns when every token of the step was rejected."""
        rc, mask = self.cfg.grpo.rollout_correction, grp.ro.mask
        if not (rc.rollout_is or rc.rollout_rs):
            return mask, None
        weights = None
        if grp.n:                 # (DAPO can leave a rank without groups: it still joins the sum below)
            if train is None:
                raise RuntimeError("rollout correction needs the recomputed pi_old")
            if rc.rollout_is:     # on the rollout's mask, as verl (sequence level: all its tokens)
                weights = is_weights(train, grp.ro.logprobs, mask, rc.rollout_is, rc.rollout_is_threshold)
            if rc.rollout_rs:
                mask = rejection_mask(train, grp.ro.logprobs, mask, rc.rollout_rs, rc.rollout_rs_threshold,
                                      rc.rollout_rs_threshold_lower)
        elif rc.rollout_is:
            weights = torch.zeros_like(mask)
        total, kept = dist.all_reduce_sum(torch.stack([grp.ro.mask.sum(), mask.sum()]).double()).tolist()
        if total > 0 and kept == 0 and dist.is_main():
            lo = rc.rollout_rs_threshold_lower or 1 / rc.rollout_rs_threshold
            tqdm.write(f"[rollout correction] warning: step {step + 1}: every one of {int(total)} completion "
                       f"tokens was rejected (rollout_rs={rc.rollout_rs}, kept ratios [{lo:g}, "
                       f"{rc.rollout_rs_threshold:g}]): nothing was learned this step")
        return mask, weights

    @staticmethod
    def _add_mismatch(sums: dict, train, rollout, mask) -> None:
        m = mismatch(train, rollout, mask)
        for k in ("tokens", "k3", "abs", "out"):
            sums[f"mm_{k}"] += m[k]
        sums["mm_abs_max"] = max(sums["mm_abs_max"], m["abs_max"])

    def _zero_weight_pass(self, spare: Groups) -> None:
        """A forward/backward whose loss is 0 x that of spare's first group: this rank joins the
        pass's collectives without changing any gradient."""
        G = self.G
        with self.policy.amp():
            logp = self.policy.fwd(slice_prompts(spare.batch, 0, 1, spare.images), spare.ro.completion_ids[:G],
                                   spare.ro.mask[:G], G, self.temperature)
        (0.0 * logp.sum()).backward()
