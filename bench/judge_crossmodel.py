"""How well the strict refusal judge generalises to answers of a model it was not designed on.

    python bench/judge_crossmodel.py        # figures into bench/results.json under "judge_crossmodel"

XSTest ships 450 human-labelled answers of each of two models (GPT-4, Llama-2). The rule's
families are chosen by `judge.design_families` from labelled answers; here they are chosen on
one model's answers and scored on the other's, both ways, beside the in-sample figure (chosen
and scored on all 900, which is the shipped rule). Two selection thresholds: min_gain 0 (the
shipped procedure: keep every family the labels do not speak against) and min_gain 2 (keep a
family only where it gains two answers on the design set). The keyword rule, which nothing was
designed on, is the baseline.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from safegrpo.eval.benchmarks import SHARED  # noqa: E402
from safegrpo.safety.judge import agreement, design_families, family_rule, xstest_labelled  # noqa: E402


def score(names, rows) -> float:
    rule = family_rule(names)
    return sum(rule(a) == h for _, a, h in rows) / len(rows)


def main():
    rows = xstest_labelled(SHARED / "xstest" / "model_completions")
    by = {m: [r for r in rows if r[0] == m] for m in sorted({r[0] for r in rows})}
    (a, b) = list(by)
    fig = {"keywords": {k: round(v, 4) for k, v in agreement("keywords", rows).items()}}
    for gain in (0, 2):
        f = {}
        for design, test in ((a, b), (b, a)):
            fam = design_families(by[design], min_gain=gain)
            f[f"{design}_to_{test}"] = round(score(fam, by[test]), 4)
            f[f"{design}_in_sample"] = round(score(fam, by[design]), 4)
            print(f"min_gain {gain}: designed on {design} ({len(fam)} families), agreement on {test}: "
                  f"{f[f'{design}_to_{test}']:.4f} (in-sample {f[f'{design}_in_sample']:.4f})")
        fam = design_families(rows, min_gain=gain)
        f["all_in_sample"] = round(score(fam, rows), 4)
        print(f"min_gain {gain}: designed on all 900 ({len(fam)} families): {f['all_in_sample']:.4f} in-sample")
        fig[f"min_gain_{gain}"] = f
    print(f"keywords (no design): {fig['keywords']}")
    record("judge_crossmodel", fig)


if __name__ == "__main__":
    main()
