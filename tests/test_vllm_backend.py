"""The parts of rollout.engine: vllm (rl/vllm_engine.py) that need no vLLM: what its options
resolve to, the prompt ids it sends, the weights it receives, and the error without vLLM. The
engine itself is tested against ours in tests_vllm/ (`make test-vllm`, its own environment)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from safegrpo.config import LoraConfig, load_config
from safegrpo.model import load_model
from safegrpo.rl.vllm_engine import policy_weights, vllm_prompt_ids

ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path, tree):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    return load_config(str(tmp_path / "c.yaml"))


def test_vllm_turns_token_importance_weights_on_unless_set(tmp_path):
    assert _load(tmp_path, {}).grpo.rollout_correction.rollout_is == ""
    assert _load(tmp_path, {"rollout": {"engine": "vllm"}}).grpo.rollout_correction.rollout_is == "token"
    off = _load(tmp_path, {"rollout": {"engine": "vllm"}, "grpo": {"rollout_correction": {"rollout_is": ""}}})
    assert off.grpo.rollout_correction.rollout_is == ""
    seq = load_config(None, ["rollout.engine=vllm", "grpo.rollout_correction.rollout_is=sequence"])
    assert seq.grpo.rollout_correction.rollout_is == "sequence"
    assert load_config(None, ["rollout.engine=vllm"]).grpo.rollout_correction.rollout_is == "token"


def test_old_logprobs_from_vllm_are_refused_naming_why(tmp_path):
    with pytest.raises(ValueError, match="vLLM does not return"):
        _load(tmp_path, {"rollout": {"engine": "vllm"}, "grpo": {"old_logprobs": "rollout",
                                                                 "rollout_correction": {"rollout_is": ""}}})


def test_prompt_ids_lose_padding_and_each_image_run_collapses_to_one():
    IMG = 7
    ids = torch.tensor([[0, 0, 1, IMG, IMG, IMG, 2, IMG, IMG, 3],
                        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    assert vllm_prompt_ids(ids, mask, IMG) == [[1, IMG, 2, IMG, 3], [1, 2, 3, 4, 5, 6, IMG, 8, 9, 10]]
    assert vllm_prompt_ids(ids, mask, None)[0] == [1, IMG, IMG, IMG, 2, IMG, IMG, 3]


def adapted_copy(model, seed: int = 1):
    """A copy of `model` with LoRA adapters (rank 4) whose B is random, so they change it."""
    from safegrpo.lora import apply_lora
    adapted = apply_lora(copy.deepcopy(model), LoraConfig(rank=4, alpha=8.0), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapted


def test_synced_weights_are_the_models_and_under_lora_the_merged_ones(tiny_model_dir):
    """What the engine receives: every parameter under its checkpoint name; under LoRA each
    adapted projection as peft's merge computes it (W + scaling B A), the adapters left out."""
    pytest.importorskip("peft")
    from safegrpo.lora import merge
    plain = load_model(tiny_model_dir)
    sent = dict(policy_weights(plain))
    assert list(sent) == [n for n, _ in plain.named_parameters()]
    assert all(torch.equal(sent[n], p) for n, p in plain.named_parameters())
    adapted = adapted_copy(plain)
    sent = dict(policy_weights(adapted))
    want = merge(copy.deepcopy(adapted)).state_dict()
    assert set(sent) == set(sent) & set(want) == {n for n, _ in plain.named_parameters()}
    assert max(float((sent[n] - want[n]).abs().max()) for n in sent) <= 1e-6
    moved = [n for n, p in plain.named_parameters() if float((sent[n] - p.detach()).abs().max()) > 1e-3]
    assert len(moved) == plain.config.get_text_config().num_hidden_layers * 7      # every target projection


def test_a_run_with_vllm_but_without_it_installed_stops_in_one_line(tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"rollout": {"engine": "vllm"},
                                                     "train": {"out_dir": str(tmp_path / "run")}}))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "c.yaml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("[error] rollout.engine: vllm needs vLLM")
    assert not (tmp_path / "run").exists()
