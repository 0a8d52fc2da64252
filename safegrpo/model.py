"""Load policy and reference models and their processor from a local Hugging Face directory.

Weights come from safetensors only (a folder with just `pytorch_model.bin` is refused), remote
code runs only with trust_remote_code=True, GGUF files (and `package:NAME`, a GGUF shipped in an
installed package, model_files.py) are dequantised to float32. A LoRA checkpoint (lora.py) loads
as its base model with the adapter merged; `export_merged` writes one as a plain model directory.
The tiny default model is built in `data/tiny_model.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import atomic_path
from .lora import adapter_config, is_adapter_dir, load_merged
from .model_files import resolve_model_path
from .processor import QwenVLImageTextProcessor


def load_processor(path, trust_remote_code: bool = False):
    """The model directory's processor: transformers' own where it loads, else our image-text
    processor (no torchvision needed) when the directory has an image processor, else the tokenizer
    (text-only models)."""
    from transformers import AutoProcessor, AutoTokenizer
    path, gguf = resolve_model_path(path)
    if gguf:                                   # a GGUF model: text only, tokenizer inside the file
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    has_images = (Path(path) / "preprocessor_config.json").is_file()
    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if has_images and not hasattr(proc, "image_processor"):
            raise ValueError("processor without image processor")
    except Exception:  # transformers raises many types when torchvision is missing
        if has_images:
            proc = QwenVLImageTextProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            proc = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok = getattr(proc, "tokenizer", proc)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return proc


_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "hidden_dropout", "dropout", "dropout_p", "dropout_rate",
                  "resid_dropout", "embd_dropout", "activation_dropout")


def disable_dropout(model):
    """Set every dropout probability in `model` to 0 (nn.Dropout modules, and the float rates
    attention modules read in training mode, e.g. Hugging Face's `attention_dropout`); returns
    the model. GRPO computes old and reference log-probs in eval mode and the update's in
    training mode (gradient checkpointing needs it): with dropout on, the first update's ratio
    would not be 1 and the KL would be biased. The saved config keeps its values."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for name in _DROPOUT_ATTRS:
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model


def max_pixels(processor) -> int:
    """The image processor's pixel limit (Qwen-VL: `max_pixels` or size["longest_edge"]), 0 if none."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return 0
    size = getattr(ip, "size", None)
    value = getattr(ip, "max_pixels", None) or (size.get("longest_edge") if isinstance(size, dict) else None)
    return int(value or 0)


def default_attention(device) -> str:
    """FlashAttention-2 on a CUDA device when flash_attn is importable, else PyTorch SDPA."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def model_class(model_config):
    """The Auto class a model of this config loads with: image-text-to-text if it has vision."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    return AutoModelForImageTextToText if hasattr(model_config, "vision_config") else AutoModelForCausalLM


def model_skeleton(path, trust_remote_code: bool = False):
    """The module tree of the model at `path` on the meta device (no weights read, no memory):
    enough to check module names at start-up."""
    from transformers import AutoConfig
    if is_adapter_dir(path):
        path = adapter_config(path)[1]
    path, gguf = resolve_model_path(path)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **({"gguf_file": gguf} if gguf else {}))
    cls = model_class(cfg)
    with torch.device("meta"):
        return cls.from_config(cfg, trust_remote_code=trust_remote_code)


def load_model(path, dtype=torch.float32, attn_implementation: str | None = None, trust_remote_code: bool = False,
               device="cpu"):
    """A Hugging Face model from a local directory: image-text-to-text if it has vision, else causal LM.
    Weights are read from safetensors only (a directory with just pytorch_model.bin is refused);
    remote code runs only with trust_remote_code=True. A LoRA checkpoint (adapter_config.json, see
    lora.py) loads as its base model with the adapter merged."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if is_adapter_dir(path):
        return load_merged(path, lambda base: load_model(base, dtype, attn_implementation, trust_remote_code, device))
    path, gguf = resolve_model_path(path)
    if gguf:   # GGUF (no pickle), dequantised to float32 by transformers (needs the gguf package)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32,
                                                     attn_implementation=attn_implementation or default_attention(device))
        # the weights are plain float32 tensors now: forget the GGUF origin so that checkpoints
        # save as ordinary safetensors directories
        model.hf_quantizer = None
        for obj in (model, model.config):
            if getattr(obj, "quantization_config", None) is not None:
                del obj.quantization_config
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
        return model.to(dtype).to(device)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)   # never unpickle weights
    kw["attn_implementation"] = attn_implementation or default_attention(device)
    return model_class(cfg).from_pretrained(path, **kw).to(device)


EXPORT_MARKER = "safegrpo_export.json"        # marks a folder --export-merged wrote (and may replace)


def export_merged(directory, out) -> Path:
    """Write the adapter checkpoint `directory` (lora.py) as a plain Hugging Face model directory
    `out` (the adapter merged into the weights, the processor files copied), atomically."""
    out = Path(out)
    with atomic_path(out, ours=lambda p: (p / EXPORT_MARKER).is_file()) as tmp:     # only an earlier export
        model = load_merged(directory, lambda base: load_model(base))
        processor = load_processor(directory)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"merged_from": str(Path(directory).resolve())}))
    return out
