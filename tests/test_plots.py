"""The plots draw the numbers they are given: bar heights, confusion cells, a trailing mean."""
import json

import pytest

from safegrpo.eval import plots


@pytest.fixture
def figures(monkeypatch):
    """Capture each figure instead of writing it."""
    got = []
    monkeypatch.setattr(plots, "_save", lambda fig, plt, out: got.append(fig) or out)
    return got


def test_smooth_is_a_trailing_mean():
    xs = [1.0, 3.0, 2.0, 8.0, 0.0]
    naive = [sum(xs[max(0, i - 2):i + 1]) / len(xs[max(0, i - 2):i + 1]) for i in range(len(xs))]
    assert plots.smooth(xs, 3) == pytest.approx(naive)


def test_refusal_bars_are_the_rates_and_missing_rates_are_not_drawn(figures):
    cols = {"before": {"a": {"refusal_rate_unsafe": 0.25, "refusal_rate_safe": 0.5, "n": 8, "n_unreadable": 0},
                       "b": {"refusal_rate_unsafe": None, "refusal_rate_safe": 0.125, "n": 8, "n_unreadable": 3}},
            "after": {"a": {"refusal_rate_unsafe": 0.75, "refusal_rate_safe": 0.0, "n": 8, "n_unreadable": 0},
                      "b": {"refusal_rate_unsafe": None, "refusal_rate_safe": 1.0, "n": 8, "n_unreadable": 0}}}
    plots.plot_refusal(cols, "x.png")
    heights = sorted(round(p.get_height(), 6) for p in figures[0].axes[0].patches)
    assert heights == sorted([0.25, 0.5, 0.125, 0.75, 0.0, 1.0])
    # unreadable answers are in no rate: each benchmark's label says how many there were
    assert [t.get_text() for t in figures[0].axes[0].get_xticklabels()] == ["a", "b\n3/8 unreadable"]


def test_confusion_cells_are_the_counts(figures):
    conf = {"safe": {"safe": 7, "unsafe": 2, "missing": 1}, "unsafe": {"safe": 0, "unsafe": 5, "missing": 3}}
    plots.plot_confusion({"bench": {"confusion": {"combined": conf}}}, "x.png")
    drawn = [ax for ax in figures[0].axes if ax.axison]
    assert len(drawn) == 1 and drawn[0].get_title() == "bench: combined tag"
    assert sorted(int(t.get_text()) for t in drawn[0].texts) == sorted([7, 2, 1, 0, 5, 3])


def test_reward_plot_takes_keys_that_appear_at_some_steps_only(tmp_path, figures):
    rows = [{"step": s, "reward/mean": 0.1 * s, "tag_acc/combined": 0.5} for s in range(1, 6)]
    rows[2]["group_acc/safe/safe/unsafe"] = 0.25                       # a group sampled at one step
    rows[3].update({"val/reward/mean": 0.4, "val/tag_acc/combined": 0.6})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.plot_rewards(tmp_path / "m.jsonl", "x.png", window=2)
    lines = {l.get_label(): l for ax in figures[0].axes for l in ax.get_lines()}
    reward = next(l for k, l in lines.items() if "reward" in k and "raw" not in k and "val" not in k)
    group = lines["compositional (each part safe) (safe/safe/unsafe)"]
    assert list(group.get_xdata()) == [3] and list(group.get_ydata()) == [0.25]
    assert list(lines["reward/mean (validation)"].get_xdata()) == [4]
    assert list(reward.get_ydata()) == pytest.approx(plots.smooth([0.1 * s for s in range(1, 6)], 2))


def test_the_correction_panel_says_off_when_no_step_corrected():
    from safegrpo.eval.plots import correction_title
    assert "off" in correction_title([{"step": 1, "mismatch/ratio_out": 0.0}])
    assert "off" not in correction_title([{"step": 1, "mismatch/ratio_out": 0.0, "correction/weight_mean": 0.9}])
