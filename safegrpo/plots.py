"""PNG plots of a run's metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_rewards(metrics_path, out_png) -> Path:
    """Reward components and tag accuracies against step; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("reward/mean", "reward/format", "reward/tag", "reward/behavior"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_title("rule reward (training rollouts)")
    for key in ("tag_acc/visual", "tag_acc/text", "tag_acc/combined"):
        axes[1].plot(steps, [r[key] for r in rows], label=key)
    axes[1].set_title("tag accuracy (training rollouts)")
    axes[2].plot(steps, [r["kl"] for r in rows], label="kl")
    axes[2].plot(steps, [r["entropy"] for r in rows], label="entropy")
    axes[2].plot(steps, [r["clip_frac"] for r in rows], label="clip_frac")
    axes[2].set_title("policy statistics")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(".tmp-" + out_png.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
