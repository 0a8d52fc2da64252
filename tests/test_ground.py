"""What a careless or hostile user tried (issue 22): nothing the user made is deleted, one run
per folder, bad values named at start-up without a traceback, judges must say True or False, a
benchmark path that does not exist is an error, DAPO that keeps nothing stops, and TensorBoard
agrees with metrics.jsonl after a kill before the first checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from safegrpo.checkpoint import RunDirError, lock_run_dir
from safegrpo.config import load_config
from safegrpo.files import NotOursError, atomic_path

from test_trainer import rows, run_train, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def _folder_with_notes(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def test_a_folder_we_did_not_write_is_never_replaced(tmp_path):
    mine = _folder_with_notes(tmp_path / "mine")
    with pytest.raises(NotOursError, match=f"{mine} exists and was not written by safegrpo"):
        with atomic_path(mine) as tmp:
            tmp.mkdir()
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    with atomic_path(mine, ours=lambda p: (p / "notes.txt").is_file()) as tmp:   # ours: replaced
        tmp.mkdir()
    assert [p.name for p in mine.iterdir()] == [".safegrpo"]          # replaced, and marked as ours


@pytest.mark.parametrize("target", ["notes", "checkpoint", "run"])
def test_export_merged_refuses_a_folder_that_is_not_an_earlier_export(tmp_path, tiny_model_dir, synth_dir, target):
    from test_lora import lora_cfg
    pytest.importorskip("peft")
    cfg = lora_cfg(tmp_path, tiny_model_dir, synth_dir, **{"train.steps": 1, "data.test": ""})
    assert run_train(cfg).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    out = {"notes": _folder_with_notes(tmp_path / "notes") if target == "notes" else None,
           "checkpoint": ckpt, "run": tmp_path / "run"}[target]
    before = sorted(str(p) for p in out.rglob("*"))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--export-merged", str(ckpt), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "was not written by safegrpo" in p.stderr and "Traceback" not in p.stderr
    assert sorted(str(p) for p in out.rglob("*")) == before
    if target == "notes":                                  # an export may be written again over itself
        again = tmp_path / "merged"
        for _ in range(2):
            p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--export-merged", str(ckpt), str(again)],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr[-2000:]


def test_tiny_dir_set_to_a_users_folder_is_refused(tmp_path):
    mine = _folder_with_notes(tmp_path / "mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  tiny_dir: {mine}\ntrain:\n  out_dir: {tmp_path / 'run'}\n  steps: 1\n"
                   f"data:\n  synth_dir: {tmp_path / 'synth'}\n")
    p = run_train(cfg)
    assert p.returncode == 2 and f"{mine} exists and was not written by safegrpo" in p.stderr
    assert "Traceback" not in p.stderr and sorted(x.name for x in mine.iterdir()) == ["notes.txt"]


def test_one_live_run_per_folder(tmp_path):
    held = lock_run_dir(tmp_path / "run")
    import os
    with pytest.raises(RunDirError, match=rf"in use by a live run \(process {os.getpid()}\)"):
        lock_run_dir(tmp_path / "run")
    held.close()                                           # the holder ends: the folder is free again
    lock_run_dir(tmp_path / "run").close()


def test_a_second_train_py_on_a_live_run_stops_naming_it(tmp_path, tiny_model_dir, synth_dir):
    """The first run is held inside its first step by a reward plug-in that waits on a file (a
    barrier), so it is surely alive and holding the lock while the others start, however slow
    the machine (a 30-step run raced the second process's start-up and ended first)."""
    import os
    import time
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"train.steps": 2, "data.test": "",
                                                           "reward.plugin": "plugin_rewards:barrier"})
    gate = tmp_path / "gate"
    env = {**os.environ, "SAFEGRPO_BARRIER": str(gate), "PYTHONPATH": str(Path(__file__).parent)}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not Path(f"{gate}.reached").exists() and time.time() - t0 < 300 and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None and Path(f"{gate}.reached").exists()     # alive, inside step 1
        for extra in ((), ("--resume",)):
            p = run_train(cfg, *extra)
            assert p.returncode == 2 and f"in use by a live run (process {first.pid})" in p.stderr, p.stderr[-800:]
        Path(f"{gate}.release").touch()
        assert first.wait(timeout=300) == 0
    finally:
        Path(f"{gate}.release").touch()
        first.kill()
        first.wait()
    p = run_train(cfg, "--overwrite", "--set", "train.steps=1", "--set", "reward.plugin=''")    # free once it ended
    assert p.returncode == 0, p.stderr[-800:]


@pytest.mark.parametrize("key, value", [("rollout.temperature", ".inf"), ("model.lora.alpha", ".inf"),
                                        ("optim.lr", ".nan"), ("grpo.beta", "inf")])
def test_non_finite_floats_are_refused_at_load(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"config key {key} must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_a_device_name_is_checked_whole():
    with pytest.raises(ValueError, match="train.device"):
        load_config(None, ["train.device=cuda:abc"])
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"


def test_judge_verdicts_must_be_booleans():
    from safegrpo.eval.benchmarks import item
    from safegrpo.eval.metrics import score

    class Words:
        name = "words"

        def judge(self, answers, prompts=None):
            return [True, "no", 0.2][:len(answers)]

    items = [item("b", i, "p", [], ("safe", "safe", "safe"), "A", "answer") for i in range(3)]
    with pytest.raises(ValueError, match=r"judge 'words': verdict for item 1 .* is 'no', not a bool"):
        score(items, ["x"] * 3, Words())


def test_eval_stops_on_a_benchmark_path_that_does_not_exist_and_on_an_unknown_judge(tmp_path, tiny_model_dir):
    base = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(tiny_model_dir), "--out", str(tmp_path / "ev")]
    p = subprocess.run(base + ["--benchmark", f"safetag-synth={tmp_path / 'typo'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and f"safetag-synth={tmp_path / 'typo'}: no such file or folder" in p.stderr
    p = subprocess.run(base + ["--benchmark", "xstest", "--judge", "nosuchjudge"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "unknown refusal judge 'nosuchjudge'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "ev").exists()                 # nothing generated first


def test_a_kv_budget_too_small_for_the_longest_prompt_stops_at_start_up(tmp_path, tiny_model_dir, synth_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"rollout.max_batch_tokens": 60, "sft.enabled": True})
    p = run_train(cfg)
    assert p.returncode == 2 and "rollout.max_batch_tokens=60 holds no prompt of" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run" / "sft").exists()     # before the warm start


def test_dapo_that_keeps_nothing_says_so_and_stops(tmp_path, tiny_model_dir, synth_dir):
    """A reward with no spread anywhere: every step would learn nothing, exit 0."""
    from safegrpo.data.records import load_parquet, write_parquet
    safe = [r for r in load_parquet(synth_dir / "train.parquet", limit=200) if r.combine_tag == "safe"][:8]
    write_parquet(safe, tmp_path / "safe.parquet")          # half_constant scores these 0: no spread
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "data.train": str(tmp_path / "safe.parquet"), "data.test": "", "reward.plugin": "plugin_rewards:half_constant",
        "grpo.filter_zero_std": True, "grpo.max_empty_steps": 2, "train.steps": 5})
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "tests")})
    assert p.returncode == 2, p.stderr[-2000:]
    assert "no group had reward spread" in p.stdout + p.stderr
    assert "kept no group for 2 steps in a row (up to step 2)" in p.stderr
    assert [r["dapo/kept"] for r in rows(tmp_path / "run")] == [0, 0]


def test_tensorboard_after_a_kill_before_the_first_checkpoint(tmp_path):
    """Killed after logging step 1 but before any checkpoint: --resume starts from step 0, and
    TensorBoard's step 1 is the new run's, once (as metrics.jsonl is truncated)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from safegrpo.loggers import Loggers
    cfg = load_config(None, ["train.loggers=[jsonl, tensorboard]"])
    first = Loggers(cfg, tmp_path, 0)
    first.log({"step": 1, "kl": 1.0})
    first.close()
    again = Loggers(cfg, tmp_path, 0, resume=True)
    for s, v in ((1, 2.0), (2, 3.0)):
        again.log({"step": s, "kl": v})
    again.close()
    ev = EventAccumulator(str(tmp_path / "tensorboard"))
    ev.Reload()
    assert [(e.step, e.value) for e in ev.Scalars("kl")] == [(1, 2.0), (2, 3.0)]


def test_a_reader_never_deletes_a_live_runs_checkpoint_only_the_lock_holder_cleans(tmp_path):
    """eval.py's latest_checkpoint ran beside a live train.py and removed the .step_N.tmp-PID
    folder it was writing (the run died with FileNotFoundError). Readers leave it; the process
    that takes the run's lock removes its own folder's leftovers."""
    from safegrpo.checkpoint import latest_checkpoint, open_run_dir
    from safegrpo.files import own_dir
    out = own_dir(tmp_path / "run")
    ck = own_dir(out / "checkpoints")
    with atomic_path(ck / "step_1") as t:
        t.mkdir()
        (t / "trainer_state.json").write_text('{"step": 1}')
    live = ck / ".step_2.tmp-4242"
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    assert latest_checkpoint(ck).name == "step_1" and live.is_dir()
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(ck / "step_9")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)           # eval.py resolves checkpoints too
    assert p.returncode == 2 and live.is_dir()
    open_run_dir(out, resume=True, overwrite=False).close()
    assert not live.exists() and (ck / "step_1").is_dir()


def test_resume_without_a_checkpoint_rebuilds_what_another_config_made(tmp_path, tiny_model_dir, synth_dir):
    """--resume finding no intact checkpoint starts from the beginning: a warm start and a
    'before' evaluation made under other settings are made again (their fingerprints differ),
    not reused beside a config.yaml that records the new settings; under the same settings
    they are reused."""
    over = {"train.steps": 1, "sft.enabled": True, "sft.steps": 3, "sft.batch_size": 2, "train.eval_limit": 2,
            "train.save_every": 0, "rollout.max_new_tokens": 4}
    cfg = tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **over)
    first = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "run"
    import shutil
    shutil.rmtree(out / "checkpoints")                                 # killed before its checkpoint
    sft_lines = lambda: len((out / "sft_metrics.jsonl").read_text().splitlines())     # noqa: E731
    assert sft_lines() == 3
    before = json.loads((out / "eval_before.json").read_text())
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--resume",
                        "--set", "sft.steps=5", "--set", "train.eval_limit=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no intact checkpoint" in p.stdout and "made again" in p.stdout
    assert sft_lines() == 5
    again = json.loads((out / "eval_before.json").read_text())
    assert again["n"] == 3 != before["n"] and again["fingerprint"]["sft"]["steps"] == 5
    shutil.rmtree(out / "checkpoints")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--resume",
                        "--set", "sft.steps=5", "--set", "train.eval_limit=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "made again" not in p.stdout and "[sft]" not in p.stdout      # reused


def test_pruning_keeps_the_newest_and_never_a_checkpoint_holding_a_users_file(tmp_path, capsys):
    from safegrpo.checkpoint import prune_checkpoints
    from safegrpo.files import own_dir
    ck = own_dir(tmp_path / "checkpoints")
    for n in range(1, 6):
        with atomic_path(ck / f"step_{n}") as t:
            t.mkdir()
            (t / "model.safetensors").write_bytes(b"w")
    (ck / "step_1" / "my_analysis.ipynb").write_text("mine")
    prune_checkpoints(ck, 2)                              # train.keep_checkpoints
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_1", "step_4", "step_5"]
    assert (ck / "step_1" / "my_analysis.ipynb").read_text() == "mine" and "not pruning" in capsys.readouterr().out
    prune_checkpoints(ck, 0)                              # 0: keep all
    assert len([p for p in ck.iterdir() if p.name.startswith("step_")]) == 3


def test_threads_writing_into_one_folder_of_ours_all_get_listed(tmp_path):
    """The endpoint client's threads write replies into one cache folder at once: every write
    is listed in its marker (a marker rewritten by two threads at once lost entries or failed)."""
    import threading
    from safegrpo.files import foreign_entries, own_dir, write_atomic
    folder = own_dir(tmp_path / "cache")
    errors = []

    def write(k):
        try:
            for i in range(25):
                write_atomic(folder / f"{k}-{i}.json", "{}")
        except Exception as e:            # noqa: BLE001  (any failure fails the test below)
            errors.append(e)
    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(list(folder.glob("*.json"))) == 200 and foreign_entries(folder) == []
