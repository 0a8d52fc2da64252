"""Peak memory and time of fused log-probs (forward + backward) against the naive computation.

    python bench/bench_logprobs.py [--vocab 151936] [--hidden 256] [--tokens 512 2048 8192]

naive: logits = hidden @ W.T ([tokens, V] fp32), log_softmax, gather, backward through all of it.
ours:  safegrpo.rl.logprobs.token_logprobs, chunked, backward recomputes each chunk.
Each measurement runs in a fresh child process; peak memory is the rise of the process's resident
high-water mark (Linux VmHWM, reset just before the call) above its size before the call, so it
counts every buffer the computation allocates (outputs, gradients, temporaries). Time is the
median of 3 calls. The hidden size is small to keep CPU time reasonable; logits memory does not
depend on it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status(key: str) -> int:
    """kB value of a /proc/self/status field (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child(kind: str, tokens: int, hidden: int, vocab: int) -> None:
    import torch
    from safegrpo.rl.logprobs import token_logprobs
    torch.manual_seed(0)
    h = (torch.randn(tokens, hidden) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))

    def run():
        if kind == "naive":
            logp = torch.log_softmax(h @ w.T, dim=-1).gather(-1, y[:, None]).squeeze(-1)
        else:
            logp = token_logprobs(h, w, y)
        logp.sum().backward()
        h.grad = w.grad = None

    run()  # warm-up (allocator, kernels)
    times, peaks = [], []
    for _ in range(3):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM") - base)
    print(json.dumps({"peak_mb": max(peaks) / 1024, "s": statistics.median(times)}))


def measure(kind, tokens, hidden, vocab) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(tokens), str(hidden), str(vocab)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192], help="batch x length sizes")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *nums = args.child
        return child(kind, *map(int, nums))
    from results import record
    rows = []
    for n in args.tokens:
        o, v = measure("ours", n, args.hidden, args.vocab), measure("naive", n, args.hidden, args.vocab)
        rows.append({"tokens": n, "ours_peak_mb": round(o["peak_mb"]), "naive_peak_mb": round(v["peak_mb"]),
                     "peak_ratio": round(o["peak_mb"] / v["peak_mb"], 3), "ours_s": round(o["s"], 3),
                     "naive_s": round(v["s"], 3), "time_ratio": round(o["s"] / v["s"], 2)})
        r = rows[-1]
        print(f"logprob_memory (V={args.vocab}, H={args.hidden}, {n} tokens): ours {r['ours_peak_mb']} MB "
              f"{r['ours_s']:.2f} s, naive {r['naive_peak_mb']} MB {r['naive_s']:.2f} s, "
              f"peak ratio {r['peak_ratio']:.3f}, time ratio {r['time_ratio']:.2f}")
    last, first = rows[-1], rows[0]
    flat = last["ours_peak_mb"] / max(first["ours_peak_mb"], 1)
    print(f"logprob_memory: ours grows {flat:.2f}x from {first['tokens']} to {last['tokens']} tokens "
          f"(naive {last['naive_peak_mb'] / max(first['naive_peak_mb'], 1):.1f}x)")
    record("logprob_memory", {"vocab": args.vocab, "hidden": args.hidden, "tokens": last["tokens"],
                              "ours_peak_mb": last["ours_peak_mb"], "naive_peak_mb": last["naive_peak_mb"],
                              "peak_ratio": last["peak_ratio"], "time_ratio": last["time_ratio"],
                              "ours_growth": round(flat, 3), "sizes": rows})


if __name__ == "__main__":
    main()
