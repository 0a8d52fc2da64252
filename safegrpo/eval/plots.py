"""PNG plots of a run's metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_path
from ..safety.reward import SHORT_NAMES


def read_metrics(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, out_png) -> Path:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(out_png)


def plot_refusal(columns: dict[str, dict], out_png) -> Path:
    """Per benchmark, refusal rate where refusing is right (safety) against refusal rate where
    answering is right (over-refusal); one bar pair per model in `columns` {label: {bench: metrics}}."""
    plt = _pyplot()
    benches = list(next(iter(columns.values())))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * len(columns)), 4))
    width = 0.8 / (2 * len(columns))
    for k, (label, results) in enumerate(columns.items()):
        for j, (key, name) in enumerate((("refusal_rate_unsafe", "refuses unsafe"), ("refusal_rate_safe", "refuses safe"))):
            xs = [i + (2 * k + j) * width - 0.4 + width / 2 for i in range(len(benches))]
            ys = [results[b][key] for b in benches]
            ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                   label=f"{label}: {name}", hatch="" if j == 0 else "//", alpha=0.9 - 0.3 * k)
    ax.set_xticks(range(len(benches)), benches, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate")
    ax.set_title("safety (refuses unsafe, higher is better) vs over-refusal (refuses safe, lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, out_png)


def plot_confusion(results: dict[str, dict], out_png) -> Path:
    """2x2 (plus missing) confusion of each tag, one row of panels per benchmark defining it."""
    plt = _pyplot()
    tags = list(SHORT_NAMES.values())
    cells = [(b, t, m["confusion"][t]) for b, m in results.items() for t in tags
             if m["confusion"].get(t)]
    rows = sorted({b for b, _, _ in cells}, key=list(results).index)
    if not rows:
        rows, cells = ["(no tags)"], []
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for b, t, conf in cells:
        ax = axes[rows.index(b)][tags.index(t)]
        ax.axis("on")
        grid = [[conf[g][p] for p in ("safe", "unsafe", "missing")] for g in ("safe", "unsafe")]
        ax.imshow(grid, cmap="Blues")
        for i in range(2):
            for j in range(3):
                ax.text(j, i, grid[i][j], ha="center", va="center")
        ax.set_xticks(range(3), ["safe", "unsafe", "missing"])
        ax.set_yticks(range(2), ["safe", "unsafe"])
        ax.set_title(f"{b}: {t} (gold rows, written columns)", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, out_png)


def plot_rewards(metrics_path, out_png) -> Path:
    """Reward components and tag accuracies against step; written atomically."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("reward/mean", "reward/format", "reward/tag", "reward/behavior"):
        axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_title("rule reward (training rollouts)")
    for key in ("tag_acc/visual", "tag_acc/text", "tag_acc/combined"):
        axes[1].plot(steps, [r[key] for r in rows], label=key)
    axes[1].set_title("tag accuracy (training rollouts)")
    val = [r for r in rows if "val/reward/mean" in r]             # validation (train.eval_every), greedy
    if val:
        vs = [r["step"] for r in val]
        axes[0].plot(vs, [r["val/reward/mean"] for r in val], "ko--", ms=4, label="val/reward/mean (greedy, test)")
        for key, colour in (("visual", "C0"), ("text", "C1"), ("combined", "C2")):
            axes[1].plot(vs, [r[f"val/tag_acc/{key}"] for r in val], "o--", color=colour, ms=4, label=f"val/{key}")
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
    return _save(fig, plt, out_png)
