"""The policy pi_theta, its reference pi_ref, and the forward function every log-prob pass goes
through (the rollout's sampling excepted: it decodes with the gathered model, rl/rollout.py).

    load(cfg, path, device)   a model directory as this run loads its models (dtype, attention,
                              device, gradient checkpointing); the warm start and the
                              evaluations use it too
    Policy(cfg, init, ...)    pi_theta from `init` (or the checkpoint resumed), its trainable
                              parameters, and pi_ref: a frozen copy of `init` when beta > 0, or
                              under LoRA the same network with its adapters off (no second copy)
    policy.fwd(batch, ids, mask, G, temperature, ...)     log pi_theta [N, T] (and entropy)
    policy.ref_fwd(...)                                    log pi_ref  [N, T]

Both forwards are `distributed.Forward` modules, so that under torchrun FSDP2's root hooks wrap
our own forward code; `logprobs_all_params` adds a zero-weighted use of a trainable vision tower
on a micro-batch without images, so that every rank produces gradients for the same parameters.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from . import distributed as dist
from .checkpoint import CheckpointError
from .config import Config
from .lora import adapters_disabled, apply_lora, base_fingerprint, check_base, read_adapter
from .model import disable_dropout, load_model
from .optim import autocast
from .rl.decode import decode_path, lean_supported
from .rl.forward import completion_logprobs


def load(cfg: Config, path, device):
    """The model at `path` as this run loads its models (dtype, attention, device, checkpointing)."""
    m = cfg.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[m.dtype]
    model = load_model(path, dtype, m.attn_implementation or None, m.trust_remote_code, device)
    if m.gradient_checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model


def logprobs_all_params(model, batch, *args, **kw):
    """`forward.completion_logprobs`, and under FSDP a zero-weighted use of a trainable vision
    tower when this micro-batch has no image: every rank must produce gradients for the same
    parameters, or the gradient reduce-scatter of a rank with images waits forever for one
    without."""
    out = completion_logprobs(model, batch, *args, **kw)
    visual = getattr(getattr(model, "model", None), "visual", None)
    if dist.active() and batch.get("pixel_values") is None and visual is not None:
        params = [p for p in visual.parameters() if p.requires_grad]
        if params:
            zero = 0.0 * sum(p.sum() for p in params)
            out = (out[0] + zero, out[1]) if isinstance(out, tuple) else out + zero
    return out


def lora_logprobs(model, *args, reference: bool = False, **kw):
    """`logprobs_all_params` of the adapted policy, or with reference=True of the reference (the
    same network with its adapters off)."""
    with adapters_disabled(model) if reference else nullcontext():
        return logprobs_all_params(model, *args, **kw)


def check_adapter_base(ckpt, base=None, fingerprint: str | None = None) -> None:
    """lora.check_base as a CheckpointError (one line at start-up, exit 2)."""
    try:
        check_base(ckpt, base, fingerprint)
    except RuntimeError as e:
        raise CheckpointError(str(e)) from None


class Policy:
    """pi_theta and pi_ref of a GRPO run, and how every log-prob pass calls them."""

    def __init__(self, cfg: Config, init_path, device, resume_from=None):
        """pi_theta from the checkpoint `resume_from` (else init_path); under LoRA the adapters on
        init_path's network (the base the adapter was trained on is checked). pi_ref: init_path,
        frozen, only when beta > 0. Under torchrun both are sharded (FSDP2)."""
        c = cfg
        self.cfg, self.device = cfg, device
        self.lora = c.model.lora.rank > 0           # adapters train; the reference is the adapter-free network
        self.model = load(cfg, init_path if self.lora else resume_from or init_path, device)
        self.base_fingerprint = None
        if self.lora:
            apply_lora(self.model, c.model.lora, seed=c.train.seed)
            self.base_fingerprint = base_fingerprint(init_path)
            if resume_from is not None:
                check_adapter_base(resume_from, init_path, self.base_fingerprint)
                read_adapter(resume_from, self.model)
        disable_dropout(self.model)                 # after the adapters: their lora_dropout too
        if dist.is_main():
            print(f"[rollout] decode path: {decode_path(self.model)}")
            if c.rollout.top_p < 1:
                print(f"[rollout] warning: rollout.top_p={c.rollout.top_p} < 1 samples from the nucleus, but the "
                      "log-probs of the update use the full softmax, so the update is off-policy (mismatch/* in "
                      "metrics.jsonl; grpo.rollout_correction corrects it)")
        if c.model.freeze_vision_tower and not self.lora:
            visual = getattr(getattr(self.model, "model", None), "visual", None)
            if visual is None:
                raise ValueError("model.freeze_vision_tower is set but the model has no vision tower (model.visual)")
            visual.requires_grad_(False)
        self.has_ref = c.grpo.beta > 0
        self.ref = None
        if self.has_ref and not self.lora:
            self.ref = disable_dropout(load(cfg, init_path, device)).eval().requires_grad_(False)
        # our forward code runs inside these modules, so that FSDP2's root hooks wrap it
        self.fwd = dist.Forward(self.model, lora_logprobs if self.lora else logprobs_all_params)
        self.ref_fwd = dist.Forward(self.ref, completion_logprobs) if self.ref is not None else self.fwd
        if dist.active():                 # bf16 autocast: FSDP2 gathers bf16 copies of the fp32 shards
            dist.shard(self.fwd, mixed_precision=c.model.autocast == "bf16")
            if self.ref is not None:
                dist.shard(self.ref_fwd, mixed_precision=c.model.autocast == "bf16")
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]     # (after sharding: DTensors)
        self.lean = lean_supported(self.model)      # the prompt-once layer math applies (rl/decode.py)

    def amp(self):
        """bf16 autocast around model forwards when model.autocast is set (else a no-op)."""
        return autocast(self.device, self.cfg.model.autocast == "bf16")

    def ref_kwargs(self) -> dict:
        """What ref_fwd needs beyond fwd's arguments: under LoRA, reference=True (adapters off)."""
        return {"reference": True} if self.lora else {}
