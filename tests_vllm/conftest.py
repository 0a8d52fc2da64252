"""One run shared by tests_vllm/: a tiny Qwen2-VL (configs/tiny.yaml's shape: head_dim 32, as vLLM's
CPU attention has no kernel for 16), warm-started long enough that greedy decoding has no
near-ties, then three GRPO steps with rollout.engine: vllm through train.py (three syncs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
ROOT = Path(__file__).resolve().parents[1]


def run_config(tmp: Path, **train) -> dict:
    return {"model": {"path": "", "tiny_dir": str(tmp / "tiny"), "freeze_vision_tower": True},
            "data": {"synth_dir": str(tmp / "synth"), "synth": {"n_train": 512, "n_test": 64},
                     "prompt_style": "compact", "max_prompt_length": 256, "balance_combined": True,
                     "contrast_column": "contrast"},
            "rollout": {"group_size": 4, "max_new_tokens": 96, "engine": "vllm"},
            "grpo": {"beta": 0.1},
            "optim": {"lr": 1e-4, "warmup_steps": 1},
            "sft": {"enabled": True, "caption_steps": 150, "caption_lr": 1e-3, "steps": 250, "tags": "partial",
                    "step3": "topic", "batch_size": 32, "lr": 1e-3},
            "train": {"out_dir": str(tmp / "run"), "steps": 3, "prompts_per_step": 4, "mini_batch_prompts": 4,
                      "micro_batch_prompts": 4, "save_every": 1, "eval_limit": 8, **train}}


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The run's folder (sft/, checkpoints/step_1..3, metrics.jsonl)."""
    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(run_config(tmp)))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp / "cfg.yaml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return tmp / "run"
