"""Where a GRPO step of the tiny recipe spends its time, and how close the update is to this
machine's matmul roofline.

    python bench/bench_phases.py [--steps 4] [--warmup 1]

Runs configs/tiny.yaml's GRPO step (16 prompts x 8 samples, 96 new tokens) as the paper has it
(beta 0.01, no format anchor: anchor.coef 0) on a randomly initialised tiny model and reports, per phase (rollout, reference log-probs, update),
seconds and tokens per second (medians). Roofline: the update's model FLOPs, 6 x parameters x
tokens it runs through (prompt tokens once per prompt, completion tokens once per sample; the
vision tower is frozen and counted as forward only), divided by its time, against the best
fp32 matmul throughput measured on this machine (square matmuls, 1024-4096).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from tiny import tiny_dirs  # noqa: E402
from safegrpo.config import load_config  # noqa: E402
from safegrpo.trainer import Trainer  # noqa: E402


def matmul_peak() -> float:
    """Best fp32 GFLOP/s of square matmuls on this machine."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            a @ b
            k += 1
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0) / 1e9)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth, model_dir = tiny_dirs(tmp)
        cfg = {**base, "model": {"path": str(model_dir), "freeze_vision_tower": base["model"]["freeze_vision_tower"]},
               "sft": {"enabled": False},
               "grpo": {**base["grpo"], "beta": 0.01}, "anchor": {"coef": 0.0},    # the paper's GRPO step alone
               "data": {**base["data"], "train": str(synth / "train.parquet"), "test": str(synth / "test.parquet")},
               "train": {**base["train"], "out_dir": str(tmp / "run"), "steps": args.warmup + args.steps,
                         "save_every": 0, "eval_limit": 0}}
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        tr = Trainer(load_config(tmp / "cfg.yaml"))
        tr.setup(model_dir)
        rows = [tr.train_step(s) for s in range(args.warmup + args.steps)][args.warmup:]
        params = sum(p.numel() for n, p in tr.policy.model.named_parameters() if "visual" not in n)
        visual = sum(p.numel() for n, p in tr.policy.model.named_parameters() if "visual" in n)
    med = lambda k: statistics.median(r[k] for r in rows)
    t_roll, t_ref, t_upd = med("time/rollout"), med("time/ref"), med("time/update")
    comp_tok = med("tokens/completion")
    prompt_tok = med("tokens/prompt")
    flops = 6 * params * (prompt_tok + comp_tok) + 2 * visual * med("tokens/image")
    peak = matmul_peak()
    achieved = flops / t_upd / 1e9
    out = {"rollout": {"s": round(t_roll, 3), "tok_s": round(comp_tok / t_roll)},
           "reference": {"s": round(t_ref, 3), "tok_s": round(comp_tok / t_ref) if t_ref else None},
           "update": {"s": round(t_upd, 3), "tok_s": round(comp_tok / t_upd)},
           "step_s": round(t_roll + t_ref + t_upd, 3), "completion_tokens": round(comp_tok),
           "prompt_tokens": round(prompt_tok), "params": params,
           "update_gflop_s": round(achieved, 2), "matmul_peak_gflop_s": round(peak, 1),
           "update_fraction_of_peak": round(achieved / peak, 4)}
    for ph in ("rollout", "reference", "update"):
        print(f"phase {ph}: {out[ph]['s']:.2f} s, {out[ph]['tok_s']} completion tok/s")
    print(f"roofline: update {achieved:.1f} GFLOP/s of {peak:.0f} GFLOP/s fp32 matmul peak "
          f"({100 * achieved / peak:.1f}%), {params / 1e6:.2f} M parameters, "
          f"{comp_tok:.0f} completion + {prompt_tok:.0f} prompt tokens per step")
    record("phases", out)


if __name__ == "__main__":
    main()
