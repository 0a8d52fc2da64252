"""One dataclass tree for a run, loaded from YAML, with `--set a.b=c` overrides.

Defaults follow METHOD.md (the paper's recipe); every deviation is a named option. Unknown keys,
in a file or an override, are rejected with the key named, so a typo never silently falls back
to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TinyModelConfig:
    """Shape of the tiny Qwen2-VL built from scratch when model.path is empty."""
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_num_heads: int = 4
    vocab_size: int = 2048
    max_pixels: int = 112 * 56
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    path: str = ""                      # local HF model directory; empty = build the tiny default
    tiny_dir: str = "data/tiny_model"   # where the tiny default is built
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"              # weights: float32 | bfloat16
    autocast: str = ""                  # "" | bf16: fp32 weights, bf16 matmuls (log-probs stay fp32)
    attn_implementation: str = ""       # "" = transformers' default (sdpa); flash_attention_2 on GPU
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class SynthDataConfig:
    seed: int = 0
    n_train: int = 3000
    n_test: int = 400
    image_style: str = "badge"          # badge | word (see synth.py)


@dataclass
class DataConfig:
    train: str = ""                     # parquet file/folder or JSONL; empty = SafeTag-Synth
    test: str = ""
    train_split: str = "train"
    test_split: str = "test"
    synth_dir: str = "data/synth"
    synth: SynthDataConfig = field(default_factory=SynthDataConfig)
    prompt_style: str = "safegrpo"
    max_prompt_length: int = 2048
    filter_overlong_prompts: bool = False
    balance_combined: bool = False      # GRPO draws half its prompts from combine_tag=safe, half from unsafe
    balance_groups: bool = False        # as balance_combined, and each half split evenly over its SafeTag groups
                                        # (visual, text, combined): rare groups (compositional) come up more
    skip_invalid: bool = False
    image_root: str = ""


@dataclass
class RolloutConfig:
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    prompts_per_call: int = 0           # prompts decoded together (0: all of a rank's prompts at once).
                                        # 1 makes each prompt's samples independent of the batch to
                                        # the last bit (batched matmuls round differently), e.g. to
                                        # compare runs across world sizes exactly; slower


@dataclass
class GRPOConfig:
    beta: float = 0.01                  # KL coefficient (loss term); 0 skips the reference model
    kl_estimator: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    adv_scale: str = "group"
    adv_eps: float = 1e-6
    loss_agg: str = "token-mean"
    norm_constant: float = 0.0          # for seq-mean-token-sum-norm; 0 = max_new_tokens
    refusal_judge: str = "keywords"     # refusal rule of the behaviour reward: keywords (paper) | strict
    entropy_coef: float = 0.0           # entropy bonus per token (the paper: 0)
    freeze_vision_tower: bool = False   # keep the vision encoder fixed during GRPO (a common VLM-RL option)
    ptx_coef: float = 0.0               # > 0: add this x cross-entropy on warm-start demonstrations with their
                                        # tag values masked (format anchor, as InstructGPT's PPO-ptx; paper: 0)
    ptx_batch: int = 16                 # demonstrations per optimizer update for ptx_coef


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0               # GRPO steps of linear warm-up (the schedule itself advances once per
                                        # optimizer update, so warm-up and decay span the run whatever
                                        # prompts_per_step / mini_batch_prompts is)
    schedule: str = "constant"          # constant | cosine (to 0 at train.steps)


@dataclass
class SFTConfig:
    enabled: bool = False               # warm-start on SafeTag-Synth demonstrations first
    caption_steps: int = 0              # before that: caption pretraining (image -> "The image shows a X.")
    caption_lr: float = 1e-3
    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    steps: int = 100                    # GRPO steps (one rollout each)
    prompts_per_step: int = 256
    mini_batch_prompts: int = 64        # prompts per optimizer update; updates/step = prompts_per_step / this
    micro_batch_prompts: int = 8        # prompts per forward/backward (whole groups)
    micro_batch_tokens: int = 0         # > 0: instead, as many whole groups per forward/backward as fit in
                                        # this many tokens (prompt once + its G completions)
    save_every: int = 50                # 0: only the final checkpoint
    eval_every: int = 0                 # validate every N GRPO steps (greedy on the test split, val/... keys in
                                        # metrics.jsonl and points on reward_curves.png); 0 = not during training
    eval_limit: int = 0                 # test records for validation and the before/after evaluations; 0 = all
    device: str = "cpu"
    threads: int = 0                    # torch threads on CPU; 0 = leave as is


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where + '.' if where else ''}{key} "
                             f"(known: {', '.join(sorted(fields))})")
        f = fields[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value or {}, f"{where}.{key}" if where else key)
        else:
            default = f.default
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, (int, str)):
                try:
                    value = float(value)  # YAML reads 1e-4 (no dot) as a string
                except ValueError:
                    raise ValueError(f"config key {where}.{key} must be a number, got {value!r}") from None
            kwargs[key] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, raw: str):
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or defaults) with `key.sub=value` overrides (values parsed as YAML)."""
    tree = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{p}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        _set(tree, k.strip(), v)
    try:
        return _build(Config, tree, "")
    except ValueError as e:
        raise ValueError(f"{path or '<defaults>'}: {e}") from None


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
