"""train.loggers: TensorBoard's event file holds the metrics.jsonl curves and the config; an
offline W&B run directory is written."""

import pytest

from safegrpo.config import load_config
from safegrpo.trainer import Trainer

from test_trainer import rows, tiny_cfg


def test_tensorboard_holds_the_reward_curve(tmp_path, tiny_model_dir, synth_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "train.steps": 3, "train.loggers": ["jsonl", "tensorboard"], "data.test": "", "grpo.entropy_coef": 0.05}))
    Trainer(cfg).fit()
    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ev.Reload()
    want = rows(tmp_path / "run")
    for key in ("reward/mean", "kl", "lr", "tag_acc/combined"):
        got = ev.Scalars(key)
        assert [e.step for e in got] == [r["step"] for r in want]
        assert [e.value for e in got] == pytest.approx([r[key] for r in want], rel=1e-6, abs=1e-7)
    assert "config/text_summary" in ev.Tags()["tensors"]


def test_wandb_offline_writes_a_run_directory(tmp_path, tiny_model_dir, synth_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{
        "train.steps": 2, "train.loggers": ["jsonl", "wandb"], "data.test": ""}))
    Trainer(cfg).fit()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(f.endswith(".wandb") for f in files)
    run_id = (tmp_path / "run" / "wandb" / "run_id").read_text()
    assert runs[0].name.endswith(run_id)
    log = next(runs[0].rglob("*.wandb")).read_bytes()       # the run's records (protobuf; keys in clear)
    for key in (b"grpo.beta", b"train.steps", b"reward/mean", b"tag_acc/combined"):
        assert key in log, key


def test_unknown_logger_is_refused(tmp_path, tiny_model_dir, synth_dir):
    with pytest.raises(ValueError, match="train.loggers"):
        load_config(tiny_cfg(tmp_path, tiny_model_dir, synth_dir, **{"train.loggers": ["jsonl", "mlflow"]}))
