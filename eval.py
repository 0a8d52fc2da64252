"""Evaluate a checkpoint on a SafeTag test split (greedy by default).

    python eval.py --config configs/tiny.yaml --checkpoint runs/tiny/checkpoints/step_100 [--limit N]

Writes eval.json (metrics) and eval.md (a table) to --out (default: the checkpoint's folder).
Without --checkpoint the latest checkpoint of the config's run is used.
"""
import argparse
import json
import sys
from pathlib import Path

from safegrpo.checkpoint import latest_checkpoint
from safegrpo.config import load_config
from safegrpo.data import load_safetag
from safegrpo.evaluation import comparison_table, evaluate
from safegrpo.model import load_model, load_processor
from safegrpo.synth import SynthConfig, write_synth
from safegrpo.trainer import refusal_rule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
    if ckpt is None or not ckpt.is_dir():
        print(f"no checkpoint found (looked for {args.checkpoint or Path(cfg.train.out_dir) / 'checkpoints'}); "
              "run `make train` first or pass --checkpoint", file=sys.stderr)
        return 2
    d = cfg.data
    if d.test:
        records = load_safetag(d.test, split=d.test_split, skip_invalid=d.skip_invalid)
    else:
        root = write_synth(d.synth_dir, SynthConfig(d.synth.seed, d.synth.n_train, d.synth.n_test,
                                                    image_style=d.synth.image_style))
        records = load_safetag(root / "test.parquet")
    records = records[:args.limit or None]
    model, processor = load_model(ckpt), load_processor(ckpt)
    metrics, _ = evaluate(model, processor, records, d.prompt_style, cfg.rollout.max_new_tokens,
                          refusal=refusal_rule(cfg.grpo.refusal_judge), temperature=args.temperature)
    out = Path(args.out) if args.out else ckpt
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt), "benchmarks": {"safetag-synth" if not d.test else "safetag": metrics}}
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    table = comparison_table({ckpt.name: metrics})
    (out / "eval.md").write_text(table)
    print(table)
    print(f"report: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
