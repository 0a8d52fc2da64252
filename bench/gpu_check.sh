#!/usr/bin/env bash
# One prepared GPU check for a single H100/H200 (finishes within 8 minutes):
#   1. the `gpu` tests (bf16 autocast log-probs, decode vs generate, a finite GRPO step);
#   2. fused vs naive log-prob memory and time at V 151,936, H 2,048 (bench/gpu_logprobs.py);
#   3. one decode step of the rollout engine at batch 64 and 256 for the Qwen2.5-VL-3B-size and
#      Qwen3-VL-8B-size text stacks, beside the HBM-bandwidth limit (bench/gpu_decode.py);
#   4. GRPO throughput of a randomly initialised Qwen2.5-VL-3B-size model (no downloads):
#      tokens/s/GPU per full step, its phase split and update MFU.
# Usage: bash bench/gpu_check.sh      (PY=/path/to/python to use another environment)
# The machine needs torch with CUDA and this package installed (pip install -e ".[dev]";
# flash-attn optional). It cannot download anything: carry wheels if the environment lacks them.
set -uo pipefail   # no -e: each part runs and reports even if an earlier one failed
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
"$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed (SDPA)"
rc=0
timeout 120 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -o addopts="" || rc=1
timeout 60 "$PY" bench/gpu_logprobs.py || rc=1
timeout 100 "$PY" bench/gpu_decode.py --sizes 3b 8b --batches 64 256 --context 256 --steps 20 || rc=1
timeout 180 "$PY" bench/gpu_throughput.py --steps 3 --warmup 1 --prompts 8 --group 8 --tokens 256 || rc=1
exit $rc
