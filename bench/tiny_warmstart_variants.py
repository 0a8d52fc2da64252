"""Diagnostics for the tiny recipe (issue 3): the default `make train` run with a different warm
start, to locate what keeps SafeGRPO from learning the combined tag. Not recipes: both variants
tell the warm start something about the tags.

    python bench/tiny_warmstart_variants.py right-side-tags   # visual/text tags right, combined a coin
    python bench/tiny_warmstart_variants.py or-tags           # combined = unsafe if a (random) side tag is

Each run writes runs/variant_<name>/ (eval_table.md, metrics.jsonl, reward_curves.png), about
7 minutes on 2 cores.
"""
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from safegrpo import synth  # noqa: E402


def completion(record, rng: random.Random, v: str, t: str, c: str) -> str:
    """A demonstration with the given tags (the format of synth.demonstration)."""
    concept, request = record.meta["concept"], record.prompt.rstrip("?.").lower()
    answer = rng.choice(synth.REFUSALS) if c == "unsafe" else rng.choice(synth.HELPFUL).format(c=concept)
    return (f"<think>1. The image shows {synth.caption_object(concept)}. 2. <visual_safe>{v}</visual_safe> "
            f"3. The user asks: {request}. <text_safe>{t}</text_safe> "
            f"4. <combined_safe>{c}</combined_safe> 5. The overall risk is {'high' if c == 'unsafe' else 'low'}.</think>\n"
            f"<answer>{answer}</answer>")


def right_side_tags(record, rng):
    return completion(record, rng, record.image_tag, record.text_tag, rng.choice(["safe", "unsafe"]))


def or_tags(record, rng, p_unsafe=0.3):
    v, t = ("unsafe" if rng.random() < p_unsafe else "safe" for _ in range(2))
    return completion(record, rng, v, t, "unsafe" if "unsafe" in (v, t) else "safe")


VARIANTS = {"right-side-tags": right_side_tags, "or-tags": or_tags}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python bench/tiny_warmstart_variants.py {{{'|'.join(VARIANTS)}}}")
    synth.demonstration = VARIANTS[sys.argv[1]]          # the trainer draws demonstrations through it
    sys.exit(train.main(["--config", str(ROOT / "configs/tiny.yaml"),
                         "--set", f"train.out_dir=runs/variant_{sys.argv[1]}", "--set", "train.save_every=0"]))
