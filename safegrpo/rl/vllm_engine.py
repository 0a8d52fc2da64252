"""vLLM as the rollout engine (rollout.engine: vllm), colocated with training, in-process.

    VLLMEngine(cfg, model_dir, ...)     one engine per process, loaded from the folder GRPO starts
                                         from; under torchrun each rank drives its own
                                         (vLLM's external launcher: the ranks' process group is its world)
    engine.sync(model)                   the policy's current weights into the engine, one
                                         parameter at a time (policy_weights)
    engine.generate(batch, images, ...)  -> Rollout, as rollout.generate returns it

What it returns and why (tests_vllm/ checks each against our engine and the training forward):
- the prompts are ours: the token ids our processor made, with each image's run of placeholder
  ids collapsed to one (vLLM expands it again from the image; given the expanded run it would
  expand every placeholder and read another prompt), and the PIL images themselves. The prompt
  vLLM ran is compared with ours and a difference raises.
- `n = G` samples per prompt at the run's temperature and top-p, EOS as the stop ids, the image
  and video placeholder ids never sampled (allowed_token_ids), one engine seed per rank: vLLM's
  samples depend on batching and its generator's state, so a resumed run samples anew (not the
  byte-identical resume of our engine, whose samples are a function of (seed, prompt, sample, step)).
- `logprobs` = vLLM's "processed_logprobs": the log-prob under the distribution the token was
  drawn from (temperature, banned ids and the top-p nucleus applied): pi_rollout, for the
  importance weights and mismatch/* (its "raw_logprobs" are log-softmax of the untempered logits;
  neither is the full softmax at T, the training forward's form, so pi_old is recomputed:
  grpo.old_logprobs: rollout is refused with this engine).
- weights: `reload_weights` of the in-process model runner (it maps the Hugging Face names to
  vLLM's fused layout and repacks as after loading); the prefix cache is dropped after a sync,
  and every request's images carry a new id, so no encoder output of older weights is reused.
"""
from __future__ import annotations

import os
from itertools import groupby
from pathlib import Path

import torch

from .rollout import Rollout


def vllm_module():
    """The vllm package, or one line saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise ImportError('rollout.engine: vllm needs vLLM: pip install -e ".[vllm]" (on a CPU machine: '
                          "make setup-vllm, which builds .venv-vllm)") from None
    return vllm


def check_model_dir(path) -> None:
    """vLLM loads a Hugging Face model folder (config.json and safetensors); a GGUF file or a
    package: model is not one."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"rollout.engine: vllm loads a Hugging Face model folder, and {path} is not one (a GGUF "
                         "file or a package: model): save it as a folder first (load and save_pretrained)")


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (under FSDP2 a DTensor: gathered, a collective)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@torch.no_grad()
def policy_weights(model):
    """(name, tensor) for every parameter of `model` as its checkpoint names it, one at a time
    (under FSDP2 gathered one parameter at a time, so memory stays one parameter above the
    shards); under LoRA each adapted projection's weight merged, W + scaling * B @ A, and the
    adapters themselves left out. Every rank must iterate it whole (the gathers are collectives)."""
    lora = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        t = _full(p).detach()
        owner, sep, leaf = name.rpartition(".base_layer.")
        if sep:
            name = f"{owner}.{leaf}"
            if leaf == "weight":
                m = lora[owner]
                for a in m.active_adapters:
                    B, A = _full(m.lora_B[a].weight), _full(m.lora_A[a].weight)           # [out, r], [r, in]
                    t = t + m.scaling[a] * (B.to(t.dtype) @ A.to(t.dtype))
        yield name, t


def vllm_prompt_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id) -> list[list[int]]:
    """Each left-padded prompt's ids without padding, every run of image placeholders collapsed
    to one (vLLM expands it from the image)."""
    out = []
    for row, m in zip(input_ids.tolist(), attention_mask.tolist()):
        ids = [t for t, keep in zip(row, m) if keep]
        if image_token_id is not None:
            ids = [t for t, run in groupby(ids) for _ in (range(1) if t == image_token_id else run)]
        out.append(ids)
    return out


class VLLMEngine:
    """A vLLM engine in this process (see the module docstring)."""

    def __init__(self, cfg, model_dir, seed: int, banned_ids: list[int], eos_token_id, image_token_id,
                 launched: bool = False):
        """launched: this process is one rank of several (torchrun): vLLM joins that world (its
        external launcher) instead of making its own."""
        check_model_dir(model_dir)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # the engine in this process: weights synced in place
        vllm = vllm_module()
        r, v = cfg.rollout, cfg.rollout.vllm
        cuda = cfg.train.device.startswith("cuda")
        kw = dict(model=str(model_dir), dtype=cfg.model.dtype, seed=seed, logprobs_mode="processed_logprobs",
                  trust_remote_code=cfg.model.trust_remote_code, max_num_seqs=v.max_num_seqs,
                  enforce_eager=v.enforce_eager or not cuda, tensor_parallel_size=v.tensor_parallel_size,
                  limit_mm_per_prompt={"image": v.max_images_per_prompt})
        if cfg.data.max_prompt_length:
            kw["max_model_len"] = cfg.data.max_prompt_length + r.max_new_tokens
        if cuda:
            kw.update(gpu_memory_utilization=v.gpu_memory_utilization, enable_sleep_mode=v.sleep)
        if launched:               # each rank its own engine; the torchrun world is vLLM's
            kw["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kw)
        self.sampling_params = vllm.SamplingParams
        self.sleeping = False
        self.sleep_mode = cuda and v.sleep
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.allowed = [t for t in range(vocab) if t not in set(banned_ids)] if banned_ids else None
        self.eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.image_token_id = image_token_id
        self.calls = 0

    def close(self) -> None:
        """Shut the engine down (it destroys the process group it shares, so: last)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sleep(self) -> None:
        """Free the weights and KV cache until the next sync (rollout.vllm.sleep, CUDA only)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    @torch.no_grad()
    def sync(self, model) -> None:
        """The policy's current weights into the engine (every rank calls it: FSDP2 gathers)."""
        self.wake()
        self._runner().reload_weights(weights_iterator=policy_weights(model))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, batch: dict, images: list[list], *, group_size: int, max_new_tokens: int, pad_token_id: int,
                 temperature: float, top_p: float) -> Rollout:
        """G completions per prompt of `batch` (left-padded, as for rollout.generate); images:
        each prompt's PIL images, in order. Raises when the prompt vLLM ran is not ours."""
        self.wake()
        ours = vllm_prompt_ids(batch["input_ids"], batch["attention_mask"], self.image_token_id)
        self.calls += 1
        prompts = []
        for b, (ids, ims) in enumerate(zip(ours, images)):
            p = {"prompt_token_ids": ids}
            if ims:               # a new id per request: never an encoder output of older weights
                p["multi_modal_data"] = {"image": ims if len(ims) > 1 else ims[0]}
                p["multi_modal_uuids"] = {"image": [f"{self.calls}-{b}-{k}" for k in range(len(ims))]}
            prompts.append(p)
        sp = self.sampling_params(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                  logprobs=0, stop_token_ids=self.eos, allowed_token_ids=self.allowed)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        expanded = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        for b, o in enumerate(outs):
            if list(o.prompt_token_ids) != expanded[b]:
                raise RuntimeError(f"vLLM ran another prompt than ours for prompt {b} ({len(o.prompt_token_ids)} "
                                   f"tokens, ours {len(expanded[b])}): its image processing differs from the "
                                   "training processor's")
        rows = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]          # B*G, grouped by prompt
        T = max(1, max(len(c.token_ids) for c in rows))
        ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(rows), T, dtype=torch.float32)
        for i, c in enumerate(rows):
            n = len(c.token_ids)
            ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            logp[i, :n] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
        lengths = torch.tensor([len(c.token_ids) for c in rows], dtype=torch.long)
        dev = batch["input_ids"].device
        return Rollout(ids.to(dev), lengths.to(dev), group_size, logprobs=logp.to(dev), full_logprobs=None)
