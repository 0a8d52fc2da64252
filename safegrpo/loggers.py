"""Experiment tracking: each step's metrics to the trackers named in train.loggers.

    jsonl        out_dir/metrics.jsonl, always (written by the trainer; the source of truth)
    tensorboard  out_dir/tensorboard/ through torch.utils.tensorboard (pip install -e ".[tensorboard]")
    wandb        Weights & Biases, run files under out_dir/wandb/ (pip install -e ".[wandb]");
                 WANDB_MODE=offline runs without a network (`wandb sync` uploads later)

Every tracker gets the same keys as metrics.jsonl at the same step, and the resolved config
as hyper-parameters. On --resume, TensorBoard drops what it had logged after the checkpoint's
step (purge_step); W&B continues the same run id (and ignores the steps it already holds).
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path

from .config import Config


def flat_config(cfg: Config) -> dict:
    """{"section.key": value} with lists as strings (what trackers accept as hyper-parameters)."""
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    walk("", cfg.to_dict())
    return out


def _require(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f'train.loggers lists {extra}, which needs: pip install -e ".[{extra}]"') from None


class TensorBoard:
    def __init__(self, out: Path, cfg: Config, start_step: int, resume: bool = False):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        # resuming: the points after the checkpoint's step are dropped, as metrics.jsonl's lines
        # are (also when the run was killed before its first checkpoint: from step 1)
        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if resume else None)
        if not resume:
            for summary in hparams(flat_config(cfg), {}):
                self.w.file_writer.add_summary(summary)
            self.w.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```")

    def log(self, m: dict) -> None:
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)):
                self.w.add_scalar(k, v, m["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandB:
    def __init__(self, out: Path, cfg: Config, start_step: int, resume: bool = False):
        wandb = _require("wandb", "wandb")
        id_file = out / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)   # one run
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.train.wandb_project, dir=str(out), id=run_id, resume="allow",
                              config=flat_config(cfg), name=out.name)

    def log(self, m: dict) -> None:
        self.run.log({k: v for k, v in m.items() if k != "step"}, step=m["step"])

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The trackers of train.loggers besides jsonl (rank 0 only); `log(metrics)` once per step."""

    def __init__(self, cfg: Config, out: Path, start_step: int = 0, resume: bool = False):
        kinds = {"tensorboard": TensorBoard, "wandb": WandB}
        self.trackers = [kinds[k](Path(out), cfg, start_step, resume) for k in cfg.train.loggers if k in kinds]

    def log(self, m: dict) -> None:
        for t in self.trackers:
            t.log(m)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def check_trackers(cfg: Config) -> None:
    """Raise ImportError naming the extra to install for each tracker of train.loggers that
    cannot be imported (at start-up, before the warm start)."""
    for k, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if k in cfg.train.loggers:
            _require(module, k)
