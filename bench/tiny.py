"""What the CPU benchmarks run on: SafeTag-Synth and the tiny Qwen2-VL of configs/tiny.yaml
(random init, seed 0), built into a folder; and, for the rollout benchmarks, the first prompts
of its training split encoded as the trainer encodes them."""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from safegrpo.data.records import load_parquet
from safegrpo.data.synth import SynthConfig, write_synth
from safegrpo.data.tiny_model import build_tiny_model_dir
from safegrpo.model import load_model, load_processor
from safegrpo.safety.prompting import encode_prompts

ROOT = Path(__file__).resolve().parents[1]


def tiny_dirs(root: Path) -> tuple[Path, Path]:
    """(SafeTag-Synth folder, tiny model folder) written under `root`."""
    tiny = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["model"]["tiny"]
    return write_synth(root / "synth", SynthConfig()), build_tiny_model_dir(root / "model", tiny, seed=0)


def rollout_inputs(n_prompts: int):
    """(model in eval mode, processor, encoded batch of the first n_prompts training prompts)."""
    with tempfile.TemporaryDirectory() as tmp:
        synth, model_dir = tiny_dirs(Path(tmp))
        model, processor = load_model(model_dir).eval(), load_processor(model_dir)
        recs = load_parquet(synth / "train.parquet", limit=n_prompts)
    return model, processor, encode_prompts(processor, recs, "compact")
