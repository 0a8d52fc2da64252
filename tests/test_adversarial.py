"""An adversarial user: bad configs, bad files, reused run folders, damaged checkpoints. Each gets
one clear error, as early as it can be known, naming the key, file or row; nothing runs that was
not asked for, nothing is silently dropped, truncated or half-written. (Kills at every moment of
training: test_trainer.py::test_kill_and_resume_gives_the_same_metrics.)"""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from safegrpo.eval.benchmarks import BenchmarkError, load_benchmark
from safegrpo.checkpoint import RunDirError, open_run_dir, load_trainer_state, resumable_checkpoint, CheckpointError
from safegrpo.config import load_config
from safegrpo.data.records import SafeTagError, load_jsonl, load_parquet, write_parquet
from safegrpo.files import MARKER, NotOursError, atomic_path, foreign_entries, own_dir, register, write_atomic
from safegrpo.model import resolve_model_path
from safegrpo.trainer import Trainer

from test_trainer import rows, run_train, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ configs
def _cfg(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("yaml_text,message", [
    ('model:\n  trust_remote_code: "false"\n', r"model.trust_remote_code must be bool, got 'false' \(str\)"),
    ("train:\n  steps: three\n", r"train.steps must be int, got 'three'"),
    ("train:\n  steps: 2.5\n", r"train.steps must be int, got 2.5"),
    ("train:\n  steps: 0\n", r"train.steps must be >= 1, got 0"),
    ("rollout:\n  group_size: 1\n", r"rollout.group_size must be >= 2, got 1"),
    ("rollout:\n  group_size: 0\n", r"rollout.group_size must be >= 2, got 0"),
    ("train:\n  mini_batch_prompts: 0\n", r"train.mini_batch_prompts must be >= 1, got 0"),
    ("train:\n  prompts_per_step: 10\n  mini_batch_prompts: 4\n", r"prompts_per_step \(10\) must be a multiple"),
    ("train:\n  prompts_per_step: 8\n  mini_batch_prompts: 4\n  micro_batch_prompts: 3\n",
     r"mini_batch_prompts \(4\) must be a multiple of world size x train.micro_batch_prompts \(1 x 3\)"),
    ("model:\n  dtype: float16\n", r"model.dtype must be one of 'float32', 'bfloat16', got 'float16'"),
    ("grpo:\n  kl_estimator: k4\n", r"grpo.kl_estimator must be one of 'k1', 'k2', 'k3', got 'k4'"),
    ("grpo:\n  loss_agg: sum\n", r"grpo.loss_agg must be one of"),
    ("grpo:\n  beta: -0.1\n", r"grpo.beta must be >= 0.0, got -0.1"),
    ("rollout:\n  temperature: 0\n", r"rollout.temperature must be > 0.0, got 0.0"),
    ("rollout:\n  temperature: -1\n", r"rollout.temperature must be > 0.0"),
    ("rollout:\n  top_p: 0\n", r"rollout.top_p must be in \(0.0, 1.0\]"),
    ("grpo:\n  dual_clip: 0.5\n", r"grpo.dual_clip must be 0 \(off\) or > 1"),
    ("optim:\n  betas: [0.9]\n", r"optim.betas must be a list of 2 numbers"),
    ("optim:\n  lr: fast\n", r"optim.lr must be float, got 'fast'"),
    ("data:\n  prompt_style: nosuchstyle\n", r"data.prompt_style: unknown prompt_style 'nosuchstyle'"),
    ("data:\n  balance_combined: true\n  balance_groups: true\n", r"at most one of data.balance_combined"),
    ("data:\n  test: x.parquet\n", r"data.test is set but data.train is empty"),
    ("train:\n  device: tpu\n", r"train.device must be cpu, cuda or cuda:N"),
    ("grpo: 3\n", r"config section grpo must be a mapping"),
])
def test_bad_config_fails_at_load_naming_the_key(tmp_path, yaml_text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_cfg(tmp_path, yaml_text))


def test_set_overrides_are_checked_the_same_way(tmp_path):
    with pytest.raises(ValueError, match=r"model.trust_remote_code must be bool, got 'false'"):
        load_config(None, ['model.trust_remote_code="false"'])
    with pytest.raises(ValueError, match=r"unknown config key grpo.betta"):
        load_config(None, ["grpo.betta=0.1"])
    cfg = load_config(None, ["optim.lr=1e-4", "model.trust_remote_code=false", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 1e-4 and cfg.model.trust_remote_code is False and cfg.optim.betas == (0.8, 0.9)


def test_world_size_enters_the_batch_rules():
    with pytest.raises(ValueError, match=r"world size x train.micro_batch_prompts \(4 x 8\)"):
        load_config(None, ["train.prompts_per_step=64", "train.mini_batch_prompts=16"], world_size=4)
    load_config(None, ["train.prompts_per_step=64", "train.mini_batch_prompts=32"], world_size=4)


def test_train_py_reports_a_bad_config_without_a_traceback(tmp_path):
    p = run_train(_cfg(tmp_path, "rollout:\n  temperature: 0\n"))
    assert p.returncode == 2 and "rollout.temperature must be > 0.0" in p.stderr and "Traceback" not in p.stderr


def test_package_model_paths_import_nothing(tmp_path, monkeypatch):
    """package:a.b finds a/b/*.gguf on sys.path; neither a nor a.b is executed."""
    marker = tmp_path / "imported"
    pkg = tmp_path / "site" / "evilpkg"
    (pkg / "weights").mkdir(parents=True)
    for d in (pkg, pkg / "weights"):
        (d / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (pkg / "weights" / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    folder, name = resolve_model_path("package:evilpkg.weights")
    assert Path(folder) == pkg / "weights" and name == "model.gguf"
    assert not marker.exists() and "evilpkg" not in sys.modules
    with pytest.raises(FileNotFoundError, match="package 'nosuch.pkg' is not installed"):
        resolve_model_path("package:nosuch.pkg")


# ------------------------------------------------------------------------------- run folders
def _small(tmp_path, tiny_model_dir, synth_dir, **over):
    return tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"train.steps": 2, "train.prompts_per_step": 2,
                                                             "train.mini_batch_prompts": 2, "train.save_every": 1,
                                                             "rollout.max_new_tokens": 4, **over})


def test_a_fresh_run_in_a_used_folder_stops_and_overwrite_clears_it(tmp_path, tiny_model_dir, synth_dir):
    cfg = _small(tmp_path, tiny_model_dir, synth_dir)
    assert run_train(cfg).returncode == 0
    again = run_train(cfg)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr
    assert len(rows(tmp_path / "run")) == 2                   # the first run is untouched
    own_dir(tmp_path / "run" / "checkpoints" / "step_9")     # a stray higher step a run of ours wrote
    fresh = run_train(cfg, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [MARKER, "step_1", "step_2"]
    assert "final checkpoint: " in fresh.stdout and fresh.stdout.split("final checkpoint: ")[1].split()[0].endswith("step_2")


def test_overwrite_never_deletes_files_a_run_did_not_write(tmp_path):
    """Ours is what the project wrote, at every depth: a user's file at the top, inside
    checkpoints/, sft/ or tensorboard/, or named like a temporary, stops --overwrite, which then
    deletes nothing at all. An unmarked folder is refused before anything (even the lock)."""
    plain = tmp_path / "plain"
    (plain / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(RunDirError, match="safegrpo did not write .checkpoints.*it writes only into folders it created"):
        open_run_dir(plain, resume=False, overwrite=True)
    assert sorted(p.name for p in plain.iterdir()) == ["checkpoints"]          # no marker, no lock written
    for where in ["my_notes.txt", "report.tmp-final.txt", "checkpoints/notes.txt", "checkpoints/step_1/notes.txt",
                  "sft/notes.txt", "tensorboard/notes.txt"]:
        out = tmp_path / where.replace("/", "_")
        own_dir(out)
        write_atomic(out / "metrics.jsonl", "{}\n")
        own_dir(out / "checkpoints")
        with atomic_path(out / "checkpoints" / "step_1") as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"x")
        with atomic_path(out / "sft") as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("{}")
        own_dir(out / "tensorboard")
        register(out / "tensorboard", "events.out.tfevents.*")
        (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"e")
        assert foreign_entries(out) == []
        (out / where).write_text("precious")
        before = sorted(str(p) for p in out.rglob("*"))
        with pytest.raises(RunDirError, match=rf"also holds files a run does not write \({where}\)"):
            open_run_dir(out, resume=False, overwrite=True)
        assert (out / where).read_text() == "precious"
        assert sorted(str(p) for p in out.rglob("*") if p.name != ".lock") == [b for b in before if not b.endswith(".lock")]
    with pytest.raises(RunDirError, match="exclude each other"):
        open_run_dir(out, resume=True, overwrite=True)


def test_a_fresh_run_never_writes_into_a_users_folder(tmp_path, tiny_model_dir, synth_dir):
    """train.out_dir naming a folder of the user's that holds files under run-file names
    (config.yaml, sft/, eval_table.md) is refused before anything is written into it."""
    mine = tmp_path / "mine"
    (mine / "sft").mkdir(parents=True)
    (mine / "sft" / "weights.bin").write_bytes(b"mine")
    (mine / "config.yaml").write_text("mine")
    (mine / "eval_table.md").write_text("mine")
    before = {str(p): p.read_bytes() if p.is_file() else None for p in mine.rglob("*")}
    cfg = _small(tmp_path, tiny_model_dir, synth_dir, **{"train.out_dir": str(mine)})
    p = run_train(cfg)
    assert p.returncode == 2 and "train.out_dir" in p.stderr and "did not write" in p.stderr
    assert "Traceback" not in p.stderr
    assert {str(x): x.read_bytes() if x.is_file() else None for x in mine.rglob("*")} == before


def test_synth_dir_pointing_at_the_users_data_is_refused(tmp_path):
    from safegrpo.data.synth import SynthConfig, write_synth
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"my own data")
    with pytest.raises(NotOursError, match="did not write .train.parquet"):
        write_synth(data, SynthConfig(n_train=8, n_test=4))
    assert (data / "train.parquet").read_bytes() == b"my own data" and sorted(p.name for p in data.iterdir()) == [
        "train.parquet"]
    old = tmp_path / "old"                     # an earlier version's SafeTag-Synth (no marker): taken over
    write_synth(old, SynthConfig(n_train=8, n_test=4))
    (old / MARKER).unlink()
    write_synth(old, SynthConfig(seed=1, n_train=8, n_test=4))
    assert foreign_entries(old) == []


def test_resume_checks_the_checkpoint_was_written_by_this_config(tmp_path, tiny_model_dir, synth_dir):
    cfg = _small(tmp_path, tiny_model_dir, synth_dir, **{"train.steps": 1})
    assert run_train(cfg).returncode == 0
    bad = run_train(cfg, "--resume", "--set", "train.seed=1", "--set", "grpo.beta=0.5")
    assert bad.returncode == 2
    assert "train.seed: 0 -> 1" in bad.stderr and "grpo.beta: 0.01 -> 0.5" in bad.stderr
    cosine = run_train(cfg, "--resume", "--set", "train.steps=2", "--set", "optim.schedule=cosine")
    assert cosine.returncode == 2 and "optim.schedule" in cosine.stderr
    longer = run_train(cfg, "--resume", "--set", "train.steps=2")     # constant lr: extending is fine
    assert longer.returncode == 0 and [r["step"] for r in rows(tmp_path / "run")] == [1, 2]


def test_damaged_checkpoints_are_named_and_skipped(tmp_path, tiny_model_dir, synth_dir, capsys):
    cfg = _small(tmp_path, tiny_model_dir, synth_dir, **{"train.steps": 3})
    assert run_train(cfg).returncode == 0
    ck = tmp_path / "run" / "checkpoints"
    w = ck / "step_3" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])            # truncated weights
    (ck / "step_2" / "trainer_state.json").write_text("")             # an empty state
    conf = load_config(cfg)
    assert resumable_checkpoint(ck, conf).name == "step_1"
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint step_3: " in out and "model.safetensors" in out
    assert "skipping damaged checkpoint step_2: " in out and "trainer_state.json" in out
    assert "falling back to step_1" in out
    with pytest.raises(CheckpointError, match=r"trainer_state.json: cannot be read"):
        load_trainer_state(ck / "step_2", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    resumed = run_train(cfg, "--resume")
    assert resumed.returncode == 0 and "falling back to step_1" in resumed.stdout
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2, 3]


def test_a_kill_mid_write_leaves_the_old_file(tmp_path):
    f = write_atomic(tmp_path / "eval_before.json", '{"n": 1}')
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(f) as tmp:
            tmp.write_text('{"n": ')                                     # half-written ...
            raise KeyboardInterrupt                                     # ... when the process dies
    assert json.loads(f.read_text()) == {"n": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["eval_before.json"]


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path, tiny_model_dir, synth_dir):
    cfg = _small(tmp_path, tiny_model_dir, synth_dir, **{"train.steps": 1})
    assert run_train(cfg).returncode == 0
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "reward/me')                               # killed mid-append
    assert run_train(cfg, "--resume", "--set", "train.steps=2").returncode == 0
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]


# ---------------------------------------------------------------------------------------- data
def test_overlong_prompts_are_found_at_load_in_train_and_test(tmp_path, tiny_model_dir, synth_dir, capsys):
    from safegrpo.data.records import SafeTagRecord
    recs = load_parquet(synth_dir / "test.parquet", limit=4)
    recs[2] = SafeTagRecord(recs[2].prompt + " and" * 100, recs[2].images, "safe", "safe", "safe")
    write_parquet(recs, tmp_path / "test.parquet")
    cfg = load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"data.test": str(tmp_path / "test.parquet")}))
    with pytest.raises(ValueError, match=r"test.parquet: row 2: the prompt has \d+ tokens, more than "
                                         r"data.max_prompt_length=128 \(1 such row"):
        Trainer(cfg)                                                    # before any model is loaded
    cfg.data.filter_overlong_prompts = True
    tr = Trainer(cfg)
    assert len(tr.test_records) == 3 and "dropped 1 prompt(s) longer than 128 tokens" in capsys.readouterr().out


def _parquet_with_bad_bytes(path: Path, good) -> Path:
    """good's rows, row 1's prompt replaced by bytes that are not UTF-8 in the string column
    (pyarrow accepts such buffers unvalidated, as a file written by another tool may hold)."""
    write_parquet(good, path)
    t = pq.read_table(path)
    prompts = [r.prompt.encode() for r in good]
    prompts[1] = b"caf\xe9 \xff"
    offsets = [0]
    for x in prompts:
        offsets.append(offsets[-1] + len(x))
    bad = pa.Array.from_buffers(pa.string(), len(prompts),
                                [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(prompts))])
    pq.write_table(t.set_column(t.column_names.index("prompt"), "prompt", bad), path)
    return path


def test_text_that_is_not_utf8_names_file_and_row(tmp_path, synth_dir):
    good = load_parquet(synth_dir / "test.parquet", limit=3)
    path = _parquet_with_bad_bytes(tmp_path / "bad.parquet", good)
    with pytest.raises(SafeTagError, match=r"bad.parquet: row 1: text is not valid UTF-8"):
        load_parquet(path)
    report = []
    assert len(load_parquet(path, skip_invalid=True, report=report)) == 2 and report[0].skipped[0][0] == 1
    lines = [json.dumps({"prompt": "ok", "images": [], "image_tag": "safe", "text_tag": "safe", "combine_tag": "safe"})] * 3
    raw = (lines[0] + "\n").encode() + b'{"prompt": "caf\xe9", "images": []}\n' + (lines[2] + "\n").encode()
    (tmp_path / "bad.jsonl").write_bytes(raw)
    with pytest.raises(SafeTagError, match=r"bad.jsonl: row 1: not valid UTF-8"):
        load_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "surrogate.jsonl").write_text(lines[0] + "\n" + lines[0].replace('"ok"', '"\\ud800 lone"') + "\n")
    with pytest.raises(SafeTagError, match=r"surrogate.jsonl: row 1: column 'prompt' is not valid UTF-8 text"):
        load_jsonl(tmp_path / "surrogate.jsonl")
    assert len(load_jsonl(tmp_path / "surrogate.jsonl", skip_invalid=True)) == 1


def test_nothing_left_after_skipping_is_its_own_error(tmp_path):
    (tmp_path / "all_bad.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(SafeTagError, match=r"all_bad.jsonl: no valid row left: all 2 rows were skipped"):
        load_jsonl(tmp_path / "all_bad.jsonl", skip_invalid=True)


def test_huge_images_are_kept_small_and_paths_stay_in_the_data_folder(tmp_path):
    big = tmp_path / "data" / "big.jpg"
    big.parent.mkdir()
    Image.new("RGB", (8000, 8000), (10, 200, 30)).save(big, quality=50)
    row = {"images": ["big.jpg"], "image_tag": "safe", "text_tag": "safe", "combine_tag": "safe", "prompt": "hi"}
    (tmp_path / "data" / "d.jsonl").write_text(json.dumps(row) + "\n")
    (rec,) = load_jsonl(tmp_path / "data" / "d.jsonl", max_pixels=112 * 56)
    w, h = rec.images[0].size
    assert w * h <= 112 * 56 and w == h and rec.images[0].getpixel((w // 2, h // 2))[1] > 150
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    for ref in ("../secret.png", str(outside)):
        (tmp_path / "data" / "e.jsonl").write_text(json.dumps({**row, "images": [ref]}) + "\n")
        with pytest.raises(SafeTagError, match=r"e.jsonl: row 0, image 0: image path .* leads outside .*data"):
            load_jsonl(tmp_path / "data" / "e.jsonl")
        assert len(load_jsonl(tmp_path / "data" / "e.jsonl", allow_outside=True)) == 1


# ------------------------------------------------------------------------- nothing truncated
def test_a_judge_returning_the_wrong_number_of_verdicts_raises():
    from safegrpo.eval.benchmarks import item
    from safegrpo.eval.metrics import score

    class Short:
        name = "short"

        def judge(self, answers, prompts=None):
            return [True] * (len(answers) - 1)

    items = [item("b", i, "p", [], ("safe", "safe", "safe"), "A", "answer") for i in range(3)]
    with pytest.raises(ValueError, match="judge 'short' returned 2 verdicts for 3 answers"):
        score(items, ["x"] * 3, Short())


def test_eval_rejects_a_negative_limit_and_writes_only_under_out(tmp_path, tiny_model_dir):
    cmd = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(tiny_model_dir), "--limit", "-1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--limit must be >= 0" in p.stderr
    synth = tmp_path / "synth"                                          # the training data folder ...
    synth.mkdir()
    (synth / "manifest.json").write_text('{"settings": {"seed": 99}}')  # ... made with other settings
    cfg = _cfg(tmp_path, f"data:\n  synth_dir: {synth}\n  prompt_style: compact\nrollout:\n  max_new_tokens: 4\n")
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--config", str(cfg), "--checkpoint", str(tiny_model_dir),
                        "--benchmark", "safetag-synth", "--limit", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in synth.iterdir()) == ["manifest.json"]     # untouched
    assert (out / "safetag-synth" / "test.parquet").is_file() and (out / "eval.json").is_file()


# ------------------------------------------------------------------------------- benchmarks
def _figstep(root: Path, csv_text: bytes) -> Path:
    (root / "data" / "question").mkdir(parents=True)
    (root / "data" / "images" / "SafeBench").mkdir(parents=True)
    (root / "data" / "question" / "safebench.csv").write_bytes(csv_text)
    return root


HEADER = b"dataset,category_id,task_id,category_name,question,instruction\n"


@pytest.mark.parametrize("body,message", [
    (b"", r"safebench.csv: no data rows"),
    (HEADER, r"safebench.csv: no data rows"),
    (HEADER + b'ForbidQI,1,1,"Illegal,q,i\nForbidQI,1,2,x,q,i\n', r"safebench.csv: line \d+: the row does not have the header's 6 fields"),
    (HEADER + b"ForbidQI,1,1,Ill\xe9gal,q,i\n", r"safebench.csv: line 2: not valid UTF-8"),
    (HEADER + b"ForbidQI,1,1,x,q,i\n", r"figstep: no items loaded from .* \(all 1 skipped: missing image"),
])
def test_bad_benchmark_csvs_fail_while_loading(tmp_path, body, message):
    root = _figstep(tmp_path / "fig", body)
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark("figstep", root, skip_missing=True)


@pytest.mark.parametrize("entry,message", [
    ({"image": ["a.png"], "safe": True}, r"field 'image' must be a str, got \['a.png'\]"),
    ({"safe": "yes"}, r"field 'safe' must be a bool, got 'yes'"),
    ({"safe": None}, r"missing or null field\(s\) \['safe'\]"),
    ({"instr-resp": [{"safe_instruction": None, "response": "r"}]}, r"instruction is empty or missing \(None\)"),
])
def test_bad_vlguard_items_fail_while_loading(tmp_path, entry, message):
    (tmp_path / "test").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "a.png")
    row = {"id": "x1", "image": "a.png", "safe": True,
           "instr-resp": [{"safe_instruction": "Describe it.", "response": "r"}], **entry}
    (tmp_path / "test.json").write_text(json.dumps([row]))
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark("vlguard", tmp_path / "test.json")
