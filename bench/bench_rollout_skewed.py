"""Rollout on a length-skewed workload (a thinking model's, in miniature): the continuously
batched engine under a KV budget against transformers' model.generate.

    python bench/bench_rollout_skewed.py [--prompts 16] [--group 8] [--tokens 256] [--budget-frac 0.25]

The tiny Qwen2-VL of configs/tiny.yaml (random init, near-uniform next-token distribution) with
`--stops` of its token ids made stop tokens besides EOS, so each row stops with p ~ stops/V per
step: completion lengths spread from a few tokens to --tokens (two orders of magnitude). Both
sides get the same prompts, images, G, sampling (temperature 1, top-p 1), stop ids and length
limit; generate runs static batches (a batch steps until its longest row ends), ours admits
rows as slots free under rollout.max_batch_tokens = --budget-frac of what all rows at once
would reserve. Tokens/s counts completion tokens produced (first stop token included), median
of --repeat calls after a warm-up. Also reported: the most tokens our KV cache held at once
against the budget. Results go to bench/results.json under "rollout_skewed".
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from tiny import rollout_inputs  # noqa: E402
from safegrpo.rl.decode import kv_plan  # noqa: E402
from safegrpo.rl.rollout import generate  # noqa: E402


def hf_tokens(out: torch.Tensor, prompt_len: int, stops: list[int], pad: int) -> tuple[int, list[int]]:
    """Completion tokens in generate's output: up to and including the first stop token."""
    comp = out[:, prompt_len:]
    hit = torch.isin(comp, torch.tensor(stops))
    lengths = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full((comp.shape[0],), comp.shape[1]))
    return int(lengths.sum()), lengths.tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--stops", type=int, default=12, help="token ids that also end a completion")
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model, processor, batch = rollout_inputs(args.prompts)
    tok = processor.tokenizer
    eos, pad, G, T = model.generation_config.eos_token_id, tok.pad_token_id, args.group, args.tokens
    stops = [eos] + list(range(100, 100 + args.stops))
    Lp, B = batch["input_ids"].shape[1], args.prompts
    budget = int(args.budget_frac * (B * Lp + B * G * T))
    P, R, page = kv_plan(budget, Lp, G, T, B)         # prompt slots, pages
    stats = {}

    def ours(seed):
        ro = generate(model, batch, group_size=G, max_new_tokens=T, eos_token_id=stops, pad_token_id=pad,
                      temperature=1.0, top_p=1.0, seeds=[seed * 1000 + b for b in range(B)], max_batch_tokens=budget)
        stats["peak"] = max(stats.get("peak", 0), ro.peak_cached_tokens)
        stats["lengths"] = ro.lengths.tolist()
        return int(ro.lengths.sum())

    def theirs(seed):
        torch.manual_seed(seed)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T,
                             num_return_sequences=G, eos_token_id=stops, pad_token_id=pad,
                             suppress_tokens=[model.config.image_token_id, model.config.video_token_id])
        n, lengths = hf_tokens(out, Lp, stops, pad)
        stats["hf_lengths"] = lengths
        return n

    res = {}
    with torch.inference_mode():
        for name, fn in (("ours", ours), ("generate", theirs)):
            fn(0)
            rates = []
            for r in range(args.repeat):
                t0 = time.perf_counter()
                n = fn(r + 1)
                rates.append(n / (time.perf_counter() - t0))
            res[name] = statistics.median(rates)
    lengths = sorted(stats["lengths"])
    speedup = res["ours"] / res["generate"]
    print(f"rollout_skewed: ours {res['ours']:,.0f} tok/s, generate {res['generate']:,.0f} tok/s, speedup "
          f"{speedup:.2f}x; peak cached {stats['peak']:,} of budget {budget:,} tokens ({P} prompt slots + {R} pages of {page}) "
          f"[{B} prompts x {G}, <= {T} new tokens, lengths {lengths[0]}-{lengths[-1]}, median "
          f"{lengths[len(lengths) // 2]}]")
    record("rollout_skewed", {"ours_tok_s": round(res["ours"]), "generate_tok_s": round(res["generate"]),
                              "speedup": round(speedup, 2), "peak_cached_tokens": stats["peak"], "budget_tokens": budget,
                              "prompts": B, "group_size": G, "max_new_tokens": T, "length_min": lengths[0],
                              "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1]})


if __name__ == "__main__":
    main()
