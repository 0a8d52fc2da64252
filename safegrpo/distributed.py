"""Multi-process training on PyTorch's own engine: `torchrun` + FSDP2 (`fully_shard`).

    torchrun --nproc_per_node N train.py --config ...      (gloo on CPU, NCCL on GPUs)

What this module assumes and provides:
  * torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); with
    WORLD_SIZE 1 or unset everything here is a no-op and training is single-process.
  * `shard(model)`: each decoder layer is its own FSDP2 unit; everything else (embeddings, the
    vision tower, final norm, LM head) belongs to the root unit, so a rank whose batch has no
    image still takes part in every collective (the vision tower is gathered with the root).
  * `Forward(model, fn)`: an nn.Module whose forward calls `fn(model, ...)`. The root FSDP unit is
    put on this wrapper, so its pre-forward hook gathers the root parameters before our own
    forward code (which calls the base model and reads the LM head weight directly) and its
    post-backward hook reduce-scatters their gradients.
  * Each rank takes whole groups (prompts), so group statistics never cross ranks; the token-mean
    loss is normalised by the global token count (all-reduced) and scaled by the world size,
    since FSDP averages gradients over ranks.
  * `full_state_dict` / `full_optimizer_state_dict` gather everything to rank 0 (CPU) so that a
    checkpoint is a normal Hugging Face directory written by rank 0.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """Whether this process trains beside others (a process group of more than one: vLLM, as a
    rollout engine in one process, makes a group of its own, which is not parallel training)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str, timeout_s: int = 7200) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1; returns this rank's device. timeout_s:
    how long a collective may wait (train.collective_timeout_s): rank 0 alone runs the warm start
    and the before/after evaluations while the other ranks wait at a barrier, which NCCL's
    default of 10 minutes would end."""
    import datetime
    dev = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return dev
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
        return torch.device("cuda", local)
    dist.init_process_group("gloo", timeout=timeout)
    return dev


def shutdown(close=None) -> None:
    """Leave the process group cleanly: wait for every rank (rank 0 may still be evaluating), call
    `close` (the vLLM engine's shutdown, which destroys the group it shares), then destroy the
    group. A rank that exits with the group alive can abort in gloo's threads at teardown
    ("terminate called without an active exception")."""
    if active():
        dist.barrier()
    if close is not None:
        close()
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """x reduced over ranks with `op`, as a new tensor on x's device (NCCL reduces on the GPU)."""
    if not active():
        return x
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    y = x.detach().clone().to(dev)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (a new tensor; x itself is unchanged)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of x over ranks (a new tensor)."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def global_std(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected standard deviation of the values of x on all ranks together (float64
    sums of count, x and x^2), as if they were one tensor."""
    x = x.detach().double().reshape(-1)
    n, s, ss = all_reduce_sum(torch.stack([x.new_tensor(float(x.numel())), x.sum(), x.square().sum()])).tolist()
    return torch.tensor(max(0.0, (ss - s * s / n) / max(1.0, n - 1)) ** 0.5, dtype=torch.float32)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable Python objects)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def decoder_layers(model) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face causal or vision-language model."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and "visual" not in name:
            return mod
    raise ValueError(f"no decoder layer list found in {type(model).__name__}")


class Forward(nn.Module):
    """Calls fn(model, *args, **kw) as a module, so FSDP's root hooks wrap our own forward code."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kw):
        return self.fn(self.model, *args, **kw)


def shard(wrapper: Forward, reshard_after_forward: bool = True, mixed_precision: bool = False) -> Forward:
    """FSDP2: one unit per decoder layer, the rest of the model in the root unit on `wrapper`.
    mixed_precision: parameters gathered as bf16 copies of the (fp32) shards, gradients reduced
    in fp32: the rollout, the no-gradient passes and the update compute in bf16, the optimizer
    keeps fp32 master weights, and a gathered copy costs half the memory."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
        if mixed_precision else {}
    for layer in decoder_layers(wrapper.model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(wrapper, reshard_after_forward=reshard_after_forward, **kw)
    return wrapper


def fsdp_units(module: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


class gathered:
    """Context: every parameter of a sharded module is gathered (for KV-cache decoding, where
    the same layers run once per new token), and sharded again on exit."""

    def __init__(self, module: nn.Module):
        self.units = fsdp_units(module) if active() else []

    def __enter__(self):
        if self.units:  # FSDP2 initialises lazily from the root's first forward; decoding calls the
            self.units[0]._get_fsdp_state()._lazy_init()   # layers directly, so initialise from the root now
        for u in self.units:
            u.unshard()
            u.set_reshard_after_forward(False, recurse=False)
        return self

    def __exit__(self, *exc):
        for u in self.units:
            u.set_reshard_after_forward(True, recurse=False)
            u.reshard()
        return False


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded model state on CPU (complete on rank 0, empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
