"""The rollout engine's log-probs of its sampled tokens (rl/rollout.py) against the training
forward's, the mismatch between them and its correction (rl/correction.py, eqs. 13-15), and
grpo.old_logprobs: rollout, which skips the old-policy pass."""
import math

import pytest
import torch

from safegrpo.config import load_config
from safegrpo.data.records import load_parquet
from safegrpo.model import load_model, load_processor
from safegrpo.rl.correction import is_weights, mismatch, rejection_mask
from safegrpo.rl.forward import completion_hidden, completion_logprobs, lm_head_weight
from safegrpo.rl.decode import PAGE
from safegrpo.rl.rollout import _next_tokens, banned_token_ids, generate
from safegrpo.rl.sampling import row_keys, top_p_filter
from safegrpo.safety.prompting import encode_prompts
from safegrpo.trainer import Trainer

from test_multimodal import mixed  # noqa: F401  (fixture: 4 prompts, images of 2 sizes, 2 in one, none in one)
from test_trainer import rows, tiny_cfg

G, T = 3, 20


@pytest.fixture(scope="module")
def skewed(tiny_model_dir, synth_dir):
    """The tiny model with 30 extra stop ids, so completion lengths spread (tests/test_engine.py)."""
    model, proc = load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=6), "compact")
    return model, proc, batch, [model.generation_config.eos_token_id] + list(range(200, 230))


def rollout(model, proc, batch, stops, budget=0, banned=None, **kw):
    return generate(model, batch, group_size=G, max_new_tokens=T, eos_token_id=stops,
                    pad_token_id=proc.tokenizer.pad_token_id, seeds=list(range(11, 11 + batch["input_ids"].shape[0])),
                    max_batch_tokens=budget, banned_ids=banned, **kw)


def trainer_logprobs(model, batch, ro, temperature=1.0):
    return completion_logprobs(model, batch, ro.completion_ids, ro.mask, G, temperature)


def test_engine_logprobs_equal_the_training_forward_at_every_kv_budget(skewed):
    model, proc, batch, stops = skewed
    Lp = batch["input_ids"].shape[1]
    one_row = Lp + -(-T // PAGE) * PAGE
    with torch.no_grad():
        for budget in (one_row, 2 * Lp + G * T, 0):
            for temperature in (1.0, 0.7):
                ro = rollout(model, proc, batch, stops, budget, banned=[], temperature=temperature)
                want = trainer_logprobs(model, batch, ro, temperature) * ro.mask
                assert ro.logprobs.shape == ro.completion_ids.shape
                assert (ro.logprobs * ro.mask - want).abs().max() <= 1e-5, (budget, temperature)
                assert (ro.logprobs[ro.mask == 0] == 0).all()
                if budget == one_row:
                    assert ro.redone_steps > 0                            # pre-empted rows, the same log-probs


def test_engine_logprobs_are_those_of_the_distribution_sampled_from(skewed):
    """Banned placeholder ids change the distribution the engine draws from: its log-probs are
    that distribution's (renormalised without them), a float64 reference's to 1e-5, and above
    the training forward's, which keeps their mass."""
    model, proc, batch, stops = skewed
    banned = banned_token_ids(model)
    assert banned
    with torch.no_grad():
        ro = rollout(model, proc, batch, stops, banned=banned)
        h = completion_hidden(model, batch, ro.completion_ids, ro.mask, G).double()          # [N, T, H]
        logits = h @ lm_head_weight(model).double().T
        logits[..., banned] = -math.inf
        want = logits.log_softmax(-1).gather(-1, ro.completion_ids[..., None]).squeeze(-1) * ro.mask
        full = trainer_logprobs(model, batch, ro) * ro.mask
    assert (ro.logprobs.double() * ro.mask - want).abs().max() <= 1e-5
    assert ((ro.logprobs - full)[ro.mask > 0] > 0).all()       # fewer tokens share the mass: each sampled one gains


def test_top_p_gives_the_truncated_distributions_logprobs():
    """With top-p < 1 the engine's log-prob is the renormalised nucleus's (float64 reference over
    the same nucleus), well above the full softmax's, which the update uses."""
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(64, 16, generator=g), torch.randn(300, 16, generator=g) * 0.3
    keys = row_keys(list(range(64)), 1)
    tok, lp, lp_full = _next_tokens(h, W, [3, 4], 0.8, 0.7, keys, 0)
    logits = (h @ W.T)
    logits[:, [3, 4]] = -math.inf
    kept = torch.isfinite(top_p_filter(logits / 0.8, 0.7))                          # the nucleus the engine used
    ref = (logits.double() / 0.8).masked_fill(~kept, -math.inf).log_softmax(-1)
    torch.testing.assert_close(lp.double(), ref.gather(1, tok[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert kept.gather(1, tok[:, None]).all() and (kept.sum(-1) < 298).all()
    full = ((h @ W.T).double() / 0.8).log_softmax(-1).gather(1, tok[:, None]).squeeze(1)   # nothing banned or cut
    assert ((lp.double() - full) > 0.1).all()                   # the nucleus holds 70%: each token gains ~ log(1/0.7)
    torch.testing.assert_close(lp_full.double(), full, atol=1e-5, rtol=0)     # the training forward's form


def test_engine_logprobs_with_several_images_per_prompt(mixed):  # noqa: F811
    model, proc, recs, batch = mixed
    ro = generate(model, batch, group_size=G, max_new_tokens=10, eos_token_id=model.generation_config.eos_token_id,
                  pad_token_id=proc.tokenizer.pad_token_id, seeds=[5, 6, 7, 8], banned_ids=[])
    with torch.no_grad():
        want = trainer_logprobs(model, batch, ro) * ro.mask
    assert (ro.logprobs * ro.mask - want).abs().max() <= 1e-5


def test_engine_logprobs_with_lora_adapters(skewed):
    pytest.importorskip("peft")
    from safegrpo.config import LoraConfig
    from safegrpo.lora import apply_lora
    model, proc, batch, stops = skewed
    m = apply_lora(load_model(model.name_or_path).eval(), LoraConfig(rank=4), seed=3)
    with torch.no_grad():
        for layer in m.modules():                         # B != 0, so the adapters change the outputs
            if hasattr(layer, "lora_B"):
                for b in layer.lora_B.values():
                    b.weight.normal_(0, 0.05)
        ro = rollout(m, proc, batch, stops, banned=[])
        want = trainer_logprobs(m, batch, ro) * ro.mask
    assert (ro.logprobs * ro.mask - want).abs().max() <= 1e-5


def test_bf16_autocast_mismatch_is_measured_and_nonzero(skewed):
    model, proc, batch, stops = skewed
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ro = rollout(model, proc, batch, stops, banned=[])
    with torch.no_grad():
        train = trainer_logprobs(model, batch, ro)                        # fp32 training forward
    m = mismatch(train, ro.logprobs, ro.mask)
    assert m["tokens"] == float(ro.mask.sum())
    assert 1e-4 < m["abs_max"] < 2.0 and m["k3"] > 0 and 0 < m["abs"] / m["tokens"] < m["abs_max"]


def _naive_correction(lt, lr, mask, is_level, cap, rs_level, lo, hi):
    """verl's rollout correction, one sequence and token at a time in float64: (importance weights,
    response mask after rejection). The aggregate log-ratio (the token's, the sequence's sum, or
    its mean) is clamped to [-20, 20]; lo None: 1 / hi."""
    lo = lo or 1.0 / hi
    w, keep = torch.zeros_like(lt, dtype=torch.float64), torch.zeros_like(lt, dtype=torch.float64)
    clamp = lambda x: min(20.0, max(-20.0, x))                    # noqa: E731
    for n in range(lt.shape[0]):
        toks = [t for t in range(lt.shape[1]) if mask[n, t] > 0]
        d = {t: float(lt[n, t]) - float(lr[n, t]) for t in toks}
        seq, geo = sum(d.values()), sum(d.values()) / max(1, len(toks))
        for t in toks:
            w[n, t] = min(math.exp(clamp(d[t] if is_level == "token" else seq)), cap) if is_level else 1.0
            x = clamp({"token": d[t], "sequence": seq, "geometric": geo}[rs_level]) if rs_level else 0.0
            keep[n, t] = float(math.log(lo) <= x <= math.log(hi))
    return w, keep


@pytest.mark.parametrize("is_level,rs_level,lo", [("token", "", 0.6), ("sequence", "", 0.6), ("", "token", 0.6),
                                                  ("", "sequence", 0.6), ("", "geometric", 0.6),
                                                  ("token", "geometric", 0.6), ("", "token", 0.0)])
def test_correction_equals_a_naive_float64_reference(is_level, rs_level, lo):
    g = torch.Generator().manual_seed(0)
    lr = -torch.rand(6, 9, generator=g) * 3
    lt = lr + torch.randn(6, 9, generator=g) * 0.4
    mask = (torch.arange(9)[None] < torch.tensor([9, 7, 3, 1, 9, 5])[:, None]).float()
    want_w, want_keep = _naive_correction(lt, lr, mask, is_level, 1.5, rs_level, lo, 1.8)
    if is_level:
        got = is_weights(lt, lr, mask, is_level, 1.5)
        torch.testing.assert_close(got.double(), want_w, atol=1e-5, rtol=1e-5)
        assert (got[mask == 0] == 0).all()
    if rs_level:
        keep = rejection_mask(lt, lr, mask, rs_level, 1.8, lo)
        assert torch.equal(keep.double(), want_keep)
        assert 0 < float(keep[mask > 0].mean()) < 1                        # some rejected, some kept
    m = mismatch(lt, lr, mask)
    d = ((lt - lr).double() * mask)
    assert m["k3"] == pytest.approx(float(((d.exp() - 1 - d) * mask).sum()))
    assert m["out"] == float((((d.exp() < 0.5) | (d.exp() > 2)) & (mask > 0)).sum())


def test_sequence_weights_clamp_the_sum_not_each_token():
    """A sequence whose log-ratios sum to -200 (each token -25: beyond the old per-token clamp)
    weighs exp(-20) > 0, not an underflowed 0 that would read as a rejection; +30 caps at C."""
    lr = torch.zeros(2, 8)
    lt = torch.tensor([[-25.0] * 8, [30.0 / 8] * 8])
    mask = torch.ones(2, 8)
    w = is_weights(lt, lr, mask, "sequence", 2.0)
    assert torch.allclose(w[0], torch.full((8,), math.exp(-20.0))) and (w[0] > 0).all()
    assert torch.equal(w[1], torch.full((8,), 2.0))
    assert torch.equal(rejection_mask(lt, lr, mask, "sequence", 2.0), torch.zeros(2, 8))   # both outside [0.5, 2]


def test_rejected_tokens_leave_loss_kl_entropy_and_count_as_in_verl(tmp_path, tiny_model_dir, synth_dir, monkeypatch):
    """Through the trainer: the update's loss terms receive the response mask with rejected
    tokens removed and the mini-batch's kept-token count as eq. (9)'s denominator; the importance
    weights (reaching the policy-gradient term only) equal the float64 reference. The loss of a
    mini-batch then equals a float64 loop over its kept tokens of w * pg + beta * k3."""
    import safegrpo.update as upd
    over = {"train.steps": 1, "train.prompts_per_step": 4, "train.mini_batch_prompts": 4,
            "train.micro_batch_prompts": 4, "rollout.max_new_tokens": 12, "data.test": "", "train.save_every": 0}
    tr = Trainer(load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **over), [
        "grpo.rollout_correction.rollout_is=token", "grpo.rollout_correction.rollout_is_threshold=1.02",
        "grpo.rollout_correction.rollout_rs=token", "grpo.rollout_correction.rollout_rs_threshold=1.05"]))
    tr.setup(tr.model_dir)
    calls, real_loss, real_update = [], upd.grpo_loss, tr.updater.update
    seen = {}

    def spy_loss(logp, old, adv, mask, **kw):
        loss, m = real_loss(logp, old, adv, mask, **kw)
        calls.append((logp.detach(), old, adv, mask, kw, loss.item()))
        return loss, m

    def spy_update(step, grp, adv, old_logp, ref_logp, *a, **k):
        # an engine that differs from the trainer by N(0, 0.05) per token: some tokens outside [1/1.05, 1.05]
        noise = torch.randn(grp.ro.logprobs.shape, generator=torch.Generator().manual_seed(0)) * 0.05
        grp.ro.logprobs = grp.ro.logprobs + noise * grp.ro.mask
        seen.update(grp=grp, old=old_logp, ref=ref_logp)
        return real_update(step, grp, adv, old_logp, ref_logp, *a, **k)

    monkeypatch.setattr(upd, "grpo_loss", spy_loss)
    tr.updater.update = spy_update
    m = tr.train_step(0)
    grp, old, ref = seen["grp"], seen["old"], seen["ref"]
    assert old is not None                                   # one update per step: pi_old recomputed all the same
    w_ref, keep_ref = _naive_correction(old, grp.ro.logprobs, grp.ro.mask, "token", 1.02, "token", None, 1.05)
    assert 0.2 < float(keep_ref[grp.ro.mask > 0].mean()) < 0.9
    (logp, old_c, adv, mask, kw, loss), = calls
    assert torch.equal(mask.double(), keep_ref)
    assert float(kw["total"]) == float(keep_ref.sum())
    torch.testing.assert_close((kw["weights"] * mask).double(), w_ref * keep_ref, atol=1e-6, rtol=1e-6)
    # float64 loop: sum over kept tokens of w * (-A * clip-ratio loss at ratio 1) + beta * k3, over the kept count
    total, n = 0.0, 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if keep_ref[i, t]:
                d = float(ref[i, t]) - float(logp[i, t])
                total += float(w_ref[i, t]) * -float(adv[i]) + 0.01 * (math.exp(d) - d - 1)
                n += 1
    assert loss == pytest.approx(total / n, rel=1e-5, abs=1e-7)
    assert m["correction/rejected"] == pytest.approx(1 - float(keep_ref.sum() / grp.ro.mask.sum()))


def test_every_token_rejected_warns_and_applies_nothing(tmp_path, tiny_model_dir, synth_dir, capsys):
    over = {"train.steps": 1, "train.prompts_per_step": 4, "train.mini_batch_prompts": 4,
            "train.micro_batch_prompts": 4, "rollout.max_new_tokens": 12, "data.test": "", "train.save_every": 0}
    tr = Trainer(load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **over), [
        "grpo.rollout_correction.rollout_rs=token", "grpo.rollout_correction.rollout_rs_threshold=1.5",
        "grpo.rollout_correction.rollout_rs_threshold_lower=1.4"]))                # ratio ~1 lies outside
    tr.setup(tr.model_dir)
    before = [p.detach().clone() for p in tr.policy.trainable]
    m = tr.train_step(0)
    said = capsys.readouterr()
    assert "every one of" in said.out + said.err and m["correction/rejected"] == 1.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, tr.policy.trainable))
    assert tr.updater.sched.last_epoch == 0                                     # no update, no schedule step


def test_old_logprobs_from_the_rollout_skip_the_pass_and_log_the_mismatch(tmp_path, tiny_model_dir, synth_dir):
    over = {"train.steps": 2, "train.prompts_per_step": 4, "train.mini_batch_prompts": 2,
            "train.micro_batch_prompts": 2, "rollout.max_new_tokens": 12, "data.test": "", "train.save_every": 0}
    for d in "abc":
        (tmp_path / d).mkdir()
    recompute = Trainer(load_config(tiny_cfg(tmp_path / "a", tiny_model_dir, synth_dir, **over)))
    recompute.fit()
    calls = []
    engine = Trainer(load_config(tiny_cfg(tmp_path / "b", tiny_model_dir, synth_dir, **over),
                                 ["grpo.old_logprobs=rollout"]))
    engine.setup(engine.model_dir)
    real = engine.updater.logprobs
    engine.updater.logprobs = lambda fwd, *a, **k: calls.append(fwd) or real(fwd, *a, **k)
    m = engine.train_step(0)
    assert engine.policy.fwd not in calls                       # no old-policy pass (the reference's only)
    a = rows(tmp_path / "a" / "run")[0]
    for k in ("mismatch/k3", "mismatch/abs_mean", "mismatch/abs_max", "mismatch/ratio_out"):
        assert k in a and k in m
    assert 0 < a["mismatch/abs_max"] < 0.01                      # fp32 on CPU: only the banned ids' mass
    assert m["reward/mean"] == a["reward/mean"]                  # the same rollout, from the same weights
    corrected = Trainer(load_config(tiny_cfg(tmp_path / "c", tiny_model_dir, synth_dir, **over), [
        "grpo.rollout_correction.rollout_is=token", "grpo.rollout_correction.rollout_rs=token"]))
    corrected.fit()
    c = rows(tmp_path / "c" / "run")[0]
    assert 0.9 < c["correction/weight_mean"] < 1.0 and c["correction/rejected"] == 0.0   # pi_train < pi_rollout
    assert corrected.cfg.grpo.rollout_correction.rollout_rs_threshold_lower == 0.0     # 0: 1 / upper, verl's default


@pytest.mark.parametrize("top_p,banned", [(1.0, False), (1.0, True), (0.7, False), (0.7, True)])
def test_engine_full_logprobs_equal_the_training_forward(skewed, top_p, banned):
    """full_logprobs (pi_old under grpo.old_logprobs: rollout) is the full softmax at the
    temperature, as the training forward computes it, whatever the engine cut or banned."""
    model, proc, batch, stops = skewed
    with torch.no_grad():
        ro = rollout(model, proc, batch, stops, banned=banned_token_ids(model) if banned else [], top_p=top_p,
                     temperature=0.9)
        want = trainer_logprobs(model, batch, ro, 0.9) * ro.mask
    assert (ro.full_logprobs * ro.mask - want).abs().max() <= 1e-5
    assert (ro.full_logprobs[ro.mask == 0] == 0).all()
    if banned or top_p < 1:                     # the sampled distribution's log-prob is another one
        assert ((ro.logprobs - ro.full_logprobs)[ro.mask > 0] > 0).all()


@pytest.mark.parametrize("old_logprobs", ["recompute", "rollout"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_ratio_is_one_and_nothing_clipped_at_the_rollouts_parameters(tmp_path, tiny_model_dir, synth_dir,
                                                                     old_logprobs, level, top_p):
    """The identity of PPO's ratio: at the parameters the rollout sampled from, pi_theta / pi_old
    is 1 for every token, so no token is clipped and every token has its gradient, whichever
    importance level, top-p, and source of pi_old. Two updates per step (so pi_old is used); a
    learning rate of 1e-12 keeps the second update's parameters those of the rollout as well.
    The tiny model's config names image placeholder ids, so the engine bans them in every case."""
    over = {"train.steps": 1, "train.prompts_per_step": 4, "train.mini_batch_prompts": 2,
            "train.micro_batch_prompts": 2, "rollout.max_new_tokens": 12, "data.test": "", "train.save_every": 0,
            "optim.lr": 1e-12}
    tr = Trainer(load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **over), [
        f"grpo.old_logprobs={old_logprobs}", f"grpo.importance_level={level}", f"rollout.top_p={top_p}"]))
    assert banned_token_ids(load_model(tiny_model_dir))
    tr.setup(tr.model_dir)
    seen = {}
    real = tr.updater.update

    def spy(step, grp, adv, old_logp, *a, **k):
        seen["old"], seen["grp"] = old_logp, grp
        return real(step, grp, adv, old_logp, *a, **k)

    tr.updater.update = spy
    m = tr.train_step(0)
    grp, old = seen["grp"], seen["old"]
    assert old is not None and (old is grp.ro.full_logprobs) == (old_logprobs == "rollout")
    with torch.no_grad():
        now = tr.policy.fwd(grp.batch, grp.ro.completion_ids, grp.ro.mask, 4, 1.0)      # pi_theta, unchanged
    ratio = torch.exp(now - old)[grp.ro.mask > 0]
    assert (ratio - 1).abs().max() <= 1e-5
    assert m["clip_frac"] == 0.0
