"""grpo.reward plug-ins (verl's custom-reward signature): single and batch form, a call that
raises scores 0 and is counted with its row, a call past grpo.reward_timeout_s is stopped."""
import time

import pytest

from safegrpo.config import load_config
from safegrpo.rl.reward_fn import PluginReward
from safegrpo.trainer import Trainer

from test_trainer import rows, tiny_cfg

TEXTS = ["a", "b", "ab", "abc"]                          # character sums 97, 98, 195, 294: odd, even, odd, even
INFOS = [{"combine_tag": "unsafe"}] * 4


def test_single_and_batch_forms_agree():
    one = PluginReward("plugin_rewards:half_constant")
    batch = PluginReward("plugin_rewards:half_constant_batch")
    assert not one.batch and batch.batch
    want = [(sum(map(ord, t)) % 5) / 4 for t in TEXTS]
    assert one(TEXTS, INFOS).scores == want == batch(TEXTS, INFOS).scores


def test_a_call_that_raises_scores_zero_and_names_its_row():
    with pytest.warns(UserWarning, match=r"2 call\(s\) raised.*first: row a: RuntimeError: plug-in failure"):
        out = PluginReward("plugin_rewards:raises_on_odd")(TEXTS, INFOS, labels=["row a", "row b", "row c", "row d"])
    assert out.scores == [0.0, 1.0, 0.0, 1.0]
    assert [r for r, _ in out.errors] == [0, 2] and out.timeouts == []


def test_a_call_past_the_timeout_is_stopped_and_scores_zero():
    r = PluginReward("plugin_rewards:sleeps_when_long", timeout_s=3.0)
    t0 = time.time()
    with pytest.warns(UserWarning, match="ran past grpo.reward_timeout_s"):
        out = r(TEXTS, INFOS)
    assert time.time() - t0 < 40                   # two hung calls stopped, not waited for (60 s each)
    assert out.scores == [0.0, 1.0, 0.0, 1.0] and out.timeouts == [0, 2]
    r.close()


def test_bad_specs_fail_at_start_up():
    for spec, match in (("nocolon", "module:function"), ("plugin_rewards:missing", "missing"),
                        ("no_such_module_xyz:f", "no_such_module_xyz")):
        with pytest.raises(ValueError, match=match):
            PluginReward(spec)


def test_plugin_errors_are_counted_in_the_metrics(tmp_path, tiny_model_dir, synth_dir):
    cfg = load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "train.steps": 2, "grpo.reward": "plugin_rewards:raises_on_odd", "data.test": ""}))
    with pytest.warns(UserWarning, match=r"raised.*step 1, .*train.parquet: row \d+, sample \d"):
        Trainer(cfg).fit()
    for r in rows(tmp_path / "run"):
        n = 16                                         # 4 prompts x 4 samples
        assert 0 < r["reward/errors"] < n and r["reward/timeouts"] == 0
        assert r["reward/mean"] == pytest.approx(1 - r["reward/errors"] / n)
