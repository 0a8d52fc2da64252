"""Every option of a run: one dataclass tree, loaded from YAML with `--set a.b=c` overrides and
checked at load. `python train.py --help` lists them all (type, default, description), read
from the declarations below: each field is declared once, with its type, its rule and what it
does (`opt(default, rule, help)`, options.py).

Defaults follow docs/METHOD.md (the paper's recipe); every deviation is a named option.
`load_config` checks, before anything runs: unknown keys (a renamed one names its new key),
every value against its declared type and rule, and the rules between fields (`validate`).
Errors name the file, the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from .options import build, each, ge, gt, opt, read_yaml, section, set_dotted, within


@dataclass
class TinyModelConfig:
    """Shape of the tiny Qwen2-VL built from scratch when model.path is empty."""
    hidden_size: int = opt(128, ge(8), "width of the text stack")
    intermediate_size: int = opt(384, ge(8), "MLP width")
    num_hidden_layers: int = opt(4, ge(1), "decoder layers")
    num_attention_heads: int = opt(4, ge(1), "query heads")
    num_key_value_heads: int = opt(2, ge(1), "key/value heads (grouped-query attention)")
    vision_depth: int = opt(2, ge(1), "vision-tower blocks")
    vision_embed_dim: int = opt(64, ge(8), "vision-tower width")
    vision_num_heads: int = opt(4, ge(1), "vision-tower heads")
    vocab_size: int = opt(2048, ge(600), "BPE vocabulary trained on the SafeTag-Synth corpus")
    max_pixels: int = opt(112 * 56, ge(28 * 28), "image processor's pixel limit (larger images are shrunk)")
    tie_word_embeddings: bool = opt(False, None, "share the input embedding and the LM head")


@dataclass
class LoraConfig:
    """LoRA adapters on the text stack (peft, `pip install -e ".[lora]"`); rank 0 = off."""
    rank: int = opt(0, ge(0), "r; > 0 trains adapters only, and the reference is the adapter-free model")
    alpha: float = opt(16.0, gt(0.0), "scaling alpha / r")
    dropout: float = opt(0.0, within(0.0, 1.0, hi_open=True), "LoRA dropout (recorded in the adapter; training "
                         "sets every dropout to 0: model.disable_dropout)")
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    lambda v: None if v else "must name at least one module",
                                    "projections of the text stack that get adapters")


@dataclass
class ModelConfig:
    """The model trained, and what of it stays fixed."""
    path: str = opt("", None, "local Hugging Face model directory, a .gguf file or package:NAME; "
                    "empty: build the tiny default into tiny_dir")
    tiny_dir: str = opt("data/tiny_model", None, "where the tiny default is built")
    tiny: TinyModelConfig = section(TinyModelConfig)
    dtype: Literal["float32", "bfloat16"] = opt("float32", None, "weights (and optimizer state) dtype")
    autocast: Literal["", "bf16"] = opt("", None, "bf16: fp32 weights, bf16 matmuls (log-probs stay fp32)")
    attn_implementation: str = opt("", None, "empty: flash_attention_2 on a GPU when importable, else sdpa")
    trust_remote_code: bool = opt(False, None, "run Python files shipped in the model folder (off: never)")
    gradient_checkpointing: bool = opt(False, None, "recompute activations in the update's backward")
    freeze_vision_tower: bool = opt(False, None, "keep the vision encoder fixed during GRPO")
    lora: LoraConfig = section(LoraConfig)


@dataclass
class SynthConfig:
    """SafeTag-Synth, the embedded default data set (data/synth.py)."""
    seed: int = opt(0, None, "the data set's seed (pairings, renders, instructions)")
    n_train: int = opt(3000, ge(1), "training rows")
    n_test: int = opt(400, ge(0), "test rows (held-out pairings)")
    holdout_frac: float = opt(0.2, within(0.0, 1.0, hi_open=True), "pairings of each group kept for test")
    image_style: Literal["badge", "word"] = opt("badge", None, "drawn badges or typographic words")


@dataclass
class DataConfig:
    """Training and test data, and how GRPO draws its prompts (data/samplers.py)."""
    train: str = opt("", None, "parquet file/folder or JSONL; empty: SafeTag-Synth")
    test: str = opt("", None, "the same; empty (with train set): no test split")
    train_split: str = opt("train", None, "<split>-*.parquet picked inside a folder")
    test_split: str = opt("test", None, "<split>-*.parquet picked inside data.test's folder")
    synth_dir: str = opt("data/synth", None, "where SafeTag-Synth is generated")
    synth: SynthConfig = section(SynthConfig)
    prompt_style: str = opt("safegrpo", None, "safegrpo | compact | none | path of a text file (safety/prompting.py)")
    max_prompt_length: int = opt(2048, ge(1), "tokens (images expanded); a longer prompt is an error at load, "
                                 "or dropped with filter_overlong_prompts")
    filter_overlong_prompts: bool = opt(False, None, "drop (and report) prompts over max_prompt_length at load")
    balance_combined: bool = opt(False, None, "GRPO draws safe_share of its prompts with combine_tag=safe, the "
                                 "rest unsafe")
    balance_groups: bool = opt(False, None, "as balance_combined, each part split evenly over its SafeTag groups "
                               "(visual/text/combined): rare groups come up more")
    safe_share: float = opt(0.5, within(0.0, 1.0, lo_open=True, hi_open=True),
                            "with balance_*: the combined-safe share of each step (0.2 with balance_groups: every "
                            "one of the five groups the same share)")
    skip_invalid: bool = opt(False, None, "skip (and report) bad rows instead of stopping")
    image_root: str = opt("", None, "folder image paths are relative to (default: the data file's)")
    allow_outside_images: bool = opt(False, None, "image paths may point outside that folder (absolute, ../)")
    contrast_column: str = opt("", None, "a column naming contrast sets (SafeTag-Synth: `contrast`, the "
                               "instruction of compositional and decoy rows): a drawn row with a set is followed in "
                               "its step by a row of the same set with the other combined tag, so a rule that "
                               "ignores what tells them apart earns nothing net (samplers.ContrastSampler)")


@dataclass
class VllmConfig:
    """vLLM as the rollout engine (rollout.engine: vllm; rl/vllm_engine.py, `pip install -e ".[vllm]"`),
    in the training process, its weights synced from the policy after every optimizer step."""
    gpu_memory_utilization: float = opt(0.3, within(0.0, 1.0, lo_open=True), "share of the GPU's memory vLLM "
                                        "takes for its weights and KV cache (colocated: the rest is training's)")
    tensor_parallel_size: int = opt(1, ge(1), "GPUs one engine spans (one process; under torchrun each rank "
                                    "drives its own engine: keep 1)")
    sleep: bool = opt(False, None, "free vLLM's weights and KV cache while the policy updates, woken before the "
                      "next sync (vLLM's sleep mode, CUDA only)")
    max_num_seqs: int = opt(256, ge(1), "sequences vLLM decodes at once")
    max_images_per_prompt: int = opt(1, ge(0), "images one prompt may carry (vLLM reserves encoder memory for them)")
    enforce_eager: bool = opt(False, None, "no CUDA graphs (always eager on a CPU)")


@dataclass
class RolloutConfig:
    """How completions are sampled (rl/rollout.py, or vLLM: rl/vllm_engine.py)."""
    engine: Literal["native", "vllm"] = opt("native", None, "native: our engine (exact, byte-identical resume, "
                                            "the reference); vllm: vLLM, synced every step (rollout.vllm; turns "
                                            "grpo.rollout_correction.rollout_is on by default)")
    group_size: int = opt(8, ge(2), "G: samples per prompt (advantages are relative within it)")
    temperature: float = opt(1.0, gt(0.0), "sampling temperature; log-probs are taken at the same one")
    top_p: float = opt(1.0, within(0.0, 1.0, lo_open=True), "nucleus; < 1 makes the update off-policy "
                       "(mismatch/* keys measure by how much; grpo.rollout_correction corrects it)")
    max_new_tokens: int = opt(4096, ge(1), "completion length limit")
    max_batch_tokens: int = opt(0, ge(0), "KV-cache budget per rank, in tokens: resident prompts x the longest "
                                "prompt + decoding rows x max_new_tokens (rl/decode.kv_plan); rows join as others "
                                "finish. 0: every prompt and row at once")
    vllm: VllmConfig = section(VllmConfig)


@dataclass
class RewardConfig:
    """The reward of each completion: SafeGRPO's rule (safety/reward.py, eqs. 1-3) or a plug-in."""
    tag_weight: float = opt(0.5, ge(0.0), "w_tag in R = F (w_tag R_tag + w_behavior R_behavior) (eq. 1); the "
                            "paper's 0.5, its ablation sets one of the two weights to 0")
    behavior_weight: float = opt(0.5, ge(0.0), "w_behavior of eq. (1); the paper's 0.5")
    refusal_judge: Literal["keywords", "strict"] = opt("keywords", None, "the refusal rule of R_behavior "
                                                       "(safety/judge.py)")
    plugin: str = opt("", None, "package.module:function with verl's custom-reward signature, whose score "
                      "replaces the rule's total (rl/reward_fn.py); empty: the SafeGRPO rule")
    timeout_s: float = opt(0.0, ge(0.0), "> 0: a plug-in call running longer is stopped and scores 0")
    workers: int = opt(4, ge(1), "worker processes the plug-in's calls run on at once")


@dataclass
class RolloutCorrectionConfig:
    """Correction of the rollout/training mismatch (rl/correction.py, docs/METHOD.md eqs. 13-15;
    names, defaults and semantics as verl's rollout correction: importance weights on the
    policy-gradient term, rejected tokens out of the response mask). Off by default (the
    importance weights on under rollout.engine: vllm); needs old_logprobs: recompute, and then
    always runs the old-policy pass."""
    rollout_is: Literal["", "token", "sequence"] = opt("", None, "truncated importance sampling: each token's "
                                                       "policy-gradient loss x min(pi_train / pi_rollout, "
                                                       "rollout_is_threshold), per token or per sequence; empty: off. "
                                                       "Unset under rollout.engine: vllm: token (as TRL does for vLLM)")
    rollout_is_threshold: float = opt(2.0, gt(0.0), "C, the cap of the importance weight")
    rollout_rs: Literal["", "token", "sequence", "geometric"] = opt(
        "", None, "rejection: tokens whose ratio (per token, per sequence, or the sequence's geometric mean) leaves "
        "[rollout_rs_threshold_lower, rollout_rs_threshold] leave the update (loss, KL, entropy and token count); "
        "empty: off")
    rollout_rs_threshold: float = opt(2.0, gt(0.0), "upper bound of the kept ratios")
    rollout_rs_threshold_lower: float = opt(0.0, ge(0.0), "lower bound of the kept ratios; 0: 1 / "
                                            "rollout_rs_threshold (verl's default)")


@dataclass
class GRPOConfig:
    """The objective (rl/grpo.py, eqs. 4-9 and GSPO's 12) and DAPO's dynamic sampling."""
    beta: float = opt(0.01, ge(0.0), "KL coefficient (loss term); 0 skips the reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3", None, 'k3 = "low_var_kl" (docs/METHOD.md eq. 7)')
    clip_low: float = opt(0.2, within(0.0, 1.0, hi_open=True), "eps_low: ratio clipped below at 1 - clip_low")
    clip_high: float = opt(0.2, ge(0.0), "eps_high: ratio clipped above at 1 + clip_high")
    dual_clip: float = opt(3.0, lambda v: None if v == 0 or v > 1 else "must be 0 (off) or > 1",
                           "dual-clip bound c on negative advantages; 0: off")
    adv_scale: Literal["group", "batch", "none"] = opt("group", None, "divide advantages by the group std, the "
                                                       "batch std, or not")
    adv_eps: float = opt(1e-6, gt(0.0), "added to the std that divides advantages")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = opt(
        "token-mean", None, "how token losses become the loss (eq. 9): mean over the mini-batch's tokens, mean of "
        "per-completion means, or per-completion sums over norm_constant")
    norm_constant: float = opt(0.0, ge(0.0), "for seq-mean-token-sum-norm; 0: max_new_tokens")
    entropy_coef: float = opt(0.0, ge(0.0), "entropy bonus per token (the paper: 0)")
    importance_level: Literal["token", "sequence"] = opt("token", None, "token: GRPO's per-token ratio (eqs. 5-6); "
                                                         "sequence: GSPO's sequence ratio (eq. 12) with seq_clip_*")
    seq_clip_low: float = opt(3e-4, within(0.0, 1.0, hi_open=True), "GSPO's clip range (the paper's values)")
    seq_clip_high: float = opt(4e-4, ge(0.0), "GSPO's upper clip range")
    filter_zero_std: bool = opt(False, None, "DAPO dynamic sampling: groups whose rewards have no spread (no "
                                "advantage) leave the update")
    oversample: float = opt(0.0, ge(0.0), "with filter_zero_std: draw more prompts (up to (1 + this) x "
                            "prompts_per_step in all) until prompts_per_step groups are informative")
    max_empty_steps: int = opt(10, ge(0), "with filter_zero_std: stop after this many steps in a row in which no "
                               "group anywhere had reward spread (nothing learned); 0: never")
    old_logprobs: Literal["recompute", "rollout"] = opt("recompute", None, "pi_old when a rollout feeds more than "
                                                        "one update: recomputed by a no-grad pass of the training "
                                                        "forward, or the rollout engine's (no extra pass): its "
                                                        "log-prob under the full softmax at the temperature, the "
                                                        "training forward's form, so the ratio is 1 at the "
                                                        "rollout's parameters (never the nucleus's or banned-id "
                                                        "renormalised log-prob)")
    rollout_correction: RolloutCorrectionConfig = section(RolloutCorrectionConfig)


@dataclass
class AnchorConfig:
    """The format anchor (not in the paper; PPO-ptx's idea, eq. 10, warmstart.FormatAnchor)."""
    coef: float = opt(0.0, ge(0.0), "> 0: add this x the cross-entropy of fresh warm-start demonstrations, their "
                      "tag values masked (so it teaches no safety), once per optimizer update (paper: 0)")
    batch: int = opt(16, ge(1), "demonstrations per optimizer update")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (optim.py)."""
    lr: float = opt(1e-6, gt(0.0), "peak learning rate of GRPO")
    weight_decay: float = opt(0.01, ge(0.0), "AdamW weight decay, on matrices only")
    betas: tuple[float, float] = opt((0.9, 0.999), each(within(0.0, 1.0, hi_open=True)), "AdamW's beta1, beta2")
    eps: float = opt(1e-8, gt(0.0), "AdamW's epsilon")
    grad_clip: float = opt(1.0, gt(0.0), "clip the global gradient norm to this")
    warmup_steps: int = opt(0, ge(0), "GRPO steps of linear warm-up (the schedule advances once per optimizer "
                            "update, so it spans the run whatever prompts_per_step / mini_batch_prompts is)")
    schedule: Literal["constant", "cosine"] = opt("constant", None, "cosine: to 0 at train.steps")


@dataclass
class SFTConfig:
    """The warm start before GRPO (warmstart.py)."""
    enabled: bool = opt(False, None, "warm-start on the training records' demonstrations first")
    caption_steps: int = opt(0, ge(0), "before that: caption pretraining (image -> 'The image shows a X.')")
    caption_lr: float = opt(1e-3, gt(0.0), "learning rate of caption pretraining")
    steps: int = opt(0, ge(0), "demonstration steps (the format)")
    tags: Literal["random", "per_modality", "partial", "per_modality_coin", "gold"] = opt(
        "random", None, "the demonstrations' tags: random (an even coin: the format, no safety), per_modality "
        "(right visual and text tags, combined = unsafe if either is: misses compositional risks), partial "
        "(per_modality, but a compositional demonstration carries the gold combined tag with probability "
        "partial_share: partly aware of them, like the paper's starting models), per_modality_coin (a coin for "
        "combined where both sides are safe), gold (supervised)")
    partial_share: float = opt(0.5, within(0.0, 1.0), "tags=partial: P(gold combined tag) on a compositional demo")
    step3: Literal["restate", "topic"] = opt("restate", None, "SafeTag-Synth demonstrations' step 3: the request "
                                             "restated, or restated with what it is about in the words the captions "
                                             "use for kinds ('...; it is about a high place'), so step 4 compares "
                                             "two written facts (synth.request_topic)")
    step4: Literal["tag", "compare"] = opt("tag", None, "SafeTag-Synth demonstrations' step 4: the combined tag "
                                           "alone, or first the comparison of the image's kind with the request's "
                                           "topic in words ('The image is [not] what the request is about.', a "
                                           "fact, always right; synth.same_kind), then the tag")
    batch_size: int = opt(32, ge(1), "demonstrations (or captions) per step")
    lr: float = opt(1e-3, gt(0.0), "learning rate of demonstration SFT")
    warmup_steps: int = opt(20, ge(0), "linear warm-up steps of each stage")


@dataclass
class TrainConfig:
    """The run: its directory, batch sizes, checkpoints, validation, devices and loggers."""
    out_dir: str = opt("runs/default", None, "the run directory (one run per directory)")
    seed: int = opt(0, None, "model initialisation (tiny model), warm start, prompt order and sampling seeds")
    steps: int = opt(100, ge(1), "GRPO steps (one rollout each)")
    prompts_per_step: int = opt(256, ge(1), "prompts per rollout (x group_size completions)")
    mini_batch_prompts: int = opt(64, ge(1), "prompts per optimizer update; updates per step = prompts_per_step / "
                                  "this")
    micro_batch_prompts: int = opt(8, ge(1), "prompts per forward/backward pass (whole groups), per rank")
    micro_batch_tokens: int = opt(0, ge(0), "> 0: instead, as many whole groups per pass as fit in this many "
                                  "tokens (prompt once + its G completions)")
    save_every: int = opt(50, ge(0), "GRPO steps between checkpoints; 0: only the final one")
    keep_checkpoints: int = opt(3, ge(0), "how many of the newest checkpoints stay (older ones are deleted as "
                                "new ones are written); 0: all")
    eval_every: int = opt(0, ge(0), "validate every N GRPO steps (greedy on the test split, val/... keys in "
                          "metrics.jsonl, points on reward_curves.png); 0: not during training")
    eval_limit: int = opt(0, ge(0), "test records for validation and the before/after evaluations; 0: all")
    collective_timeout_s: int = opt(7200, ge(60), "under torchrun: the longest a rank waits in a collective (the "
                                    "others wait while rank 0 runs the warm start and evaluations)")
    device: str = opt("cpu", lambda v: None if re.fullmatch(r"cpu|cuda(:\d+)?", v) else "must be cpu, cuda or cuda:N",
                      "cpu, cuda or cuda:N (under torchrun: each rank's own GPU)")
    threads: int = opt(0, ge(0), "torch threads on CPU; 0: leave as is")
    check_memory: bool = opt(True, None, "print the memory plan at start-up and stop when a phase does not fit the "
                             "device (memory.py; an estimate)")
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = opt(["jsonl"], None, "metrics.jsonl always; also "
                                                                  'TensorBoard (pip install -e ".[tensorboard]"), '
                                                                  'W&B (".[wandb]", WANDB_MODE=offline works without '
                                                                  "a network)")
    wandb_project: str = opt("safegrpo", None, "W&B project name")


@dataclass
class Config:
    """A run's options, by section."""
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    reward: RewardConfig = section(RewardConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    anchor: AnchorConfig = section(AnchorConfig)
    optim: OptimConfig = section(OptimConfig)
    sft: SFTConfig = section(SFTConfig)
    train: TrainConfig = section(TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# keys that moved when GRPOConfig was split (an old key names its new place; checkpoints migrate)
MOVED = {"grpo.refusal_judge": "reward.refusal_judge", "grpo.tag_weight": "reward.tag_weight",
         "grpo.behavior_weight": "reward.behavior_weight", "grpo.reward": "reward.plugin",
         "grpo.reward_timeout_s": "reward.timeout_s", "grpo.reward_workers": "reward.workers",
         "grpo.ptx_coef": "anchor.coef", "grpo.ptx_batch": "anchor.batch",
         "grpo.freeze_vision_tower": "model.freeze_vision_tower"}


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
    if cfg.reward.tag_weight + cfg.reward.behavior_weight == 0:
        raise ValueError("reward.tag_weight and reward.behavior_weight are both 0: the reward would be 0 everywhere")
    if d.balance_combined and d.balance_groups:
        raise ValueError("set at most one of data.balance_combined and data.balance_groups")
    if d.safe_share != 0.5 and not (d.balance_combined or d.balance_groups):
        raise ValueError("data.safe_share applies to data.balance_combined or data.balance_groups: set one of them")
    if bool(d.test) and not d.train:
        raise ValueError("data.test is set but data.train is empty (SafeTag-Synth brings its own test split)")
    if t.micro_batch_tokens and t.micro_batch_tokens < 2:
        raise ValueError("train.micro_batch_tokens must be 0 (off) or a token budget")
    if cfg.rollout.engine == "vllm" and cfg.grpo.old_logprobs == "rollout":
        raise ValueError("grpo.old_logprobs: rollout needs each token's log-prob under the full softmax at the "
                         "temperature, which vLLM does not return (its log-probs are the nucleus's): use recompute "
                         "with rollout.engine: vllm")
    rc = cfg.grpo.rollout_correction
    if (rc.rollout_is or rc.rollout_rs) and cfg.grpo.old_logprobs != "recompute":
        raise ValueError("grpo.rollout_correction needs grpo.old_logprobs: recompute (it weighs the training "
                         "forward's log-probs at the rollout's parameters against the engine's)")
    if rc.rollout_rs_threshold_lower and rc.rollout_rs_threshold_lower >= rc.rollout_rs_threshold:
        raise ValueError("grpo.rollout_correction.rollout_rs_threshold_lower must be below rollout_rs_threshold")
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
def load_config(path: str | None = None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Config from a YAML file (or defaults) with `key.sub=value` overrides (values parsed as
    YAML), checked (types, ranges, cross-field rules; world size from WORLD_SIZE if not given)."""
    tree = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        tree = read_yaml(p.read_text(), str(p)) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{p}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        set_dotted(tree, k.strip(), v)
    engine_defaults(tree)
    try:
        cfg = build(Config, tree, "", MOVED)
        validate(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ValueError(f"{path or '<defaults>'}: {e}") from None
    return cfg


def engine_defaults(tree: dict) -> None:
    """Defaults that depend on another key, filled into the loaded tree where the user left them
    unset: under rollout.engine: vllm the rollout's samples come from another implementation
    (other kernels, other precision), so the truncated importance weights are on (token level)."""
    rollout = tree.get("rollout")
    if isinstance(rollout, dict) and rollout.get("engine") == "vllm":
        rc = tree.setdefault("grpo", {}).setdefault("rollout_correction", {}) \
            if isinstance(tree.get("grpo", {}), dict) else None
        if isinstance(rc, dict):                     # (anything else: build names the bad value)
            rc.setdefault("rollout_is", "token")


def config_from_dict(tree: dict) -> Config:
    """A Config from `to_dict()` output (e.g. a checkpoint's; one written before a key moved
    is migrated), types checked, no cross-field rules."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in MOVED.items():
        (s, k), (s2, k2) = old.split("."), new.split(".")
        if k in tree.get(s, {}):
            tree.setdefault(s2, {})[k2] = tree[s].pop(k)
    return build(Config, tree, "")


def save_config(cfg: Config, path) -> None:
    from .files import write_atomic
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


OPTIONS_DOC_HEAD = """# Options

Every config key, by section: set it in the YAML file given to `train.py --config`, or with
`--set key=value`. Generated from the declarations in `safegrpo/config.py` (the text of
`python train.py --help`) by `make options-doc`; `tests/test_readme.py` fails when it is out of date.

"""


def options_doc() -> str:
    """docs/OPTIONS.md's text."""
    from .options import markdown
    return OPTIONS_DOC_HEAD + markdown(Config)


if __name__ == "__main__":           # python -m safegrpo.config OUT.md: write the options reference
    import sys
    from .files import write_atomic
    write_atomic(sys.argv[1], options_doc())
