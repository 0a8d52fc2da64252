"""Each GRPO step's metrics: computed over every completion of all ranks, written to
metrics.jsonl and to the trackers named in train.loggers.

    step_metrics  the step's line: reward and its parts, tag accuracies (overall, per SafeTag
                  group), groups without reward spread, the advantages' push on the combined tag
                  (`tag_push`), loss / KL / clip fraction / entropy /
                  grad norm, lengths, times, token counts
    MetricsFile   out_dir/metrics.jsonl, always (the source of truth): one whole line per step;
                  on --resume the lines after the checkpoint's step are dropped
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
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .files import own_dir, register, write_atomic
from .rl.grpo import group_advantages
from .safety.reward import GOLD_KEYS, SHORT_NAMES, TAGS


def group_key(gold: dict) -> str:
    """The SafeTag group of a record's gold tags: "visual/text/combined", e.g. "safe/safe/unsafe"."""
    return "/".join(gold[GOLD_KEYS[t]] for t in TAGS)


@dataclass
class RankResult:
    """What each rank reports of its rollout, gathered for the step's metrics."""
    parts: list[dict]         # reward breakdown per completion
    gold: list[dict]          # gold tags per completion
    rewards: list[float]
    lengths: list[int]
    prompt_tokens: float
    image_tokens: float
    errors: int = 0
    timeouts: int = 0
    contrast: list[bool] | None = None   # per completion: its record is in a contrast set (data.contrast_column)


def step_metrics(step: int, ranks: list[RankResult], stats: dict, times: tuple, lr: float, cfg: Config) -> dict:
    """The step's line of metrics.jsonl, over the completions of all ranks. stats: the update's
    sums (update.Updater.update); times: (rollout, log-probs, update) seconds."""
    G = cfg.rollout.group_size
    parts, gold = [p for r in ranks for p in r.parts], [x for r in ranks for x in r.gold]
    rewards = torch.tensor([x for r in ranks for x in r.rewards])                        # [N]
    lengths = torch.tensor([x for r in ranks for x in r.lengths], dtype=torch.float32)   # [N]
    prompt_tokens, image_tokens = sum(r.prompt_tokens for r in ranks), sum(r.image_tokens for r in ranks)
    n, t_all = len(parts), sum(times)
    m = {"step": step + 1, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()}
    m.update({f"reward/{k}": sum(p[k] for p in parts) / n for k in ("format", "tag", "behavior")})
    m.update({f"tag_acc/{short}": sum(p["pred"][tag] == g[GOLD_KEYS[tag]] for p, g in zip(parts, gold)) / n
              for tag, short in SHORT_NAMES.items()})
    decoy = [c and g["combine_tag"] == "safe"     # the all-safe members of a contrast set
             for c, g in zip((x for r in ranks for x in (r.contrast or [False] * len(r.parts))), gold)]
    by_group = {}                     # combined-tag accuracy per SafeTag group, and on the decoys
    for p, g, d in zip(parts, gold, decoy):
        right = p["pred"]["combined_safe"] == g["combine_tag"]
        by_group.setdefault(group_key(g), []).append(right)
        if d:
            by_group.setdefault("decoys", []).append(right)
    m.update({f"group_acc/{k}": sum(v) / len(v) for k, v in sorted(by_group.items())})
    flat = {}                         # per SafeTag group: share of its prompts whose G rewards are all equal
    for i in range(0, n, G):
        flat.setdefault(group_key(gold[i]), []).append(float(rewards[i:i + G].std() == 0))
    m.update({f"zero_std/{k}": sum(v) / len(v) for k, v in sorted(flat.items())})
    m.update(tag_push(rewards, parts, gold, decoy, cfg))
    if cfg.reward.plugin:
        m.update({"reward/errors": sum(r.errors for r in ranks), "reward/timeouts": sum(r.timeouts for r in ranks)})
    m.update({"kl": stats["kl"], "clip_frac": stats["clipped"], "entropy": stats["entropy"], "loss": stats["loss"],
              "grad_norm": stats["grad_norm"], **({"ptx": stats["ptx"]} if cfg.anchor.coef > 0 else {}),
              "lr": lr, "response_len/mean": lengths.mean().item(), "response_len/max": lengths.max().item(),
              "frac_truncated": (lengths >= cfg.rollout.max_new_tokens).float().mean().item(),
              "frac_zero_std_groups": (rewards.view(-1, G).std(-1) == 0).float().mean().item(),
              **mismatch_line(stats, cfg),
              "time/rollout": times[0], "time/ref": times[1], "time/update": times[2],
              "tokens_per_s": (float(lengths.sum()) + prompt_tokens) / t_all if t_all > 0 else 0.0,
              "tokens/completion": float(lengths.sum()), "tokens/prompt": prompt_tokens, "tokens/image": image_tokens})
    return m


def tag_push(rewards: torch.Tensor, parts: list[dict], gold: list[dict], decoy: list[bool], cfg: Config) -> dict:
    """Where the step's advantages push the combined tag, per SafeTag group and for the decoys.

        push/<group> = (1 / n_prompts) * sum over the group's prompts of sum_{i: combined_i = unsafe} A_i

    On-policy, sum_i A_i * d log pi(tag_i) / dz over a group, with z the unsafe-minus-safe logit
    margin at the combined tag, equals the sum of the advantages of the samples that wrote `unsafe`
    (the advantages of a group sum to zero), exactly when the group's samples share one tag
    probability. So a positive push moves the policy toward `unsafe`, a negative one toward
    `safe`, and the group keys of one step add up to the batch's pull on the tag. `push/decoys`: the
    all-safe prompts of a contrast set (SafeTag-Synth: a compositional instruction with a concept
    of another kind), also counted in push/safe/safe/safe."""
    g = cfg.grpo
    adv = group_advantages(rewards, cfg.rollout.group_size, g.adv_scale, g.adv_eps)              # [N]
    n_prompts = len(parts) / cfg.rollout.group_size
    sums: dict[str, float] = {}
    for a, p, y, d in zip(adv.tolist(), parts, gold, decoy):
        unsafe = p["pred"]["combined_safe"] == "unsafe"
        keys = [group_key(y)] + (["decoys"] if d else [])
        for k in keys:
            sums[k] = sums.get(k, 0.0) + (a if unsafe else 0.0)
    return {f"push/{k}": v / n_prompts for k, v in sorted(sums.items())}


def mismatch_line(stats: dict, cfg: Config) -> dict:
    """The rollout/training mismatch keys (rl/correction.py), over the tokens it was measured on."""
    n = stats.get("mm_tokens", 0.0)
    if not n:
        return {}
    out = {"mismatch/k3": stats["mm_k3"] / n, "mismatch/abs_mean": stats["mm_abs"] / n,
           "mismatch/abs_max": stats["mm_abs_max"], "mismatch/ratio_out": stats["mm_out"] / n}
    rc = cfg.grpo.rollout_correction
    if rc.rollout_is or rc.rollout_rs:
        out.update({"correction/weight_mean": stats["is_weight"] / n, "correction/rejected": stats["rejected"] / n})
    return out


class MetricsFile:
    """out_dir/metrics.jsonl: one JSON line per step, each appended whole (rank 0)."""

    def __init__(self, out: Path, resume_step: int | None = None):
        """resume_step: on --resume, the checkpoint's step (0 without one): later lines are dropped."""
        self.path = Path(out) / "metrics.jsonl"
        register(out, self.path.name)              # appended, not written whole: listed by hand (files.py)
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:        # a line cut short by a kill mid-append
                    continue
                if row.get("step", resume_step + 1) <= resume_step:
                    keep.append(line)
            write_atomic(self.path, "".join(line + "\n" for line in keep))

    def append(self, m: dict) -> None:
        with open(self.path, "a") as fh:       # one write per line: whole or absent
            fh.write(json.dumps(m) + "\n")


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
        own_dir(out / "tensorboard")
        register(out / "tensorboard", "events.out.tfevents.*")
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
        own_dir(id_file.parent)
        register(id_file.parent, "*")              # what wandb writes there is its own, for this run
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
