"""Bytes LoRA saves on the tiny default, measured: the tensors the trainer holds after one GRPO
step (policy weights, reference weights, AdamW state) with full fine-tuning and with LoRA, and
the memory plan's figures for Qwen3-VL-8B (safegrpo/memory.py, the same arithmetic).

    python bench/lora_memory.py [--rank 8]        # figures into bench/results.json under "lora_memory"
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from safegrpo.config import load_config  # noqa: E402
from safegrpo.trainer import Trainer  # noqa: E402


def held_bytes(tr: Trainer) -> dict:
    """Bytes of the policy's parameters, the reference's and the optimizer state."""
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)     # noqa: E731
    opt = [v for st in tr.updater.opt.state.values() for v in st.values() if hasattr(v, "numel") and v.numel() > 1]
    return {"policy": nbytes(tr.policy.model.parameters()),
            "reference": nbytes(tr.policy.ref.parameters()) if tr.policy.ref is not None else 0,
            "optimizer": nbytes(opt)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in (("full", []), ("lora", [f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}"])):
            cfg = load_config(ROOT / "configs" / "tiny.yaml", over + [
                f"train.out_dir={tmp}/{name}", f"model.tiny_dir={tmp}/model", f"data.synth_dir={tmp}/synth",
                "sft.enabled=false", "train.steps=1", "train.save_every=0", "train.prompts_per_step=16"])
            tr = Trainer(cfg)
            tr.setup(tr.model_dir)
            tr.train_step(0)
            out[name] = held_bytes(tr)
    total = {k: sum(v.values()) for k, v in out.items()}
    fig = {"rank": args.rank, "full_bytes": total["full"], "lora_bytes": total["lora"],
           "saved_bytes": total["full"] - total["lora"], "ratio": round(total["lora"] / total["full"], 3),
           **{f"{k}_{n}": v for k, d in out.items() for n, v in d.items()}}
    print(f"tiny default, rank {args.rank}: full fine-tuning holds {total['full'] / 2**20:.2f} MB "
          f"(policy {out['full']['policy'] / 2**20:.2f}, reference {out['full']['reference'] / 2**20:.2f}, "
          f"AdamW {out['full']['optimizer'] / 2**20:.2f}); LoRA {total['lora'] / 2**20:.2f} MB (policy "
          f"{out['lora']['policy'] / 2**20:.2f}, reference 0, AdamW {out['lora']['optimizer'] / 2**20:.2f}): "
          f"{fig['ratio']:.3f}x")
    record("lora_memory", fig)


if __name__ == "__main__":
    main()
