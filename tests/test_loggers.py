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


def test_tag_push_is_the_gradient_on_the_combined_tag_margin():
    """push/<group> (loggers.tag_push) equals, per prompt of the step, d/dz of sum_i A_i log pi(tag_i)
    where pi(unsafe) = sigmoid(z) is each group's two-way choice at the combined tag (autograd),
    and push/decoys counts only the all-safe prompts of a contrast set."""
    import torch
    from safegrpo.config import Config
    from safegrpo.loggers import tag_push
    from safegrpo.rl.grpo import group_advantages
    cfg = Config()
    cfg.rollout.group_size = G = 4
    kinds = [("safe", "safe", "unsafe", True), ("safe", "safe", "safe", True), ("safe", "safe", "safe", False),
             ("unsafe", "safe", "unsafe", False)]
    tags = [["unsafe", "safe", "unsafe", "unsafe"], ["unsafe", "safe", "safe", "safe"],
            ["safe", "unsafe", "safe", "unsafe"], ["unsafe"] * 4]
    rewards = torch.tensor([1.0, 0.0, 0.75, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.75, 1.0, 1.0])
    gold = [dict(zip(("image_tag", "text_tag", "combine_tag"), k[:3])) for k in kinds for _ in range(G)]
    parts = [{"pred": {"combined_safe": t}} for row in tags for t in row]
    decoy = [k[3] and k[2] == "safe" for k in kinds for _ in range(G)]
    got = tag_push(rewards, parts, gold, decoy, cfg)
    adv = group_advantages(rewards, G)
    want = {}
    for b, (k, row) in enumerate(zip(kinds, tags)):
        z = torch.tensor(0.3 * b - 0.2, dtype=torch.float64, requires_grad=True)     # the group's margin
        logp = {"unsafe": torch.nn.functional.logsigmoid(z), "safe": torch.nn.functional.logsigmoid(-z)}
        sum(adv[b * G + i].double() * logp[t] for i, t in enumerate(row)).backward()
        names = ["/".join(k[:3])] + (["decoys"] if k[3] and k[2] == "safe" else [])
        for name in names:
            want[f"push/{name}"] = want.get(f"push/{name}", 0.0) + z.grad.item() / len(kinds)
    assert got.keys() == want.keys() == {"push/safe/safe/unsafe", "push/safe/safe/safe", "push/decoys",
                                         "push/unsafe/safe/unsafe"}
    assert got == pytest.approx(want, abs=1e-6)
    assert got["push/safe/safe/unsafe"] > 0 > got["push/decoys"] and abs(got["push/unsafe/safe/unsafe"]) < 1e-6
