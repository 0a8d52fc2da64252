"""The rollout engine's log-probs of its sampled tokens (rl/rollout.py) against the training
forward's, the mismatch between them and its correction (rl/correction.py, eqs. 13-15), and
grpo.old_logprobs: rollout, which skips the old-policy pass."""
import math

import pytest
import torch

from safegrpo.config import load_config
from safegrpo.data.records import load_parquet
from safegrpo.model import load_model, load_processor
from safegrpo.rl.correction import correction_weights, mismatch
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
    tok, lp = _next_tokens(h, W, [3, 4], 0.8, 0.7, keys, 0)
    logits = (h @ W.T)
    logits[:, [3, 4]] = -math.inf
    kept = torch.isfinite(top_p_filter(logits / 0.8, 0.7))                          # the nucleus the engine used
    ref = (logits.double() / 0.8).masked_fill(~kept, -math.inf).log_softmax(-1)
    torch.testing.assert_close(lp.double(), ref.gather(1, tok[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert kept.gather(1, tok[:, None]).all() and (kept.sum(-1) < 298).all()
    full = (logits.double() / 0.8).log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
    assert ((lp.double() - full) > 0.1).all()                   # the nucleus holds 70%: each token gains ~ log(1/0.7)


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


def _naive_weights(lt, lr, mask, is_level, cap, rs_level, lo, hi):
    """Rollout-correction weights, one sequence and token at a time in float64."""
    out = torch.zeros_like(lt, dtype=torch.float64)
    for n in range(lt.shape[0]):
        toks = [t for t in range(lt.shape[1]) if mask[n, t] > 0]
        d = {t: min(20.0, max(-20.0, float(lt[n, t]) - float(lr[n, t]))) for t in toks}
        seq, geo = sum(d.values()), sum(d.values()) / max(1, len(toks))
        for t in toks:
            w = 1.0
            if is_level:
                w = min(math.exp(d[t] if is_level == "token" else seq), cap)
            if rs_level:
                x = {"token": d[t], "sequence": seq, "geometric": geo}[rs_level]
                w *= float(math.log(lo) <= x <= math.log(hi))
            out[n, t] = w
    return out


@pytest.mark.parametrize("is_level,rs_level", [("token", ""), ("sequence", ""), ("", "token"), ("", "sequence"),
                                               ("", "geometric"), ("token", "geometric")])
def test_correction_weights_equal_a_naive_float64_reference(is_level, rs_level):
    g = torch.Generator().manual_seed(0)
    lr = -torch.rand(6, 9, generator=g) * 3
    lt = lr + torch.randn(6, 9, generator=g) * 0.4
    mask = (torch.arange(9)[None] < torch.tensor([9, 7, 3, 1, 9, 5])[:, None]).float()
    got = correction_weights(lt, lr, mask, is_level, 1.5, rs_level, 0.6, 1.8)
    want = _naive_weights(lt, lr, mask, is_level, 1.5, rs_level, 0.6, 1.8)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got[mask == 0] == 0).all()
    if rs_level:
        assert 0 < float((got == 0)[mask > 0].float().mean()) < 1       # some rejected, some kept
    m = mismatch(lt, lr, mask)
    d = ((lt - lr).double() * mask)
    assert m["k3"] == pytest.approx(float(((d.exp() - 1 - d) * mask).sum()))
    assert m["out"] == float((((d.exp() < 0.5) | (d.exp() > 2)) & (mask > 0)).sum())


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
