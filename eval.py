"""Evaluate a checkpoint (any Hugging Face model directory, or a LoRA checkpoint: its base model with
the adapter merged) on SafeTag and real safety benchmarks.

    python eval.py                                   # latest checkpoint of configs/tiny.yaml's run,
                                                     # SafeTag-Synth test + every sample in ../shared/benchmarks
    python eval.py --checkpoint DIR --benchmark xstest --benchmark figstep=/data/FigStep --limit 100
    python eval.py --checkpoint AFTER --compare BEFORE   # both side by side
    python eval.py --judge strict                    # or keywords (default), or package.module:factory
    python eval.py --endpoint http://localhost:8000/v1 --model NAME --prompt-style none   # a served model
    python eval.py --checkpoint DIR --judge https://api.openai.com/v1 --judge-model gpt-4o-mini   # + a judge model

Benchmarks (`--benchmark NAME` or `NAME=PATH`, repeatable): safetag-synth, safetag=PATH, figstep,
mossbench, xstest, mmsafeaware, vlguard=PATH, siuo=PATH. Without a path the sample in
../shared/benchmarks is read. Generation is greedy unless --temperature > 0.

The evaluated model is a checkpoint (a model directory, run through our rollout engine) or, with
--endpoint URL --model NAME, any model behind an OpenAI-compatible chat-completions endpoint (vLLM,
SGLang, `transformers serve`, OpenAI; API key from the variable --api-key-env names). A judge model
(--judge URL --judge-model NAME) gives each answer a verdict (docs/JUDGE.md) and adds the paper's
figures (safety score 0-100, refusal rates) beside the rule-based ones. Endpoint replies are cached
under --cache (default: <out>/cache), so a re-run sends no request and a crash loses no finished one.

Writes to --out (default: <checkpoint>/eval, or runs/eval/<model name> for an endpoint): eval.json
(machine-readable), eval.md (tables), refusal.png (safety vs over-refusal per benchmark; judge.png
the judge model's), confusion.png (tag confusion) and completions/<label>-<benchmark>.jsonl (every
completion with its item and verdicts, the judge model's raw reply included). Refusal rates count
readable answers only (the format gate passed; with --prompt-style none, not empty); the others
are counted and shown as unreadable.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from safegrpo.eval.benchmarks import BENCHMARKS, SHARED, BenchmarkError, load_benchmark
from safegrpo.checkpoint import latest_checkpoint
from safegrpo.config import load_config
from safegrpo.eval.endpoint import Endpoint, EndpointError, check_url
from safegrpo.eval.metrics import (benchmark_table, category_table, expected_behaviour, generate_completions,
                                   judge_table, score)
from safegrpo.files import NotOursError, own_dir, write_atomic
from safegrpo.lora import is_adapter_dir
from safegrpo.model import load_model, load_processor
from safegrpo.data.synth import synth_ready
from safegrpo.safety.judge import load_judge
from safegrpo.safety.judge_model import ModelJudge, judge_metrics
from safegrpo.safety.prompting import chat_messages, instruction_text

DEFAULT_BENCHMARKS = ["safetag-synth", "figstep", "mossbench", "xstest", "mmsafeaware"]


def parse_benchmarks(specs: list[str]) -> list[tuple[str, str | None]]:
    out = []
    for spec in specs or DEFAULT_BENCHMARKS:
        name, _, path = spec.partition("=")
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
        out.append((name, path or None))
    return out


def checkpoint_source(ckpt: Path, args, prompt_style: str):
    """complete(name, records) -> completions of the model directory `ckpt` (our rollout engine)."""
    model, processor = load_model(ckpt), load_processor(ckpt)

    def complete(name, records, label):
        return generate_completions(model, processor, records, prompt_style, args.max_new_tokens,
                                    batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed, desc=f"{label} {name}")
    return complete


def endpoint_source(endpoint: Endpoint, args, prompt_style: str):
    """complete(name, records) -> completions of the model behind `endpoint`: the same messages
    (prompting.chat_messages) and sampling settings as a checkpoint gets, one request per item."""
    instruction = instruction_text(prompt_style)

    def complete(name, records, label):
        reqs = []
        for i, r in enumerate(records):
            sampling = {"max_tokens": args.max_new_tokens, "temperature": args.temperature}
            if args.temperature > 0:         # the same per-item seeds as the rollout engine's
                sampling.update(top_p=args.top_p, seed=args.seed * 1_000_003 + i)
            reqs.append((f"{name} item {r.meta.get('id', i)}", chat_messages(r.prompt, r.images, instruction),
                         sampling))
        return endpoint.complete(reqs, desc=f"{label} {name}")
    return complete


def run_model(complete, suites: dict, args, prompt_style: str, out: Path, label: str, judge_model) -> dict:
    """Evaluate one model (`complete`: a checkpoint_ or endpoint_source) on every loaded benchmark;
    returns {name: metrics}, with the judge model's figures under "judge_model" when one is given."""
    results = {}
    for name, records in suites.items():
        completions = complete(name, records, label)
        metrics = score(records, completions, args.judge, formatted=prompt_style != "none")
        verdicts = [(None, None)] * len(records)
        if judge_model is not None:
            verdicts = judge_model.assess(records, completions, where=f"{name} ")
            metrics["judge_model"] = judge_metrics([expected_behaviour(r) for r in records], [v for v, _ in verdicts])
        results[name] = metrics
        lines = [json.dumps({"id": r.meta.get("id"), "category": r.meta.get("category"), "prompt": r.prompt,
                             "tags": r.tags, "expected": expected_behaviour(r), "completion": c,
                             **({"judge_verdict": v, "judge_reply": raw} if judge_model is not None else {})})
                 for r, c, (v, raw) in zip(records, completions, verdicts)]
        own_dir(out / "completions")
        write_atomic(out / "completions" / f"{label}-{name}.jsonl", "\n".join(lines) + "\n")
        extra = ""
        if judge_model is not None:
            jm = metrics["judge_model"]
            extra = (f" | judge: safety score {_f(jm['safety_score'], '.1f')}, refusal unsafe "
                     f"{_f(jm['refusal_rate_unsafe'])} safe {_f(jm['refusal_rate_safe'])}, {jm['n_unreadable']} unreadable")
        print(f"[{label}] {name}: n={metrics['n']} format={metrics['format_rate']:.3f} "
              f"refusal unsafe={_f(metrics['refusal_rate_unsafe'])} safe={_f(metrics['refusal_rate_safe'])} "
              f"({metrics['n_unreadable']} unreadable){extra}")
    return results


def _f(v, fmt=".3f"):
    return "n/a" if v is None else format(v, fmt)


def write_tables(out: Path, runs: dict, label: str, args, prompt_style: str, judge_model, suites, skipped,
                 endpoints) -> dict:
    """eval.md and the charts; returns the table columns {"label (model)": {benchmark: metrics}}."""
    columns = {f"{k} ({short})": res for k, (_, res, short) in runs.items()}
    md = [f"# Evaluation\n\nmodel: `{runs[label][0]}`" + (f", baseline: `{args.compare}`" if args.compare else ""),
          f"refusal judge: `{args.judge}`" + (f", judge model: `{judge_model.name}`" if judge_model else "")
          + f", prompt style `{prompt_style}`, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}, top-p {args.top_p}'}, "
          f"max {args.max_new_tokens} new tokens\n",
          "Refusal rates count readable answers only (" + ("the format gate passed" if prompt_style != "none"
                                                            else "not empty") + "); `unreadable` counts the rest.\n",
          benchmark_table(columns)]
    if judge_model is not None:
        md.append("\n## Judge model (docs/JUDGE.md)\n\nSafety score: 100 x share of readable verdicts that are "
                  "REFUSE or SAFE, on items not expected to be answered; refusal rates: REFUSE share of readable "
                  "verdicts; unreadable: UNREADABLE verdicts and replies naming no verdict.\n\n" + judge_table(columns))
    for name in suites:
        md.append(f"\n## {name}\n\n" + category_table({k: r[name] for k, r in columns.items()}))
        if name in skipped:
            md.append(f"\n{len(skipped[name])} item(s) skipped for a missing image.\n")
    if endpoints:
        md.append("\n## Endpoints\n\n" + "\n".join(
            f"- {k}: {e.model} at {e.url}: {e.stats['requests']} request(s) sent, {e.stats['retries']} retried, "
            f"{e.stats['cached']} answered from the cache" for k, e in endpoints.items()) + "\n")
    write_atomic(out / "eval.md", "\n".join(md))
    try:
        from safegrpo.eval.plots import plot_confusion, plot_refusal
        plot_refusal(columns, out / "refusal.png")
        if judge_model is not None:
            plot_refusal(columns, out / "judge.png", source="judge_model")
        plot_confusion(runs[label][1], out / "confusion.png")
    except ImportError as e:  # matplotlib is a dependency; keep the report if a user removed it
        print(f"no charts: {e}", file=sys.stderr)
    return columns


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="run whose latest checkpoint and prompt style to use")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--checkpoint", default="", help="model directory (default: latest checkpoint of the run)")
    ap.add_argument("--compare", default="", help="a second model directory, reported side by side (e.g. before)")
    ap.add_argument("--benchmark", action="append", default=[], metavar="NAME[=PATH]")
    ap.add_argument("--limit", type=int, default=0, help="first N items of each benchmark (0: all)")
    ap.add_argument("--out", default="", help="report folder (default: <checkpoint>/eval)")
    ap.add_argument("--judge", default="", help="keywords | strict | package.module:factory (default: the config's), "
                    "or the URL of a judge model's endpoint (with --judge-model)")
    ep = ap.add_argument_group("models behind OpenAI-compatible endpoints")
    ep.add_argument("--endpoint", default="", help="evaluate the model served here (e.g. http://localhost:8000/v1) "
                    "instead of a checkpoint")
    ep.add_argument("--model", default="", help="the model name the endpoint serves (with --endpoint)")
    ep.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding --endpoint's "
                    "API key (never written anywhere)")
    ep.add_argument("--judge-model", default="", help="the judge model's name at --judge URL")
    ep.add_argument("--judge-api-key-env", default="OPENAI_API_KEY")
    ep.add_argument("--judge-max-tokens", type=int, default=256)
    ep.add_argument("--judge-images", action=argparse.BooleanOptionalAction, default=True,
                    help="send the item's image to the judge (--no-judge-images for a text-only judge)")
    ep.add_argument("--concurrency", type=int, default=8, help="requests in flight per endpoint")
    ep.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    ep.add_argument("--retries", type=int, default=4, help="retries of a 429, 5xx, refused connection or timeout")
    ep.add_argument("--backoff", type=float, default=1.0, help="first retry's wait in seconds (doubling)")
    ep.add_argument("--cache", default="", help="reply cache folder (default: <out>/cache)")
    ap.add_argument("--skip-missing", action="store_true", help="skip (and report) items whose image is missing")
    ap.add_argument("--prompt-style", default="", help="default: the config's data.prompt_style")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the config's rollout.max_new_tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    return ap


def main(argv=None):
    ap = build_parser()
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
    judge_url = args.judge if args.judge.startswith(("http://", "https://")) else ""
    args.judge = cfg.reward.refusal_judge if judge_url or not args.judge else args.judge
    try:                                  # a bad judge is known now, not after the first benchmark's generation
        load_judge(args.judge)
        if judge_url and not args.judge_model:
            raise ValueError(f"--judge {judge_url} needs --judge-model (the model name it serves)")
        if judge_url:
            check_url(judge_url, "--judge")
        if args.endpoint:
            check_url(args.endpoint)
            if not args.model:
                raise ValueError("--endpoint needs --model (the model name it serves)")
            if args.checkpoint:
                raise ValueError("give --checkpoint or --endpoint, not both")
        elif args.model:
            raise ValueError("--model names the model behind --endpoint; give --endpoint too")
        if args.concurrency < 1 or args.retries < 0 or args.request_timeout <= 0 or args.backoff < 0:
            raise ValueError("--concurrency must be >= 1, --retries >= 0, --request-timeout > 0, --backoff >= 0")
        prompt_style = args.prompt_style or cfg.data.prompt_style
        instruction_text(prompt_style)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.max_new_tokens = args.max_new_tokens or cfg.rollout.max_new_tokens

    ckpt = None
    if not args.endpoint:
        ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
        if ckpt is None:
            print(f"no checkpoint under {Path(cfg.train.out_dir) / 'checkpoints'}; run `make train` first "
                  "or pass --checkpoint (or --endpoint)", file=sys.stderr)
            return 2
    for c in filter(None, [ckpt, Path(args.compare) if args.compare else None]):
        if not ((c / "config.json").is_file() or is_adapter_dir(c)):
            print(f"no model directory at {c}; run `make train` first or pass --checkpoint", file=sys.stderr)
            return 2

    if args.out:
        out = Path(args.out)
    else:
        out = ckpt / "eval" if ckpt else Path("runs/eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", args.model).strip("_.")
    cache = Path(args.cache) if args.cache else out / "cache"
    benchmarks = parse_benchmarks(args.benchmark)
    for name, path in benchmarks:
        if path and not Path(path).exists():   # a typo must not quietly evaluate other data
            print(f"error: --benchmark {name}={path}: no such file or folder", file=sys.stderr)
            return 2
    try:                                     # folders of ours only, checked before anything runs
        own_dir(out)
        if args.endpoint or judge_url:
            own_dir(cache)
    except NotOursError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    suites, skipped, data_paths = {}, {}, {}
    for name, path in benchmarks:
        report = []
        kw = {"synth": cfg.data.synth} if name == "safetag-synth" else {}
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

    def endpoint(url, model, key_env):
        return Endpoint(url, model, api_key_env=key_env, concurrency=args.concurrency, timeout=args.request_timeout,
                        retries=args.retries, backoff=args.backoff, cache_dir=cache)
    try:                                 # made (and the cache checked writable) before any work
        judge_model = ModelJudge(endpoint(judge_url, args.judge_model, args.judge_api_key_env),
                                 max_tokens=args.judge_max_tokens, with_images=args.judge_images) if judge_url else None
        served = endpoint(args.endpoint, args.model, args.api_key_env) if args.endpoint else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs, endpoints = {}, {}
    try:
        for ep in (served, judge_model.endpoint if judge_model else None):
            if ep is not None:         # a dead server is found now, not after every completion was made
                ep.check()
        if args.compare:
            runs["before"] = (args.compare, run_model(checkpoint_source(Path(args.compare), args, prompt_style), suites,
                                                      args, prompt_style, out, "before", judge_model),
                              Path(args.compare).name)
        label = "after" if args.compare else "model"
        if args.endpoint:
            endpoints["model"] = served
            source, name, short = (endpoint_source(served, args, prompt_style), f"{args.model} @ {served.url}",
                                   args.model.rstrip("/").rsplit("/", 1)[-1])
        else:
            source, name, short = checkpoint_source(ckpt, args, prompt_style), str(ckpt), ckpt.name
        runs[label] = (name, run_model(source, suites, args, prompt_style, out, label, judge_model), short)
    except EndpointError as e:
        print(f"error: {e}\n(replies that arrived are cached in {cache}; run the same command again to resume)",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"interrupted: nothing more was sent (replies that arrived are cached in {cache}; run the same "
              "command again to resume)", file=sys.stderr)
        return 130
    if judge_model is not None:
        endpoints["judge"] = judge_model.endpoint

    report = {"model": runs[label][0], "checkpoint": str(ckpt) if ckpt else None, "benchmarks": runs[label][1],
              "data": data_paths, "judge": args.judge,
              "judge_model": judge_model.name if judge_model else None,
              "endpoints": {k: e.describe() for k, e in endpoints.items()},
              "settings": {"prompt_style": prompt_style, "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_p": args.top_p, "limit": args.limit,
                           "shared": str(SHARED)},
              "skipped": {k: [list(x) for x in v] for k, v in skipped.items()}}
    if args.compare:
        report["baseline"] = {"checkpoint": args.compare, "benchmarks": runs["before"][1]}
    write_atomic(out / "eval.json", json.dumps(report, indent=1))

    columns = write_tables(out, runs, label, args, prompt_style, judge_model, suites, skipped, endpoints)
    print(benchmark_table(columns))
    for k, e in endpoints.items():
        print(f"{k} endpoint: {e.stats['requests']} request(s), {e.stats['retries']} retried, "
              f"{e.stats['cached']} from the cache ({cache})")
    print(f"report: {out / 'eval.md'} (tables), {out / 'eval.json'} (figures), {out}/*.png (charts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
