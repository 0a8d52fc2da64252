"""Fused log-probs against the naive full-logits computation on a GPU: peak memory and time.

    python bench/gpu_logprobs.py [--vocab 151936] [--hidden 2048] [--tokens 4096 16384 32768]

The GPU twin of bench/bench_logprobs.py, at a real model's hidden size: hidden [tokens, H] in
bf16 (what a bf16 autocast forward hands over), LM head weight [V, H] fp32, forward + backward.
naive: log_softmax(hidden @ W.T) in fp32, gather, backward through the [tokens, V] logits.
ours:  safegrpo.rl.logprobs.token_logprobs (chunked, fp32, backward recomputes each chunk).
Peak is torch.cuda.max_memory_allocated above what was allocated before the call; time is the
median of 5 calls after a warm-up. A size whose naive computation does not fit prints "OOM".
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safegrpo.rl.logprobs import token_logprobs  # noqa: E402


def measure(fn, h, w) -> tuple[float, float]:
    """(peak MB above the baseline, median seconds) of fn() + backward."""
    def run():
        fn().sum().backward()
        h.grad = w.grad = None
    run()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return (torch.cuda.max_memory_allocated() - base) / 2**20, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: the library's default)")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = (torch.randn(args.vocab, args.hidden, device="cuda") * 0.02).requires_grad_()
    for n in args.tokens:
        h = torch.randn(n, args.hidden, device="cuda").bfloat16().requires_grad_()
        y = torch.randint(0, args.vocab, (n,), device="cuda")
        ours = measure(lambda: token_logprobs(h, w, y, **({"chunk_size": args.chunk} if args.chunk else {})), h, w)
        try:
            naive = measure(lambda: torch.log_softmax(h.float() @ w.T, -1).gather(-1, y[:, None]).squeeze(-1), h, w)
        except torch.OutOfMemoryError:
            naive = None
        torch.cuda.empty_cache()
        line = (f"gpu_logprobs: {torch.cuda.get_device_name()}, V {args.vocab}, H {args.hidden}, {n} tokens: "
                f"chunk {args.chunk or 'default'}: ours {ours[0]:,.0f} MB {ours[1] * 1e3:.1f} ms")
        print(line + (f", naive {naive[0]:,.0f} MB {naive[1] * 1e3:.1f} ms: peak 1/{naive[0] / ours[0]:.0f}, "
                      f"time {ours[1] / naive[1]:.2f}x" if naive else ", naive OOM"), flush=True)


if __name__ == "__main__":
    main()
