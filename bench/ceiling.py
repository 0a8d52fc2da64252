"""The supervised ceiling of the tiny default: how well the tiny model can judge SafeTag-Synth
when it is *told* the gold tags, on seen and unseen concept-instruction pairings.

    python bench/ceiling.py [--steps 600] [--set model.tiny.hidden_size=192 ...] [--out runs/ceiling]
                            [--grpo runs/tiny] [--init runs/tiny/sft]

Same data, model and warm start as `make train` (configs/tiny.yaml: caption pretraining, then
demonstration SFT with the tags sft.tags says), then --steps more steps of demonstration SFT with the
gold tags (cross-entropy, the answer following the gold combined tag). Every --every steps and
at the end, greedy accuracy of the combined tag per SafeTag group (and on decoys: all-safe items
whose instruction is a compositional one with a concept outside its class) on
  unseen: the held-out test split (pairings never trained on), and
  seen:   fresh renders of training pairings (new images of pairings the model trained on).
If supervision cannot reach ~0.9 on unseen compositional pairings, the model or the data
representation limits what GRPO can learn there, not the reward. --grpo RUN prints, beside the
ceiling, what that SafeGRPO run (its eval_before.json / eval_after.json, same data and warm start)
reached on the unseen pairings, and the share of the gap from warm start to ceiling it closed.
Results: <out>/ceiling.json and a line per evaluation; bench/results.json under "ceiling".
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from safegrpo.config import load_config  # noqa: E402
from safegrpo.data import synth  # noqa: E402
from safegrpo.eval.metrics import evaluate  # noqa: E402
from safegrpo.policy import load  # noqa: E402
from safegrpo.trainer import Trainer  # noqa: E402
from safegrpo.warmstart import cross_entropy_stage, demonstration_records  # noqa: E402


def seen_renders(cfg_synth, n: int, seed: int) -> list:
    """n fresh records of the training pairings (the same split as the data set, new images)."""
    train_pairs, _ = synth.split_pairings(random.Random(cfg_synth.seed), cfg_synth.holdout_frac)
    return synth._sample_split(train_pairs, n, random.Random(seed), synth.render_badge, "seen")


def per_group(metrics: dict) -> dict:
    return {g: round(v, 3) for g, v in metrics["group_acc"].items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seen", type=int, default=400, help="fresh renders of training pairings to evaluate")
    ap.add_argument("--out", default="runs/ceiling")
    ap.add_argument("--grpo", default="", help="a SafeGRPO run folder to compare with (eval_before/after.json)")
    ap.add_argument("--init", default="", help="a warm start already made with this config (a run's sft/ folder)")
    args = ap.parse_args()
    runs = {}
    if args.grpo:
        for name in ("before", "after"):
            f = Path(args.grpo) / f"eval_{name}.json"
            if not f.is_file():
                ap.error(f"--grpo {args.grpo}: {f} does not exist (a finished train.py run folder is expected)")
            runs[name] = json.loads(f.read_text())
    out = Path(args.out)
    cfg = load_config(args.config, [f"train.out_dir={out}", *args.overrides])
    tr = Trainer(cfg, overwrite=True)
    t0 = time.time()
    if args.init and not (Path(args.init) / "config.json").is_file():
        ap.error(f"--init {args.init}: no config.json there (a run's sft/ folder is expected)")
    init = Path(args.init) if args.init else tr.warm_start()   # caption + demonstrations (sft.tags)
    model = load(cfg, init, tr.device)
    seen = seen_renders(cfg.data.synth, args.seen, seed=12345)
    gold = demonstration_records(tr.train_records, "gold", topic=cfg.sft.step3 == "topic",
                                 compare=cfg.sft.step4 == "compare")
    curve = []

    def evaluate_now(step):
        res = {"step": step}
        for name, recs in (("unseen", tr.test_records), ("seen", seen)):
            m, _ = evaluate(model, tr.processor, recs, cfg.data.prompt_style, cfg.rollout.max_new_tokens)
            res[name] = {"combined": round(m["tag_acc"]["combined"], 3), "groups": per_group(m),
                         "decoys": round(m["decoy_acc"], 3)}
        curve.append(res)
        print(f"[ceiling] step {step}: unseen combined {res['unseen']['combined']:.3f} "
              f"(compositional {res['unseen']['groups'].get('safe/safe/unsafe')}, decoys {res['unseen']['decoys']}), "
              f"seen combined {res['seen']['combined']:.3f} (compositional "
              f"{res['seen']['groups'].get('safe/safe/unsafe')}, decoys {res['seen']['decoys']})",
              flush=True)

    evaluate_now(0)
    done = 0
    while done < args.steps:
        k = min(args.every, args.steps - done)
        cross_entropy_stage(model, tr.processor, gold, cfg.data.prompt_style, k, args.lr, cfg, tr.device,
                            out / f"gold_{done}_metrics.jsonl")
        done += k
        model.eval()
        evaluate_now(done)
    result = {"overrides": args.overrides, "steps": args.steps, "lr": args.lr, "seconds": round(time.time() - t0),
              "params": sum(p.numel() for p in model.parameters()), "curve": curve}
    if runs:
        result["grpo"] = {"run": args.grpo, **{name: {"combined": round(m["tag_acc"]["combined"], 3),
                                                     "compositional": m["group_acc"].get("safe/safe/unsafe"),
                                                     "decoys": m["decoy_acc"]} for name, m in runs.items()}}
        print(compare(result))
    (out / "ceiling.json").write_text(json.dumps(result, indent=1))
    record("ceiling", result)


def compare(result: dict) -> str:
    """A table: the warm start, SafeGRPO and the supervised ceiling on unseen pairings, and how
    much of the gap from the warm start to the ceiling SafeGRPO closed."""
    g, top = result["grpo"], result["curve"][-1]["unseen"]
    ceiling = {"combined": top["combined"], "compositional": top["groups"].get("safe/safe/unsafe"),
               "decoys": top["decoys"]}
    lines = [f"| unseen pairings | warm start | SafeGRPO ({g['run']}) | supervised ceiling ({result['steps']} CE steps) "
             "| share of the gap closed |", "|---|---:|---:|---:|---:|"]
    for k in ("combined", "compositional", "decoys"):
        a, b, c = g["before"][k], g["after"][k], ceiling[k]
        closed = f"{(b - a) / (c - a):.2f}" if c - a > 0.02 else "n/a (no gap)"
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {c:.3f} | {closed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
