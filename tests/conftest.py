"""Shared fixtures: a tiny SafeTag-Synth set and a tiny Qwen2-VL model directory, built once."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vision_depth=1, vision_embed_dim=32, vision_num_heads=2, vocab_size=2048, max_pixels=112 * 56,
            tie_word_embeddings=False)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from safegrpo.data.synth import SynthConfig, write_synth
    return write_synth(tmp_path_factory.mktemp("synth"), SynthConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from safegrpo.data.tiny_model import build_tiny_model_dir
    return build_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", TINY, seed=0)
