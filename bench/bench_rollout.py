"""Rollout throughput: safegrpo.rl.rollout.generate against transformers' model.generate.

    python bench/bench_rollout.py [--prompts 16] [--group 8] [--tokens 96]

Same tiny Qwen2-VL (configs/tiny.yaml's sizes, random init), same SafeTag-Synth prompts and
images, same sampling (temperature 1, top-p 1, no top-k), G samples per prompt
(`num_return_sequences=G` for generate), the same max_new_tokens. Tokens per second counts the
completion tokens each side actually produced (up to and including EOS), over the whole call
(prefill + decode); median of --repeat calls after one warm-up call.
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
from safegrpo.rl.rollout import generate  # noqa: E402


def hf_tokens(out: torch.Tensor, prompt_len: int, eos: int, pad: int) -> int:
    """Completion tokens in generate's output: up to and including the first EOS."""
    comp = out[:, prompt_len:]
    is_eos = comp == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, (comp != pad).sum(1))
    return int(first.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    model, processor, batch = rollout_inputs(args.prompts)
    tok = processor.tokenizer
    eos, pad = model.generation_config.eos_token_id, tok.pad_token_id

    def ours(seed):
        ro = generate(model, batch, group_size=args.group, max_new_tokens=args.tokens, eos_token_id=eos,
                      pad_token_id=pad, temperature=1.0, top_p=1.0, seeds=[seed * 1000 + b for b in range(args.prompts)])
        return int(ro.lengths.sum())

    def theirs(seed):
        torch.manual_seed(seed)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=args.tokens, num_return_sequences=args.group,
                             eos_token_id=eos, pad_token_id=pad,
                             suppress_tokens=[model.config.image_token_id, model.config.video_token_id])
        return hf_tokens(out, batch["input_ids"].shape[1], eos, pad)

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
    speedup = res["ours"] / res["generate"]
    print(f"rollout_vs_generate: ours {res['ours']:,.0f} tok/s, generate {res['generate']:,.0f} tok/s, "
          f"speedup {speedup:.2f}x [{args.prompts} prompts x {args.group}, {args.tokens} new tokens]")
    record("rollout_vs_generate", {"ours_tok_s": round(res["ours"]), "generate_tok_s": round(res["generate"]),
                                   "speedup": round(speedup, 2), "prompts": args.prompts, "group_size": args.group,
                                   "max_new_tokens": args.tokens})


if __name__ == "__main__":
    main()
