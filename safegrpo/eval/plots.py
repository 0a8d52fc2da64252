"""PNG plots (matplotlib, headless), written atomically: a run's reward curves (`plot_rewards`),
and an evaluation's refusal bars and tag confusion grids (`plot_refusal`, `plot_confusion`)."""
from __future__ import annotations

import json
import textwrap
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


# SafeTag groups (visual/text/combined gold tags) by what makes them unsafe
GROUP_LABELS = {"safe/safe/safe": "all safe", "safe/safe/unsafe": "compositional (each part safe)",
                "safe/unsafe/unsafe": "unsafe text", "unsafe/safe/unsafe": "unsafe image",
                "unsafe/unsafe/unsafe": "both unsafe"}


def _title(ax, text: str, width: int) -> None:
    ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=10)


def _legend(ax, *args, **kw) -> None:
    """A legend only where something is labelled (a run may lack a key)."""
    if args or ax.get_legend_handles_labels()[0]:
        ax.legend(*args, **kw)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_refusal(columns: dict[str, dict], out_png, source: str | None = None) -> Path:
    """Per benchmark, refusal rate where refusing is right (safety) against refusal rate where
    answering is right (over-refusal); one bar pair per model in `columns` {label: {bench: metrics}}.
    Models differ by colour, the two rates by hatching (and the legend says which is which). Both
    rates are over readable answers; each benchmark's label says how many were not (no bar at all:
    none readable). source="judge_model" plots the judge model's figures instead of the rule's."""
    plt = _pyplot()
    if source:
        columns = {k: {b: m[source] for b, m in res.items() if source in m} for k, res in columns.items()}
    benches = list(next(iter(columns.values())))
    width_in = max(6.5, 1.4 * len(benches) * len(columns) + 2)
    fig, ax = plt.subplots(figsize=(width_in, 4.2))
    width = 0.8 / (2 * len(columns))
    for k, (label, results) in enumerate(columns.items()):
        for j, (key, name) in enumerate((("refusal_rate_unsafe", "refuses unsafe"), ("refusal_rate_safe", "refuses safe"))):
            xs = [i + (2 * k + j) * width - 0.4 + width / 2 for i in range(len(benches))]
            ys = [results[b][key] for b in benches]
            bars = ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                          label=f"{label}: {name}", color=f"C{k}", hatch="" if j == 0 else "///",
                          edgecolor="black", linewidth=0.6, alpha=1.0 if j == 0 else 0.55)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    labels = [b + "".join(f"\n{m[b]['n_unreadable']}/{m[b]['n']} unreadable" for m in columns.values()
                          if m[b]["n_unreadable"]) for b in benches]
    ax.set_xticks(range(len(benches)), labels, rotation=15 if len(benches) > 3 else 0, fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("refusal rate (readable answers)")
    judge = "judge model's verdicts: " if source else ""
    _title(ax, f"Refusal rate ({judge}readable answers only): on unsafe items (safety, higher is better) and "
               "on safe items (over-refusal, lower is better)", int(width_in * 11))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, out_png)


def plot_confusion(results: dict[str, dict], out_png) -> Path:
    """2x2 (plus missing) confusion of each tag, one row of panels per benchmark defining it:
    gold tag down, written tag across."""
    plt = _pyplot()
    tags = list(SHORT_NAMES.values())
    cells = [(b, t, m["confusion"][t]) for b, m in results.items() for t in tags
             if m["confusion"].get(t)]
    rows = sorted({b for b, _, _ in cells}, key=list(results).index)
    if not rows:
        rows, cells = ["(no tags)"], []
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 2.9 * len(rows) + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for b, t, conf in cells:
        ax = axes[rows.index(b)][tags.index(t)]
        ax.axis("on")
        grid = [[conf[g][p] for p in ("safe", "unsafe", "missing")] for g in ("safe", "unsafe")]
        ax.imshow(grid, cmap="Blues")
        top = max(max(r) for r in grid) or 1
        for i in range(2):
            for j in range(3):
                ax.text(j, i, grid[i][j], ha="center", va="center", color="white" if grid[i][j] > top / 2 else "black")
        ax.set_xticks(range(3), ["safe", "unsafe", "missing"], fontsize=8)
        ax.set_yticks(range(2), ["safe", "unsafe"], fontsize=8)
        ax.set_title(f"{b}: {t} tag", fontsize=9)
    fig.suptitle("Tag confusion: gold tag (rows) against the written tag (columns)", fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, out_png)


def correction_title(rows: list[dict]) -> str:
    """The rollout-correction panel's title: says "off" when no step corrected (its only curve is
    then the share of tokens outside [0.5, 2], a flat 0 that must not read as a correction)."""
    on = any("correction/weight_mean" in r for r in rows)
    return "Rollout correction (grpo.rollout_correction)" if on else \
        "Rollout correction: off (grpo.rollout_correction); tokens outside [0.5, 2] only"


def plot_rewards(metrics_path, out_png, window: int = 0) -> Path:
    """A run's curves against GRPO step: the rule reward and its parts, tag accuracy, policy
    statistics; the combined-tag accuracy and the share of prompts without reward spread per
    SafeTag group; completion lengths; the rollout/training mismatch and its correction. Per-step values (from the
    step's rollouts) are drawn faint, their trailing mean (`window` steps; 0: about 1/20 of the
    run) solid, and validation points (train.eval_every: greedy, on the test split) as markers."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    window = window or max(1, len(rows) // 20)
    val = [r for r in rows if "val/reward/mean" in r]
    vs = [r["step"] for r in val]
    fig, axes = plt.subplots(2, 4, figsize=(25, 8.5))
    (a_rew, a_tag, a_pol, a_mm), (a_grp, a_flat, a_len, a_ratio) = axes

    def curve(ax, key, label, colour, val_key=None, val_label=True):
        have = [r for r in rows if r.get(key) is not None]      # a group may be missing from a step's draw
        if not have:
            return
        xs, ys = [r["step"] for r in have], [r[key] for r in have]
        ax.plot(xs, ys, color=colour, alpha=0.22, lw=0.8)
        ax.plot(xs, smooth(ys, window), color=colour, lw=1.8, label=label)
        if val_key and val and all(val_key in r for r in val):
            ax.plot(vs, [r[val_key] for r in val], "o--", color=colour, ms=4, lw=0.8,
                    label=f"{label} (validation)" if val_label else None)

    for k, key in enumerate(("reward/mean", "reward/format", "reward/tag", "reward/behavior")):
        curve(a_rew, key, key, f"C{k}", "val/reward/mean" if key == "reward/mean" else None)
    _title(a_rew, f"Rule reward (training rollouts; solid: mean of {window} steps)", 80)
    for k, name in enumerate(("visual", "text", "combined")):
        curve(a_tag, f"tag_acc/{name}", name, f"C{k}", f"val/tag_acc/{name}")
    _title(a_tag, "Tag accuracy", 80)
    groups = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("group_acc/")},
                    key=lambda g: list(GROUP_LABELS).index(g) if g in GROUP_LABELS else 99)
    for k, g in enumerate(groups):
        curve(a_grp, f"group_acc/{g}", f"{GROUP_LABELS.get(g, g)} ({g})", f"C{k}", f"val/group_acc/{g}", False)
    if not groups:
        a_grp.text(0.5, 0.5, "no group_acc/* keys in this metrics.jsonl", ha="center", va="center",
                   transform=a_grp.transAxes)
    _title(a_grp, "Combined-tag accuracy per SafeTag group (visual/text/combined gold tags)"
                  + ("; dots: validation" if val else ""), 80)
    for k, g in enumerate(groups):
        curve(a_flat, f"zero_std/{g}", GROUP_LABELS.get(g, g), f"C{k}")
    _title(a_flat, "Prompts whose G rewards are all equal (no advantage), per SafeTag group", 80)
    curve(a_len, "response_len/mean", "mean", "C0")
    curve(a_len, "response_len/max", "max", "C1")
    _title(a_len, "Completion length (tokens)", 80)
    curve(a_mm, "mismatch/k3", "k3: KL(rollout || train) estimate", "C0")
    curve(a_mm, "mismatch/abs_mean", "mean |log ratio|", "C1")
    curve(a_mm, "mismatch/abs_max", "max |log ratio|", "C2")
    if any(r.get("mismatch/abs_max", 0) > 0 for r in rows):
        a_mm.set_yscale("log")
    _title(a_mm, "Rollout/training mismatch (log pi_train - log pi_rollout of sampled tokens)", 80)
    curve(a_ratio, "mismatch/ratio_out", "tokens with ratio outside [0.5, 2]", "C0")
    curve(a_ratio, "correction/rejected", "tokens rejected (rollout_rs)", "C1")
    curve(a_ratio, "correction/weight_mean", "mean correction weight", "C2")
    _title(a_ratio, correction_title(rows), 80)
    if not any("correction/weight_mean" in r for r in rows):
        a_ratio.text(0.5, 0.5, "correction off", transform=a_ratio.transAxes, ha="center", va="center",
                     fontsize=14, alpha=0.4)
    _legend(a_mm, fontsize=7)
    _legend(a_ratio, fontsize=7)
    curve(a_pol, "kl", "kl", "C0")
    curve(a_pol, "clip_frac", "clip_frac", "C1")
    curve(a_pol, "frac_zero_std_groups", "groups with zero reward spread", "C2")
    ent = a_pol.twinx()
    curve(ent, "entropy", "entropy (right axis)", "C3")
    ent.set_ylabel("entropy (nats / token)")
    _title(a_pol, "Policy statistics", 80)
    for ax in axes.flat:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    for ax in (a_rew, a_tag):
        ax.set_ylim(-0.02, 1.02)
        _legend(ax, fontsize=7, loc="lower right")
    for ax in (a_grp, a_flat):                  # five groups: the legend above the curves
        ax.set_ylim(-0.02, 1.32)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        _legend(ax, fontsize=7, loc="upper center", ncol=2)
    _legend(a_len, fontsize=7)
    lines = a_pol.get_legend_handles_labels()
    more = ent.get_legend_handles_labels()
    a_pol.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, plt, out_png)
