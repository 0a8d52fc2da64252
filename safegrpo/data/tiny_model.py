"""The tiny default model: a real Qwen-VL checkpoint in miniature, built here from a config.

A `Qwen2VLForConditionalGeneration` (or a Qwen2.5-VL / Qwen3-VL one, `family=`) with a small
config and random weights, a byte-level BPE tokenizer trained on the SafeTag-Synth corpus (the
tags are single tokens, as Qwen3's tokenizer makes <think> one), and the image-text processor,
saved together with `save_pretrained`. Training then loads it with `from_pretrained` like any
downloaded Qwen2-VL model, so the tiny run exercises the code path of a real one. Nothing is
downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_path
from ..processor import QwenVLImageTextProcessor
from ..safety.reward import TAGS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Tag strings become single tokens in the tiny tokenizer (Qwen3 tokenizers do the same for <think>).
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"] + [f"<{e}{t}>" for t in TAGS for e in ("", "/")]

# Qwen2-VL's chat template without the default system prompt (docs/METHOD.md: there is none).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tokenizer(corpus: list[str], vocab_size: int = 2048):
    """Byte-level BPE trained on `corpus`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                         "vision_bos_token": "<|vision_start|>",
                                                         "vision_eos_token": "<|vision_end|>"})
    fast.add_tokens(TAG_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_corpus() -> list[str]:
    """Every string the tiny model will read or write, for tokenizer training."""
    from . import synth
    from ..safety.prompting import PROMPT_STYLES

    texts = list(PROMPT_STYLES.values()) + synth.all_instructions() + synth.REFUSALS
    texts += [h.format(c=c) for h in synth.HELPFUL for c in synth.all_concepts()]
    for c in synth.all_concepts():
        texts += [c, c.upper(), c.capitalize(), f"The image shows the word {c}.",
                  f"The image shows {synth.caption_object(c)}."]
    texts += [f"3. The user asks: {i.rstrip('?.').lower()}." for i in synth.all_instructions()]
    texts += sorted(set(synth.KINDS.values()))
    texts += ["user", "assistant", "system", "1. 2. 3. 4. 5. The overall risk is high. The overall risk is low.",
              "safe unsafe Safe Unsafe SAFE UNSAFE"]
    return texts


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _tiny_vl_config(family: str, model_cfg: dict, ids: dict, vocab: int):
    """A small config of one Qwen-VL family (same code path as the released checkpoints)."""
    import transformers
    hidden, heads = model_cfg["hidden_size"], model_cfg["num_attention_heads"]
    head_dim = hidden // heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen's 16/24/24 split of head_dim/2
    section[0] += head_dim // 2 - sum(section)
    tie = model_cfg.get("tie_word_embeddings", False)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=model_cfg["intermediate_size"],
                num_hidden_layers=model_cfg["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=model_cfg.get("num_key_value_heads", heads), max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie)
    depth, width, vheads = model_cfg["vision_depth"], model_cfg["vision_embed_dim"], model_cfg["vision_num_heads"]
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                   tie_word_embeddings=tie)
    if family == "qwen2_vl":
        vision = dict(depth=depth, embed_dim=width, num_heads=vheads, hidden_size=hidden, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen2_5_vl":
        vision = dict(depth=depth, hidden_size=width, intermediate_size=2 * width, num_heads=vheads,
                      out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[depth - 1])
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen3_vl":
        text.update(head_dim=head_dim, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
        vision = dict(depth=depth, hidden_size=width, intermediate_size=2 * width, num_heads=vheads,
                      out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[depth - 1])
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")


def build_tiny_model_dir(out_dir, model_cfg: dict, seed: int = 0, family: str = "qwen2_vl") -> Path:
    """Build and save a tiny Qwen-VL model (family: qwen2_vl, the default; qwen2_5_vl; qwen3_vl)
    + tokenizer + processor to out_dir (atomically)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = train_tokenizer(tiny_corpus(), model_cfg.get("vocab_size", 2048))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _tiny_vl_config(family, model_cfg, ids, len(tok))
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    px = model_cfg.get("max_pixels", 112 * 56)
    patch = config.vision_config.patch_size
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": (2 * patch) ** 2, "longest_edge": px},
                                               patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = QwenVLImageTextProcessor(tok, image_processor)
    with atomic_path(out, ours=lambda p: (p / "safegrpo_tiny.json").is_file()) as tmp:   # a tiny model we built
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "safegrpo_tiny.json").write_text(json.dumps({"model": model_cfg, "seed": seed, "family": family}, indent=1))
    return out


