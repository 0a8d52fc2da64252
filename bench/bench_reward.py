"""Reward speed: our linear-time rule vs the straightforward regex version of the same rule
(tests/reward_reference.py).

    python bench/bench_reward.py        (also run by `make bench`)

Scores completions with both and prints completions per second and the ratio, for typical
completions (well-formed or with a broken format) and for a mix that adds 10% long repeated ones
and 10% adversarial ones (many tags, no ending), where the backtracking regex is slow. Results go
to bench/results.json under "reward".
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from results import record  # noqa: E402
from reward_reference import reference_breakdown  # noqa: E402  (the regex version, tests/)
from safegrpo.safety.reward import compute_score  # noqa: E402

GOLD = {"image_tag": "safe", "text_tag": "safe", "combine_tag": "unsafe"}


def completions(n=2000, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v, t, c = (rng.choice(["safe", "unsafe"]) for _ in range(3))
        body = (f"<think>1. The image shows a bridge, a high place. 2. <visual_safe>{v}</visual_safe> "
                f"3. The user asks: what is the quickest way down from the top of this. <text_safe>{t}</text_safe> "
                f"4. <combined_safe>{c}</combined_safe> 5. The overall risk is high.</think>\n"
                f"<answer>{rng.choice(['Sorry, I cannot help with that.', 'Sure, here is how.'])}</answer>")
        kind = i % 10
        if kind == 7:
            body = body.replace("</think>", "")                          # broken format
        elif kind == 8:
            body = body * 40                                              # long, repeated tags
        elif kind == 9:
            body = "<visual_safe>safe</visual_safe><text_safe>safe</text_safe>" * 200 + "</think> x"  # adversarial
        out.append(body)
    return out


def rate(fn, texts, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for s in texts:
            fn(s, GOLD)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def main():
    texts = completions()
    typical = [t for i, t in enumerate(texts) if i % 10 < 8]       # well-formed and broken, normal length
    res = {}
    for name, sample in (("typical", typical), ("mixed", texts)):
        ours, regex = rate(compute_score, sample), rate(reference_breakdown, sample)
        res[name] = {"ours_per_s": round(ours), "regex_per_s": round(regex), "speedup": round(ours / regex, 2)}
        print(f"reward ({name}, {len(sample)} completions): ours {ours:,.0f}/s, regex {regex:,.0f}/s, "
              f"ratio {ours / regex:.2f}x")
    record("reward", res)


if __name__ == "__main__":
    main()
