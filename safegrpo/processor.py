"""A light image-text processor for Qwen-VL models: tokenizer + image processor.

transformers' `Qwen2VLProcessor` also owns a video processor, which needs torchvision; this
class does the image half of its work with no torchvision: it runs the image processor, expands
each `<|image_pad|>` placeholder to one token per merged patch (grid t*h*w / merge_size^2), and
returns `mm_token_type_ids` (0 text, 1 image) for Qwen-VL's 3D rotary positions. `load_processor`
in model.py uses transformers' own processor where it loads and falls back to this one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class QwenVLImageTextProcessor:
    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if chat_template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, path, **kw):
        from transformers import AutoImageProcessor, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, **kw)
        img = AutoImageProcessor.from_pretrained(path, **kw)
        template = None
        for name in ("chat_template.jinja", "chat_template.json"):
            f = Path(path) / name
            if f.is_file():
                text = f.read_text()
                template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        return cls(tok, img, template)

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def apply_chat_template(self, messages, **kw):
        return self.tokenizer.apply_chat_template(messages, **kw)

    def __call__(self, text, images=None, padding=True, return_tensors="pt", **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            feats = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = feats["pixel_values"], feats["image_grid_thw"]
            counts = (feats["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            k, expanded = 0, []
            for t in texts:
                parts = t.split(self.image_token)
                if k + len(parts) - 1 > len(counts):
                    raise ValueError(f"{k + len(parts) - 1} image placeholders but {len(counts)} images")
                s = parts[0]
                for p in parts[1:]:
                    s += self.image_token * counts[k] + p
                    k += 1
                expanded.append(s)
            if k != len(counts):
                raise ValueError(f"{k} image placeholders in the text but {len(counts)} images were given")
            texts = expanded
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kw)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **out}
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).to(torch.int32)
        return out

    def batch_decode(self, *a, **kw):
        return self.tokenizer.batch_decode(*a, **kw)

    def decode(self, *a, **kw):
        return self.tokenizer.decode(*a, **kw)
