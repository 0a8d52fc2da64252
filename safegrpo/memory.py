"""The memory plan: bytes per rank a resolved config needs, estimated before any weight is loaded.

With W ranks (FSDP2 shards every parameter), N parameters (N_t trainable: with LoRA the
adapters', `lora_params`; N_l in the decoder
layers), b the bytes of model.dtype, L layers, H hidden, I MLP width, V vocabulary:

    weights      N b / W              the policy's (master) parameters
    optimizer    2 N_t b / W          AdamW's two moments, in the parameters' dtype
    reference    N b / W              when beta > 0 (none with LoRA: the reference is the policy
                                      with its adapters off)
    gradients    N_t b / W            during the update (freed after each step's last update)
    gathered     N b_g                during the rollout and the no-gradient passes, under torchrun:
                                      a full copy (b_g = 2 under bf16 mixed precision); on one
                                      process, under bf16 autocast, the decoder's bf16 copy N_l 2
    KV cache     K (L kvh d (b_k + b_v))   K = rollout.max_batch_tokens, or every prompt and row at once
    activations  per forward/backward pass of S tokens (train.micro_batch_tokens, else
                 micro_batch_prompts x (c x max prompt + G x max new), c the prompt's copies a
                 pass runs: 1, or G for the Hugging Face layers under their own checkpointing,
                 see `prompt_copies`), b_a = 2 under bf16, else 4:
                 checkpointed: L S H b_a (layer inputs) + S (6H + 3I) b_a (one layer recomputed);
                 otherwise: L S (6H + 3I) b_a
    log-probs    C V 4 x 2 (a chunk of logits and its exponentials) + V H 4 when the LM head is
                 not fp32 (its fp32 copy)

The rollout phase holds weights, optimizer, reference, gathered and KV; the update phase holds
weights, optimizer, reference, gradients, activations and log-probs. These are estimates (the
allocator's fragmentation, the vision tower's activations and temporary buffers are not
counted; `plan.check` keeps 10% of the device free for them). The trainer prints the plan at
start-up and stops, naming the key to change, when a phase does not fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import distributed as dist
from .config import Config
from .model import model_class
from .model_files import resolve_model_path
from .rl.decode import lean_supported

GB = 1024 ** 3
HEADROOM = 0.9                            # of the device, for what the estimate leaves out


class MemoryPlanError(RuntimeError):
    """The resolved config does not fit the device's memory; the message names the key to change."""


@dataclass
class ModelSize:
    params: int                           # N
    trainable: int                        # N_t
    layer_params: int                     # N_l, the decoder layers
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_heads: int
    head_dim: int
    heads: int = 0
    lean: bool = True                     # the lean decoder's layer math applies (rl/decode.lean_supported)


def model_size(model_config, freeze_vision: bool = False) -> ModelSize:
    """Parameter counts of the model a Hugging Face config describes, from a meta-device build
    (no memory, no weights), and the text stack's shape."""
    with torch.device("meta"):
        model = model_class(model_config).from_config(model_config)
    n = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n_, p in model.named_parameters() if "visual" in n_)
    layers = sum(p.numel() for n_, p in model.named_parameters() if ".layers." in n_ and "visual" not in n_)
    t = model_config.get_text_config()
    heads = t.num_attention_heads
    return ModelSize(n, n - vision if freeze_vision else n, layers, t.num_hidden_layers, t.hidden_size,
                     t.intermediate_size, t.vocab_size, getattr(t, "num_key_value_heads", heads),
                     getattr(t, "head_dim", None) or t.hidden_size // heads, heads, lean_supported(model))


def lora_params(size: ModelSize, rank: int, targets) -> int:
    """Adapter parameters of rank r on the named projections of every decoder layer: r (in + out)
    each (projections other than the seven of a Qwen/Llama block are not counted)."""
    H, I, q, kv = size.hidden, size.intermediate, size.heads * size.head_dim, size.kv_heads * size.head_dim
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
              "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    return size.layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)


@dataclass
class MemoryPlan:
    items: dict = field(default_factory=dict)       # name -> bytes per rank
    rollout: int = 0
    update: int = 0
    device: int = 0
    kv_tokens: int = 0
    pass_tokens: int = 0

    def table(self) -> str:
        rows = [f"  {k:<12} {_size(v)}" for k, v in self.items.items()]
        return "\n".join(["memory plan per rank (estimated):", *rows,
                          f"  {'rollout':<12} {_size(self.rollout)}   (weights, optimizer, reference, gathered, KV)",
                          f"  {'update':<12} {_size(self.update)}   (weights, optimizer, reference, gradients, "
                          "activations, log-probs)",
                          f"  {'device':<12} {_size(self.device)}   ({int(HEADROOM * 100)}% usable)"])

    def check(self) -> None:
        """Raise MemoryPlanError naming what to change when a phase does not fit."""
        limit = HEADROOM * self.device
        if self.rollout > limit:
            raise MemoryPlanError(
                f"the rollout needs ~{self.rollout / GB:.1f} GB per rank of {limit / GB:.1f} GB usable: lower "
                f"rollout.max_batch_tokens (the KV cache takes {self.items['KV cache'] / GB:.1f} GB for "
                f"{self.kv_tokens:,} tokens), or use more ranks\n{self.table()}")
        if self.update > limit:
            raise MemoryPlanError(
                f"the update needs ~{self.update / GB:.1f} GB per rank of {limit / GB:.1f} GB usable: lower "
                f"train.micro_batch_tokens (or train.micro_batch_prompts; now {self.pass_tokens:,} tokens per pass), "
                f"set model.gradient_checkpointing, or use more ranks\n{self.table()}")


def _size(n: int) -> str:
    return f"{n / GB:8.2f} GB" if n >= GB / 10 else f"{n / 2 ** 20:8.2f} MB"


def prompt_copies(checkpointing: bool, hf_layers: bool, group_size: int) -> int:
    """How many times a forward/backward pass of the update runs each prompt (rl/forward.py): once
    (the lean layer math, every layer checkpointed under gradient checkpointing, the prompt pass
    too; or the Hugging Face forward over a repeated cache without checkpointing), or G times
    (the Hugging Face layers under their own checkpointing, which drops the cache: models the
    lean math does not cover, and FSDP2-sharded ones, `hf_layers`). Passes are planned, and
    train.micro_batch_tokens counted, in the tokens the pass really runs."""
    return group_size if checkpointing and hf_layers else 1


def plan_memory(cfg: Config, size: ModelSize, world_size: int, device_bytes: int) -> MemoryPlan:
    """The plan of the module docstring for `cfg` on `world_size` ranks of `device_bytes` each."""
    W, m, r, t = world_size, cfg.model, cfg.rollout, cfg.train
    b = 4 if m.dtype == "float32" else 2
    bf16 = m.autocast == "bf16" or m.dtype == "bfloat16"
    b_act = 2 if bf16 else 4
    mixed = W > 1 and m.autocast == "bf16"              # FSDP2 gathers bf16 copies (distributed.shard)
    lora = m.lora.rank > 0
    N = size.params
    Nt = lora_params(size, m.lora.rank, m.lora.target_modules) if lora else size.trainable
    if lora:
        N += Nt                                          # the adapters join the weights
    items = {"weights": N * b // W, "optimizer": 2 * Nt * b // W,
             "reference": (N - Nt if lora else N) * b // W if cfg.grpo.beta > 0 and not lora else 0, "gradients": Nt * b // W}
    if W > 1:
        items["gathered"] = N * (2 if mixed else b)
    else:
        items["gathered"] = size.layer_params * 2 if m.autocast == "bf16" and b == 4 else 0
    b_k = 2 if (mixed or b == 2) else 4                  # RoPE'd keys keep the hidden states' dtype
    b_v = 2 if bf16 else 4
    per_rank_prompts = t.prompts_per_step // W
    kv_tokens = r.max_batch_tokens or per_rank_prompts * (cfg.data.max_prompt_length + r.group_size * r.max_new_tokens)
    items["KV cache"] = kv_tokens * size.layers * size.kv_heads * size.head_dim * (b_k + b_v)
    copies = prompt_copies(m.gradient_checkpointing, W > 1 or not size.lean, r.group_size)
    pass_tokens = t.micro_batch_tokens or t.micro_batch_prompts * (copies * cfg.data.max_prompt_length
                                                                   + r.group_size * r.max_new_tokens)
    layer_work = pass_tokens * (6 * size.hidden + 3 * size.intermediate) * b_act
    items["activations"] = (size.layers * pass_tokens * size.hidden * b_act + layer_work
                            if m.gradient_checkpointing else size.layers * layer_work)
    chunk = max(16, (2 ** 28 if t.device.startswith("cuda") else 2 ** 25) // size.vocab)
    items["log-probs"] = chunk * size.vocab * 4 * 2 + (size.vocab * size.hidden * 4 if b != 4 or mixed else 0)
    base = items["weights"] + items["optimizer"] + items["reference"]
    rollout = base + items["gathered"] + items["KV cache"]
    update = base + items["gradients"] + items["activations"] + items["log-probs"]
    return MemoryPlan(items, rollout, update, device_bytes, kv_tokens, pass_tokens)


def device_memory(device: torch.device) -> int:
    """Bytes of memory of `device` (a GPU's total memory, or the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def print_memory_plan(cfg: Config, path, device) -> MemoryPlan | None:
    """The memory plan of this config and the model at `path`, printed by rank 0; raises
    MemoryPlanError when a phase would not fit (train.check_memory). None for an architecture
    the meta-device count cannot build."""
    from transformers import AutoConfig
    dir_, gguf = resolve_model_path(path)
    try:
        model_config = AutoConfig.from_pretrained(dir_, gguf_file=gguf, trust_remote_code=cfg.model.trust_remote_code)
        size = model_size(model_config, cfg.model.freeze_vision_tower)
    except Exception as e:           # an architecture the meta-device count cannot build: no plan
        if dist.is_main():
            print(f"[memory] no plan ({type(e).__name__}: {e})")
        return None
    plan = plan_memory(cfg, size, dist.world_size(), device_memory(device))
    if dist.is_main():
        print(f"[memory] {plan.table()}")
    if cfg.train.check_memory:
        plan.check()
    return plan
