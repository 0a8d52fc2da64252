"""Seconds per GRPO step: our trainer against TRL's GRPOTrainer on the same work (CPU).

Same tiny Qwen2-VL-architecture model (random init, built from configs/tiny.yaml's sizes), the
same SafeTag-Synth prompts and images, group size 8, the same completion length (a random model
almost never samples EOS, so both sides write ~max_new_tokens tokens; the mean lengths are
printed), beta 0.01 (so both keep a reference model), one optimizer update per rollout,
temperature 1, token-mean loss. Medians over the timed steps after warm-up steps.

TRL is not a dependency of safegrpo: `make bench` installs it into `.venv-bench` only. TRL
needs transformers' Qwen2VLProcessor, whose video half requires torchvision; this benchmark
builds it without a video processor (images only), so torchvision is not needed either.

    .venv-bench/bin/python bench/bench_grpo_vs_trl.py [--prompts 8] [--steps 5] [--warmup 2]
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
from safegrpo.model import load_model  # noqa: E402
from safegrpo.safety.prompting import instruction_text  # noqa: E402
from safegrpo.safety.reward import compute_score  # noqa: E402


def ours(model_dir, synth_dir, out, args) -> tuple[list[float], float]:
    from safegrpo.config import load_config
    from safegrpo.trainer import Trainer
    cfg = {"model": {"path": str(model_dir)},
           "data": {"train": str(synth_dir / "train.parquet"), "test": str(synth_dir / "test.parquet"),
                    "prompt_style": "compact", "max_prompt_length": 256},
           "rollout": {"group_size": 8, "max_new_tokens": args.tokens, "temperature": 1.0},
           "grpo": {"beta": 0.01},
           "optim": {"lr": 1e-5},
           "sft": {"enabled": False},
           "train": {"out_dir": str(out), "steps": args.warmup + args.steps, "prompts_per_step": args.prompts,
                     "mini_batch_prompts": args.prompts, "micro_batch_prompts": args.prompts,
                     "save_every": 0, "eval_limit": 0, "seed": 0, "threads": torch.get_num_threads()}}
    path = out / "cfg.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    tr = Trainer(load_config(path))
    tr.setup(model_dir)
    times, lengths = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        m = tr.train_step(step)
        times.append(time.perf_counter() - t0)
        lengths.append(m["response_len/mean"])
    return times[args.warmup:], statistics.mean(lengths)


def trl_side(model_dir, synth_dir, out, args) -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from safegrpo.data.records import load_parquet

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its torchvision-backed video processor."""
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    processor = ImageOnlyQwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(model_dir), tokenizer=AutoTokenizer.from_pretrained(model_dir),
        video_processor=None, chat_template=(model_dir / "chat_template.jinja").read_text())
    processor.tokenizer.padding_side = "left"   # as our encode_prompts; TRL left-pads its prompt ids
    instruction = instruction_text("compact")
    recs = load_parquet(synth_dir / "train.parquet")[:args.prompts * (args.warmup + args.steps)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{r.prompt}\n\n{instruction}"}],
                             "image": r.images[0], **r.tags} for r in recs])

    def reward(prompts, completions, image_tag, text_tag, combine_tag, **kw):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [compute_score(t, {"image_tag": a, "text_tag": b, "combine_tag": c})
                for t, a, b, c in zip(texts, image_tag, text_tag, combine_tag)]

    times, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    n = args.prompts * 8
    from safegrpo.rl.rollout import banned_token_ids
    banned = banned_token_ids(load_model(model_dir))
    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=n, gradient_accumulation_steps=1,
                     num_generations=8, max_completion_length=args.tokens, beta=0.01, learning_rate=1e-5,
                     num_iterations=1, temperature=1.0, max_steps=args.warmup + args.steps, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
                     dataloader_num_workers=0, loss_type="dapo", shuffle_dataset=False, top_k=0,
                     # the same ids our rollout never samples (a sampled <|vision_start|> breaks
                     # Qwen-VL's position ids on the next forward)
                     generation_kwargs={"suppress_tokens": banned})
    model = load_model(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=processor,
                          callbacks=[Timer()])
    trainer.train()
    return times[args.warmup:], statistics.mean(lengths) if lengths else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (x 8 samples)")
    ap.add_argument("--tokens", type=int, default=64, help="max_new_tokens / max_completion_length")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_dir, model_dir = tiny_dirs(tmp)
        ours_t, ours_len = ours(model_dir, synth_dir, tmp / "ours", args)
        trl_t, trl_len = trl_side(model_dir, synth_dir, tmp / "trl", args)
    o, t = statistics.median(ours_t), statistics.median(trl_t)
    print(f"grpo_step_vs_trl: ours {o:.2f} s/step (mean completion {ours_len:.1f} tokens), "
          f"TRL {t:.2f} s/step ({trl_len:.1f} tokens), speedup {t / o:.2f}x "
          f"[{args.prompts} prompts x 8, {args.tokens} new tokens, median of {args.steps} after {args.warmup}]")
    record("grpo_step_vs_trl", {"ours_s": round(o, 3), "trl_s": round(t, 3), "speedup": round(t / o, 2),
                                "ours_len": round(ours_len, 1), "trl_len": round(trl_len, 1),
                                "prompts": args.prompts, "group_size": 8, "max_new_tokens": args.tokens,
                                "ours_all_s": [round(x, 3) for x in ours_t], "trl_all_s": [round(x, 3) for x in trl_t]})


if __name__ == "__main__":
    main()
