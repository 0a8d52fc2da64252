"""reward.plugin plug-ins (verl's custom-reward signature): single and batch form, a call that
raises scores 0 and is counted with its row, a call past reward.timeout_s is stopped."""
import time
from pathlib import Path

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
    with pytest.warns(UserWarning, match=r"2 call\(s\) failed.*first: row a: RuntimeError: plug-in failure"):
        out = PluginReward("plugin_rewards:raises_on_odd")(TEXTS, INFOS, labels=["row a", "row b", "row c", "row d"])
    assert out.scores == [0.0, 1.0, 0.0, 1.0]
    assert [r for r, _ in out.errors] == [0, 2] and out.timeouts == []


def test_a_call_past_the_timeout_is_stopped_and_scores_zero():
    r = PluginReward("plugin_rewards:sleeps_when_long", timeout_s=3.0)
    t0 = time.time()
    with pytest.warns(UserWarning, match="ran past reward.timeout_s"):
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
        "train.steps": 2, "reward.plugin": "plugin_rewards:raises_on_odd", "data.test": ""}))
    with pytest.warns(UserWarning, match=r"failed.*step 1, .*train.parquet: row \d+, sample \d"):
        Trainer(cfg).fit()
    for r in rows(tmp_path / "run"):
        n = 16                                         # 4 prompts x 4 samples
        assert 0 < r["reward/errors"] < n and r["reward/timeouts"] == 0
        assert r["reward/mean"] == pytest.approx(1 - r["reward/errors"] / n)


def test_a_plugin_cannot_end_training_with_sys_exit():
    for timeout in (0.0, 5.0):
        r = PluginReward("plugin_rewards:exits", timeout_s=timeout)
        with pytest.warns(UserWarning, match=r"2 call\(s\) failed.*sys.exit\(0\)"):
            out = r(TEXTS, INFOS)
        assert out.scores == [0.0, 1.0, 0.0, 1.0] and [i for i, _ in out.errors] == [0, 2]
        r.close()


def test_a_dead_worker_is_replaced_and_counted(tmp_path):
    r = PluginReward("plugin_rewards:dies_once", timeout_s=20.0, workers=2)
    infos = [{"combine_tag": "unsafe", "marker": str(tmp_path / "died")}] * 4
    with pytest.warns(UserWarning, match="worker process died"):
        first = r(TEXTS, infos)
    assert first.errors and first.scores[2] == 0.0
    second = r(TEXTS, infos)                               # a new worker: every later call scores
    assert second.scores == [1.0] * 4 and not second.errors and not second.timeouts
    r.close()


def test_timed_calls_run_at_once_and_the_import_is_not_timed(tmp_path, monkeypatch):
    """8 calls of 1 s on 4 workers under a 1.5 s timeout: about 2 s in all, none timed out. The
    plug-in module takes 3 s to import, more than the timeout: the workers import it first."""
    (tmp_path / "slow_import_plugin.py").write_text(
        "import time\ntime.sleep(3)\nfrom plugin_rewards import sleeps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import os
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    r = PluginReward("slow_import_plugin:sleeps", timeout_s=1.5, workers=4)
    r(TEXTS[:1], INFOS[:1])                                  # start the workers (imports, untimed)
    t0 = time.time()
    out = r(TEXTS * 2, INFOS * 2)
    took = time.time() - t0
    assert out.scores == [1.0] * 8 and not out.timeouts and not out.errors
    assert took < 6, took                                    # one after another: >= 8 s
    r.close()


def test_a_batch_plugin_that_empties_its_input_is_an_error():
    with pytest.warns(UserWarning, match="returned 0 scores for 4 completions"):
        out = PluginReward("plugin_rewards:empties_batch")(TEXTS, INFOS)
    assert len(out.errors) == 4 and out.scores == [0.0] * 4


def test_a_score_that_is_not_a_number_is_refused():
    """"0.75" or True was scored as 0.75 / 1.0; a plug-in returning them has a bug: scored 0, counted."""
    for spec, shown in (("plugin_rewards:as_text", r"'0.75' \(str\)"), ("plugin_rewards:as_bool", r"True \(bool\)")):
        r = PluginReward(spec)
        with pytest.warns(UserWarning, match=rf"4 call\(s\) failed.*returned {shown}, not a number"):
            out = r(TEXTS, INFOS)
        assert out.scores == [0.0] * 4 and len(out.errors) == 4
        r.close()


def test_os_exit_in_a_plugin_cannot_end_training_even_without_a_timeout():
    """os._exit(0) ended training with rc 0 and no message when the plug-in ran in-process: it
    runs in worker processes always; the dead worker's calls score 0 and are counted."""
    r = PluginReward("plugin_rewards:hard_exits", timeout_s=0.0, workers=2)
    with pytest.warns(UserWarning, match="worker process died"):
        out = r(TEXTS, INFOS)
    assert out.errors and out.scores[0] == 0.0
    again = r(["b", "ab"], INFOS[:2])                      # replaced: the next calls run
    assert again.scores[0] == 1.0
    r.close()


def test_a_plugin_that_raises_at_import_is_one_line(tmp_path, tiny_model_dir, synth_dir):
    import subprocess
    import sys
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"reward.plugin": "plugin_broken:score"})
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "train.py"), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "reward.plugin 'plugin_broken:score': importing plugin_broken raised RuntimeError: the plug-in's own " \
           "setup failed" in p.stderr
