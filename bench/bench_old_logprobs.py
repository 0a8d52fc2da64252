"""The old-policy pass against the rollout engine's own log-probs, and the rollout/training
mismatch in fp32 and under bf16 autocast.

    python bench/bench_old_logprobs.py [--steps 3] [--warmup 1] [--repeats 2]

Runs configs/tiny.yaml's GRPO step as the paper has it (beta 0.01, no format anchor) with the
paper's four optimizer updates per step (16 prompts, mini-batches of 4) on a randomly
initialised tiny model (whose completions all run to max_new_tokens, so both modes do the same
work), alternating `repeats` times: grpo.old_logprobs recompute (a no-grad pass of the training
forward gives pi_old) and rollout (the engine's log-probs are pi_old; no pass). Reports per
phase the median seconds (rollout; no-grad log-probs: reference + old policy; update) and the
step's saving against the old-policy pass's measured share. Then the mismatch (rl/correction.py,
eq. 13) between the engine's log-probs and the training forward's, fp32 against bf16 autocast
(model.autocast: bf16): median k3, mean and max |log ratio| over the steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from tiny import tiny_dirs  # noqa: E402
from safegrpo.config import load_config  # noqa: E402
from safegrpo.trainer import Trainer  # noqa: E402


def run(tmp: Path, name: str, base: dict, model_dir, synth, steps: int, **over) -> list[dict]:
    cfg = {**base, "model": {"path": str(model_dir), "freeze_vision_tower": True, **over.get("model", {})},
           "sft": {"enabled": False}, "grpo": {**base["grpo"], "beta": 0.01, **over.get("grpo", {})},
           "anchor": {"coef": 0.0},
           "data": {**base["data"], "train": str(synth / "train.parquet"), "test": str(synth / "test.parquet")},
           "train": {**base["train"], "out_dir": str(tmp / name), "steps": steps, "save_every": 0, "eval_limit": 0,
                     "mini_batch_prompts": base["train"]["prompts_per_step"] // 4,
                     "micro_batch_prompts": base["train"]["prompts_per_step"] // 4}}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    tr = Trainer(load_config(tmp / f"{name}.yaml"))
    tr.setup(model_dir)
    return [tr.train_step(s) for s in range(steps)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth, model_dir = tiny_dirs(tmp)
        n = args.warmup + args.steps
        runs = {"recompute": [], "rollout": [], "bf16": []}
        modes = (("recompute", {}), ("rollout", {"grpo": {"old_logprobs": "rollout"}}))
        for rep in range(args.repeats):               # the two modes alternate, so drifts of the machine hit both
            for name, over in modes:
                runs[name] += run(tmp, f"{name}{rep}", base, model_dir, synth, n, **over)[args.warmup:]
        runs["bf16"] = run(tmp, "bf16", base, model_dir, synth, n, model={"autocast": "bf16"})[args.warmup:]
        for name, rows in runs.items():
            med = lambda k: statistics.median(r[k] for r in rows)      # noqa: E731
            out[name] = {"rollout_s": round(med("time/rollout"), 3), "logprobs_s": round(med("time/ref"), 3),
                         "update_s": round(med("time/update"), 3),
                         "step_s": round(med("time/rollout") + med("time/ref") + med("time/update"), 3),
                         "completion_tokens": med("tokens/completion"),
                         "mismatch_k3": med("mismatch/k3"), "mismatch_abs_mean": med("mismatch/abs_mean"),
                         "mismatch_abs_max": max(r["mismatch/abs_max"] for r in rows)}
    rec, rol = out["recompute"], out["rollout"]
    out["old_pass_share"] = round((rec["logprobs_s"] - rol["logprobs_s"]) / rec["step_s"], 4)
    out["step_saving"] = round(1 - rol["step_s"] / rec["step_s"], 4)
    for name in ("recompute", "rollout"):
        r = out[name]
        print(f"old_logprobs {name}: rollout {r['rollout_s']:.2f} s, no-grad log-probs {r['logprobs_s']:.2f} s, "
              f"update {r['update_s']:.2f} s, step {r['step_s']:.2f} s ({r['completion_tokens']:.0f} completion tokens)")
    print(f"the old-policy pass is {100 * out['old_pass_share']:.1f}% of the recompute step; old_logprobs: rollout "
          f"saves {100 * out['step_saving']:.1f}% of it")
    for name in ("recompute", "bf16"):
        r = out[name]
        print(f"mismatch {'fp32' if name == 'recompute' else 'bf16 autocast'}: k3 {r['mismatch_k3']:.2e}, "
              f"mean |log ratio| {r['mismatch_abs_mean']:.2e}, max {r['mismatch_abs_max']:.2e}")
    record("old_logprobs", out)


if __name__ == "__main__":
    main()
