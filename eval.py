"""Evaluate a checkpoint (any Hugging Face model directory, or a LoRA checkpoint: its base model with
the adapter merged) on SafeTag and real safety benchmarks.

    python eval.py                                   # latest checkpoint of configs/tiny.yaml's run,
                                                     # SafeTag-Synth test + every sample in ../shared/benchmarks
    python eval.py --checkpoint DIR --benchmark xstest --benchmark figstep=/data/FigStep --limit 100
    python eval.py --checkpoint AFTER --compare BEFORE   # both side by side
    python eval.py --judge strict                    # or keywords (default), or package.module:factory

Benchmarks (`--benchmark NAME` or `NAME=PATH`, repeatable): safetag-synth, safetag=PATH, figstep,
mossbench, xstest, mmsafeaware, vlguard=PATH, siuo=PATH. Without a path the sample in
../shared/benchmarks is read. Generation is greedy unless --temperature > 0.

Writes to --out (default: <checkpoint>/eval): eval.json (machine-readable), eval.md (tables),
refusal.png (safety vs over-refusal per benchmark), confusion.png (tag confusion) and
completions/<benchmark>.jsonl (every completion with its item and verdicts).
"""
import argparse
import json
import sys
from pathlib import Path

from safegrpo.eval.benchmarks import BENCHMARKS, SHARED, BenchmarkError, load_benchmark
from safegrpo.checkpoint import latest_checkpoint
from safegrpo.config import load_config
from safegrpo.eval.metrics import benchmark_table, category_table, evaluate
from safegrpo.files import write_atomic
from safegrpo.lora import is_adapter_dir
from safegrpo.model import load_model, load_processor
from safegrpo.data.synth import synth_ready
from safegrpo.safety.judge import load_judge

DEFAULT_BENCHMARKS = ["safetag-synth", "figstep", "mossbench", "xstest", "mmsafeaware"]


def parse_benchmarks(specs: list[str]) -> list[tuple[str, str | None]]:
    out = []
    for spec in specs or DEFAULT_BENCHMARKS:
        name, _, path = spec.partition("=")
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
        out.append((name, path or None))
    return out


def run_checkpoint(ckpt: Path, suites: dict, args, prompt_style: str, out: Path, label: str) -> dict:
    """Evaluate one checkpoint on every loaded benchmark; returns {name: metrics}."""
    model, processor = load_model(ckpt), load_processor(ckpt)
    results = {}
    for name, records in suites.items():
        metrics, completions = evaluate(model, processor, records, prompt_style, args.max_new_tokens,
                                        batch_size=args.batch_size, judge=args.judge,
                                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                        desc=f"{label} {name}")
        results[name] = metrics
        lines = [json.dumps({"id": r.meta.get("id"), "category": r.meta.get("category"), "prompt": r.prompt,
                             "tags": r.tags, "expected": r.meta.get("expected"), "completion": c})
                 for r, c in zip(records, completions)]
        (out / "completions").mkdir(parents=True, exist_ok=True)
        write_atomic(out / "completions" / f"{label}-{name}.jsonl", "\n".join(lines) + "\n")
        print(f"[{label}] {name}: n={metrics['n']} format={metrics['format_rate']:.3f} "
              f"refusal unsafe={_f(metrics['refusal_rate_unsafe'])} safe={_f(metrics['refusal_rate_safe'])}")
    return results


def _f(v):
    return "n/a" if v is None else f"{v:.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="run whose latest checkpoint and prompt style to use")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--checkpoint", default="", help="model directory (default: latest checkpoint of the run)")
    ap.add_argument("--compare", default="", help="a second model directory, reported side by side (e.g. before)")
    ap.add_argument("--benchmark", action="append", default=[], metavar="NAME[=PATH]")
    ap.add_argument("--limit", type=int, default=0, help="first N items of each benchmark (0: all)")
    ap.add_argument("--out", default="", help="report folder (default: <checkpoint>/eval)")
    ap.add_argument("--judge", default="", help="keywords | strict | package.module:factory (default: the config's)")
    ap.add_argument("--skip-missing", action="store_true", help="skip (and report) items whose image is missing")
    ap.add_argument("--prompt-style", default="", help="default: the config's data.prompt_style")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the config's rollout.max_new_tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    for flag in ("limit", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < (0 if flag != "batch_size" else 1):
            ap.error(f"--{flag.replace('_', '-')} must be {'>= 1' if flag == 'batch_size' else '>= 0'}, "
                     f"got {getattr(args, flag)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be >= 0 and --top-p in (0, 1]")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.judge = args.judge or cfg.reward.refusal_judge
    try:                                  # a bad judge is known now, not after the first benchmark's generation
        load_judge(args.judge)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.max_new_tokens = args.max_new_tokens or cfg.rollout.max_new_tokens
    prompt_style = args.prompt_style or cfg.data.prompt_style

    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
    for c in filter(None, [ckpt, Path(args.compare) if args.compare else None]):
        if not ((c / "config.json").is_file() or is_adapter_dir(c)):
            print(f"no model directory at {c}; run `make train` first or pass --checkpoint", file=sys.stderr)
            return 2
    if ckpt is None:
        print(f"no checkpoint under {Path(cfg.train.out_dir) / 'checkpoints'}; run `make train` first "
              "or pass --checkpoint", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else ckpt / "eval"
    suites, skipped, data_paths = {}, {}, {}
    for name, path in parse_benchmarks(args.benchmark):
        report = []
        kw = {"synth": cfg.data.synth} if name == "safetag-synth" else {}
        if path and not Path(path).exists():   # a typo must not quietly evaluate other data
            print(f"error: --benchmark {name}={path}: no such file or folder", file=sys.stderr)
            return 2
        if name == "safetag-synth":         # read where training generated it; never rewrite that folder
            given = path
            path = path or cfg.data.synth_dir
            if not synth_ready(path, cfg.data.synth):
                if given:
                    print(f"error: --benchmark safetag-synth={given} holds no SafeTag-Synth split generated "
                          "with this config's data.synth", file=sys.stderr)
                    return 2
                path = out / "safetag-synth"
        data_paths[name] = str(Path(path).resolve()) if path else "(the benchmark's default location)"
        try:
            records = load_benchmark(name, path, skip_missing=args.skip_missing, report=report, **kw)
        except (BenchmarkError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        suites[name] = records[:args.limit or None]
        if report:
            skipped[name] = report
            print(f"{name}: skipped {len(report)} item(s) with a missing image (first: {report[0][1]})")
    out.mkdir(parents=True, exist_ok=True)

    runs = {}
    if args.compare:
        runs["before"] = (Path(args.compare), run_checkpoint(Path(args.compare), suites, args, prompt_style, out, "before"))
    label = "after" if args.compare else "model"
    runs[label] = (ckpt, run_checkpoint(ckpt, suites, args, prompt_style, out, label))

    report = {"checkpoint": str(ckpt), "benchmarks": runs[label][1], "data": data_paths, "judge": args.judge,
              "settings": {"prompt_style": prompt_style, "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_p": args.top_p, "limit": args.limit,
                           "shared": str(SHARED)},
              "skipped": {k: [list(x) for x in v] for k, v in skipped.items()}}
    if args.compare:
        report["baseline"] = {"checkpoint": args.compare, "benchmarks": runs["before"][1]}
    write_atomic(out / "eval.json", json.dumps(report, indent=1))

    columns = {f"{k} ({p.name})": res for k, (p, res) in runs.items()}
    md = [f"# Evaluation\n\nmodel: `{ckpt}`" + (f", baseline: `{args.compare}`" if args.compare else ""),
          f"judge: `{args.judge}`, prompt style `{prompt_style}`, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}, top-p {args.top_p}'}, "
          f"max {args.max_new_tokens} new tokens\n", benchmark_table(columns)]
    for name in suites:
        md.append(f"\n## {name}\n\n" + category_table({k: r[name] for k, r in columns.items()}))
        if name in skipped:
            md.append(f"\n{len(skipped[name])} item(s) skipped for a missing image.\n")
    write_atomic(out / "eval.md", "\n".join(md))
    try:
        from safegrpo.eval.plots import plot_confusion, plot_refusal
        plot_refusal(columns, out / "refusal.png")
        plot_confusion(runs[label][1], out / "confusion.png")
    except ImportError as e:  # matplotlib is a dependency; keep the report if a user removed it
        print(f"no charts: {e}", file=sys.stderr)
    print(benchmark_table(columns))
    print(f"report: {out / 'eval.md'} (tables), {out / 'eval.json'} (figures), {out}/*.png (charts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
