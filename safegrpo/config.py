"""One dataclass tree for a run, loaded from YAML, with `--set a.b=c` overrides, checked at load.

Defaults follow docs/METHOD.md (the paper's recipe); every deviation is a named option. Each
field is declared once below with its type, its allowed values and a one-line description.
`load_config` checks, before anything runs:
  * keys: an unknown key, in a file or an override, is an error naming it;
  * types: every value against its declared type (bool, int, float, str, Literal choices,
    tuples, lists), so `trust_remote_code: "false"` is an error, not a truthy string. A float
    may be written as a YAML string such as `1e-4` (YAML 1.1 reads exponents without a dot
    as strings); nothing else is converted;
  * ranges: every field's own rule (`check=` below);
  * cross-field rules (`validate`): batch sizes that divide, exclusive options, and so on.
Errors name the file, the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


# ------------------------------------------------------------------------------ field rules
def ge(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def gt(lo):
    return lambda v: None if v > lo else f"must be > {lo}"


def within(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check


def each(rule):
    return lambda vs: next((f"item {i} {m}" for i, v in enumerate(vs) if (m := rule(v))), None)


def opt(default, check=None):
    """A config field: its default and, optionally, a rule returning an error text or None."""
    kind = "default_factory" if isinstance(default, list) else "default"
    value = (lambda d=default: list(d)) if kind == "default_factory" else default
    return field(metadata={"check": check}, **{kind: value})


def section(cls):
    return field(default_factory=cls)


# ---------------------------------------------------------------------------------- sections
@dataclass
class TinyModelConfig:
    """Shape of the tiny Qwen2-VL built from scratch when model.path is empty."""
    hidden_size: int = opt(128, ge(8))
    intermediate_size: int = opt(384, ge(8))
    num_hidden_layers: int = opt(4, ge(1))
    num_attention_heads: int = opt(4, ge(1))
    num_key_value_heads: int = opt(2, ge(1))
    vision_depth: int = opt(2, ge(1))
    vision_embed_dim: int = opt(64, ge(8))
    vision_num_heads: int = opt(4, ge(1))
    vocab_size: int = opt(2048, ge(600))        # BPE vocabulary trained on the SafeTag-Synth corpus
    max_pixels: int = opt(112 * 56, ge(28 * 28))
    tie_word_embeddings: bool = opt(False)


@dataclass
class LoraConfig:
    """LoRA adapters on the text stack (peft, `pip install -e ".[lora]"`); rank 0 = off."""
    rank: int = opt(0, ge(0))                   # r; > 0 trains adapters only, the reference is the adapter-free model
    alpha: float = opt(16.0, gt(0.0))           # scaling alpha / r
    dropout: float = opt(0.0, within(0.0, 1.0, hi_open=True))
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    lambda v: None if v else "must name at least one module")


@dataclass
class ModelConfig:
    path: str = opt("")                         # local HF model directory, a .gguf file or package:NAME;
                                                # empty = build the tiny default into tiny_dir
    tiny_dir: str = opt("data/tiny_model")      # where the tiny default is built
    tiny: TinyModelConfig = section(TinyModelConfig)
    dtype: Literal["float32", "bfloat16"] = opt("float32")      # weights (and optimizer state) dtype
    autocast: Literal["", "bf16"] = opt("")     # bf16: fp32 weights, bf16 matmuls (log-probs stay fp32)
    attn_implementation: str = opt("")          # "" = flash_attention_2 on a GPU when importable, else sdpa
    trust_remote_code: bool = opt(False)        # run Python files shipped in the model folder (off: never)
    gradient_checkpointing: bool = opt(False)   # recompute activations in the update's backward
    lora: LoraConfig = section(LoraConfig)


@dataclass
class SynthConfig:
    """SafeTag-Synth, the embedded default data set (synth.py)."""
    seed: int = opt(0)
    n_train: int = opt(3000, ge(1))
    n_test: int = opt(400, ge(0))
    holdout_frac: float = opt(0.2, within(0.0, 1.0, hi_open=True))   # pairings of each group kept for test
    image_style: Literal["badge", "word"] = opt("badge")             # drawn badges or typographic words


@dataclass
class DataConfig:
    train: str = opt("")                        # parquet file/folder or JSONL; empty = SafeTag-Synth
    test: str = opt("")                         # the same; empty (with train set) = no test split
    train_split: str = opt("train")             # <split>-*.parquet picked inside a folder
    test_split: str = opt("test")
    synth_dir: str = opt("data/synth")          # where SafeTag-Synth is generated
    synth: SynthConfig = section(SynthConfig)
    prompt_style: str = opt("safegrpo")         # safegrpo | compact | none | path of a text file (prompting.py)
    max_prompt_length: int = opt(2048, ge(1))   # tokens (images expanded); longer prompts: error at load ...
    filter_overlong_prompts: bool = opt(False)  # ... or dropped at load, and reported
    balance_combined: bool = opt(False)         # GRPO draws safe_share of its prompts combine_tag=safe, the rest unsafe
    balance_groups: bool = opt(False)           # as balance_combined, each part split evenly over its SafeTag
                                                # groups (visual/text/combined): rare groups come up more
    safe_share: float = opt(0.5, within(0.0, 1.0, lo_open=True, hi_open=True))   # with balance_*: the
                                                # combined-safe share of each step (0.2 with balance_groups:
                                                # every one of the five groups the same share)
    skip_invalid: bool = opt(False)             # skip (and report) bad rows instead of stopping
    image_root: str = opt("")                   # folder image paths are relative to (default: the data file's)
    allow_outside_images: bool = opt(False)     # image paths may point outside that folder (absolute, ../)
    contrast_column: str = opt("")              # a column naming contrast sets (SafeTag-Synth: `contrast`, the
                                                # instruction of compositional and decoy rows): a drawn row with a
                                                # set is followed in its step by a row of the same set with the
                                                # other combined tag (its twin), so a rule that ignores what
                                                # tells them apart earns nothing net (samplers.ContrastSampler)


@dataclass
class RolloutConfig:
    group_size: int = opt(8, ge(2))             # G: samples per prompt (advantages are relative within it)
    temperature: float = opt(1.0, gt(0.0))      # sampling temperature; log-probs are taken at the same one
    top_p: float = opt(1.0, within(0.0, 1.0, lo_open=True))   # nucleus; < 1 makes the update off-policy
    max_new_tokens: int = opt(4096, ge(1))      # completion length limit
    max_batch_tokens: int = opt(0, ge(0))       # KV-cache budget per rank, in tokens: resident prompts x the longest
                                                # prompt + decoding rows x max_new_tokens (rl/rollout.kv_plan);
                                                # rows join as others finish. 0 = every prompt and row at once


@dataclass
class GRPOConfig:
    beta: float = opt(0.01, ge(0.0))            # KL coefficient (loss term); 0 skips the reference model
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3")        # k3 = "low_var_kl" (docs/METHOD.md eq. 7)
    clip_low: float = opt(0.2, within(0.0, 1.0, hi_open=True))  # eps_low: ratio clipped below at 1 - clip_low
    clip_high: float = opt(0.2, ge(0.0))        # eps_high: ratio clipped above at 1 + clip_high
    dual_clip: float = opt(3.0, lambda v: None if v == 0 or v > 1 else "must be 0 (off) or > 1")
    adv_scale: Literal["group", "batch", "none"] = opt("group")  # divide advantages by group std, batch std, or not
    adv_eps: float = opt(1e-6, gt(0.0))
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = opt("token-mean")
    norm_constant: float = opt(0.0, ge(0.0))    # for seq-mean-token-sum-norm; 0 = max_new_tokens
    refusal_judge: Literal["keywords", "strict"] = opt("keywords")   # refusal rule of the behaviour reward
    tag_weight: float = opt(0.5, ge(0.0))       # w_tag in R = F (w_tag R_tag + w_behavior R_behavior) (eq. 1);
    behavior_weight: float = opt(0.5, ge(0.0))  # the paper's 0.5 / 0.5; its ablation sets one of them to 0
    entropy_coef: float = opt(0.0, ge(0.0))     # entropy bonus per token (the paper: 0)
    freeze_vision_tower: bool = opt(False)      # keep the vision encoder fixed during GRPO
    ptx_coef: float = opt(0.0, ge(0.0))         # > 0: add this x cross-entropy on warm-start demonstrations with
                                                # their tag values masked (format anchor, as PPO-ptx; paper: 0)
    ptx_batch: int = opt(16, ge(1))             # demonstrations per optimizer update for ptx_coef
    importance_level: Literal["token", "sequence"] = opt("token")   # token: GRPO's per-token ratio (eqs. 5-6);
                                                # sequence: GSPO's sequence ratio (eq. 12) with seq_clip_*
    seq_clip_low: float = opt(3e-4, within(0.0, 1.0, hi_open=True))   # GSPO's clip range (the paper's values)
    seq_clip_high: float = opt(4e-4, ge(0.0))
    filter_zero_std: bool = opt(False)          # DAPO dynamic sampling: groups whose rewards have no spread (no
                                                # advantage) leave the update
    oversample: float = opt(0.0, ge(0.0))       # with filter_zero_std: draw more prompts (up to (1 + this) x
                                                # prompts_per_step in all) until prompts_per_step groups are informative
    max_empty_steps: int = opt(10, ge(0))       # with filter_zero_std: stop after this many steps in a row in which
                                                # no group anywhere had reward spread (nothing learned); 0 = never
    reward: str = opt("")                       # "" = the SafeGRPO rule; package.module:function with verl's
                                                # custom-reward signature (rl/reward_fn.py)
    reward_timeout_s: float = opt(0.0, ge(0.0))  # > 0: a plug-in call running longer is stopped and scores 0
    reward_workers: int = opt(4, ge(1))         # with reward_timeout_s: worker processes the plug-in's calls run on at once


@dataclass
class OptimConfig:
    lr: float = opt(1e-6, gt(0.0))
    weight_decay: float = opt(0.01, ge(0.0))
    betas: tuple[float, float] = opt((0.9, 0.999), each(within(0.0, 1.0, hi_open=True)))
    eps: float = opt(1e-8, gt(0.0))
    grad_clip: float = opt(1.0, gt(0.0))        # clip the global gradient norm to this
    warmup_steps: int = opt(0, ge(0))           # GRPO steps of linear warm-up (the schedule advances once per
                                                # optimizer update, so it spans the run whatever
                                                # prompts_per_step / mini_batch_prompts is)
    schedule: Literal["constant", "cosine"] = opt("constant")   # cosine: to 0 at train.steps


@dataclass
class SFTConfig:
    enabled: bool = opt(False)                  # warm-start on the training records' demonstrations first
    caption_steps: int = opt(0, ge(0))          # before that: caption pretraining (image -> "The image shows a X.")
    caption_lr: float = opt(1e-3, gt(0.0))
    steps: int = opt(0, ge(0))                  # demonstration steps (the format)
    tags: Literal["random", "per_modality", "partial", "per_modality_coin", "gold"] = opt("random")   # the demonstrations'
                                                # tags: random (an even coin: the format, no safety), per_modality
                                                # (right visual and text tags, combined = unsafe if either is:
                                                # misses compositional risks), partial (per_modality, but a
                                                # compositional demonstration carries the gold combined tag with
                                                # probability partial_share: partly aware of them, like the paper's
                                                # starting models), per_modality_coin (a coin for combined where
                                                # both sides are safe), gold (supervised)
    partial_share: float = opt(0.5, within(0.0, 1.0))   # tags=partial: P(gold combined tag) on a compositional demo
    step3: Literal["restate", "topic"] = opt("restate")  # SafeTag-Synth demonstrations' step 3: the request
                                                # restated, or restated with what it is about in the words the
                                                # captions use for kinds ("...; it is about a high place"), so step 4
                                                # compares two written facts (synth.request_topic)
    batch_size: int = opt(32, ge(1))
    lr: float = opt(1e-3, gt(0.0))
    warmup_steps: int = opt(20, ge(0))


@dataclass
class TrainConfig:
    out_dir: str = opt("runs/default")          # the run directory (one run per directory)
    seed: int = opt(0)
    steps: int = opt(100, ge(1))                # GRPO steps (one rollout each)
    prompts_per_step: int = opt(256, ge(1))     # prompts per rollout (x group_size completions)
    mini_batch_prompts: int = opt(64, ge(1))    # prompts per optimizer update; updates/step = prompts_per_step / this
    micro_batch_prompts: int = opt(8, ge(1))    # prompts per forward/backward (whole groups), per rank
    micro_batch_tokens: int = opt(0, ge(0))     # > 0: instead, as many whole groups per forward/backward as fit in
                                                # this many tokens (prompt once + its G completions)
    save_every: int = opt(50, ge(0))            # GRPO steps between checkpoints; 0: only the final one
    eval_every: int = opt(0, ge(0))             # validate every N GRPO steps (greedy on the test split, val/... keys
                                                # in metrics.jsonl, points on reward_curves.png); 0 = not during training
    eval_limit: int = opt(0, ge(0))             # test records for validation and the before/after evaluations; 0 = all
    collective_timeout_s: int = opt(7200, ge(60))   # under torchrun: the longest a rank waits in a collective
                                                # (the others wait while rank 0 runs the warm start and evaluations)
    device: str = opt("cpu", lambda v: None if re.fullmatch(r"cpu|cuda(:\d+)?", v) else "must be cpu, cuda or cuda:N")
    threads: int = opt(0, ge(0))                # torch threads on CPU; 0 = leave as is
    check_memory: bool = opt(True)              # print the memory plan at start-up and stop when a phase does not
                                                # fit the device (memory.py; an estimate)
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = opt(["jsonl"])   # metrics.jsonl always; also
                                                # TensorBoard (pip install -e ".[tensorboard]"), W&B (".[wandb]",
                                                # WANDB_MODE=offline works without a network)
    wandb_project: str = opt("safegrpo")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    optim: OptimConfig = section(OptimConfig)
    sft: SFTConfig = section(SFTConfig)
    train: TrainConfig = section(TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- cross-field rules
def validate(cfg: Config, world_size: int = 1) -> None:
    """Rules between fields (each field's own rule is checked while building). Raises ValueError."""
    t, d = cfg.train, cfg.data
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ValueError(f"train.prompts_per_step ({t.prompts_per_step}) must be a multiple of "
                         f"train.mini_batch_prompts ({t.mini_batch_prompts})")
    micro = 1 if t.micro_batch_tokens > 0 else t.micro_batch_prompts
    if t.mini_batch_prompts % (world_size * micro):
        raise ValueError(f"train.mini_batch_prompts ({t.mini_batch_prompts}) must be a multiple of world size x "
                         f"train.micro_batch_prompts ({world_size} x {micro})")
    if cfg.grpo.tag_weight + cfg.grpo.behavior_weight == 0:
        raise ValueError("grpo.tag_weight and grpo.behavior_weight are both 0: the reward would be 0 everywhere")
    if d.balance_combined and d.balance_groups:
        raise ValueError("set at most one of data.balance_combined and data.balance_groups")
    if d.safe_share != 0.5 and not (d.balance_combined or d.balance_groups):
        raise ValueError("data.safe_share applies to data.balance_combined or data.balance_groups: set one of them")
    if bool(d.test) and not d.train:
        raise ValueError("data.test is set but data.train is empty (SafeTag-Synth brings its own test split)")
    if t.micro_batch_tokens and t.micro_batch_tokens < 2:
        raise ValueError("train.micro_batch_tokens must be 0 (off) or a token budget")
    if cfg.grpo.oversample and not cfg.grpo.filter_zero_std:
        raise ValueError("grpo.oversample draws more prompts to replace groups grpo.filter_zero_std drops: set both")
    if len(set(t.loggers)) != len(t.loggers):
        raise ValueError(f"train.loggers lists a logger twice: {t.loggers}")
    if t.eval_every and t.eval_every > t.steps:
        raise ValueError(f"train.eval_every ({t.eval_every}) is larger than train.steps ({t.steps})")
    from .safety.prompting import instruction_text       # a named style or a readable, non-empty file
    try:
        instruction_text(d.prompt_style)
    except (ValueError, OSError) as e:
        raise ValueError(f"data.prompt_style: {e}") from None


# ------------------------------------------------------------------------------------- loading
def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, key: str):
    """value as the declared type `hint`, or ValueError naming key, value and type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ValueError(f"config key {key} must be {_type_name(hint) if origin is not tuple else 'a list of ' + str(len(args)) + ' numbers'}, "
                     f"got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise bad
        items = [_coerce(v, args[i] if origin is tuple else args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)       # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(out):       # .inf / .nan pass every range rule, then fail deep inside a run
            raise ValueError(f"config key {key} must be a finite number, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config key {key}: unsupported declared type {hint}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {where or '(top level)'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"unknown config key {name} (known: {', '.join(sorted(fields))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, {} if value is None else value, name)
            continue
        value = _coerce(value, hint, name)
        check = fields[key].metadata.get("check")
        if check is not None and (msg := check(value)):
            raise ValueError(f"config key {name} {msg}, got {value!r}")
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


def load_config(path: str | None = None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Config from a YAML file (or defaults) with `key.sub=value` overrides (values parsed as
    YAML), checked (types, ranges, cross-field rules; world size from WORLD_SIZE if not given)."""
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
        cfg = _build(Config, tree, "")
        validate(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ValueError(f"{path or '<defaults>'}: {e}") from None
    return cfg


def config_from_dict(tree: dict) -> Config:
    """A Config from `to_dict()` output (e.g. a checkpoint's), types checked, no cross-field rules."""
    return _build(Config, tree, "")


def differences(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: a -> b' for every leaf field where two configs differ (dotted keys in `ignore` skipped)."""
    out = []

    def walk(x, y, prefix):
        for f in dataclasses.fields(x):
            key = f"{prefix}{f.name}"
            u, v = getattr(x, f.name), getattr(y, f.name)
            if dataclasses.is_dataclass(u):
                walk(u, v, key + ".")
            elif key not in ignore and u != v:
                out.append(f"{key}: {u!r} -> {v!r}")
    walk(a, b, "")
    return out


def save_config(cfg: Config, path) -> None:
    from .files import write_atomic
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
