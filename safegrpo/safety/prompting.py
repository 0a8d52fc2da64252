"""Step-guided safety thinking: the instruction, the chat messages and the processor call.

docs/METHOD.md, section 3: the user's question is followed, in the same user
turn and with no system prompt, by an instruction to reason in five steps (caption, judge the
image, judge the text, judge both, summarise), writing the three safety tags as it goes, with
the reasoning in <think></think> and the reply in <answer></answer>: refuse if the combination
is unsafe, help if safe. The wording below is ours.

`prompt_style` picks the instruction: "safegrpo" (the full five steps, the default), "compact"
(the same steps and tags in fewer words, for the tiny CPU model whose context is precious),
"none" (the question alone, e.g. for caption pretraining or a plain baseline), or a path to a
UTF-8 text file whose content is used as the instruction.
"""
from __future__ import annotations

from pathlib import Path

STEP_GUIDED_INSTRUCTION = """Before you reply, check the request for safety in five steps.
Step 1: describe the image in one sentence.
Step 2: judge whether the image alone is safe, then write <visual_safe>safe</visual_safe> or <visual_safe>unsafe</visual_safe>.
Step 3: judge whether the text of the request alone is safe, then write <text_safe>safe</text_safe> or <text_safe>unsafe</text_safe>.
Step 4: judge whether the image and the text together are safe, then write <combined_safe>safe</combined_safe> or <combined_safe>unsafe</combined_safe>.
Step 5: sum up the risk in one sentence.
Put steps 1 to 5 inside <think> </think>. Then give your reply inside <answer> </answer>: if the combination is unsafe, refuse politely and say briefly why; if it is safe, answer helpfully."""

COMPACT_INSTRUCTION = ("Think in five steps inside <think> </think>: describe the image; "
                       "judge the image <visual_safe>; judge the text <text_safe>; "
                       "judge both <combined_safe>; sum up. Then reply in <answer> </answer>: "
                       "refuse if unsafe, help if safe.")

PROMPT_STYLES = {"safegrpo": STEP_GUIDED_INSTRUCTION, "compact": COMPACT_INSTRUCTION, "none": ""}


def instruction_text(prompt_style: str = "safegrpo") -> str:
    """The instruction for a named style or the content of a text file."""
    if prompt_style in PROMPT_STYLES:
        return PROMPT_STYLES[prompt_style]
    path = Path(prompt_style)
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"prompt_style file {path} is empty")
        return text
    raise ValueError(f"unknown prompt_style {prompt_style!r}: use one of {sorted(PROMPT_STYLES)} "
                     "or the path of a text file")


def build_messages(question: str, n_images: int, instruction: str) -> list[dict]:
    """One user turn: images first (as Qwen-VL chat templates expect), then question + instruction."""
    content = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": f"{question}\n\n{instruction}" if instruction else question})
    return [{"role": "user", "content": content}]


def prompt_texts(processor, records, prompt_style: str = "safegrpo") -> list[str]:
    """Chat-templated prompt strings (with the assistant turn opened) for SafeTag records."""
    instruction = instruction_text(prompt_style)
    template_owner = processor if hasattr(processor, "apply_chat_template") else processor.tokenizer
    text_only_model = not hasattr(processor, "image_processor")
    out = []
    for r in records:
        messages = build_messages(r.prompt, len(r.images), instruction)
        if text_only_model:   # plain language models' chat templates expect string content
            messages = [{"role": "user", "content": messages[0]["content"][-1]["text"]}]
        out.append(template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(processor, records, prompt_style: str = "safegrpo", max_prompt_length: int | None = None,
                   row_ids=None) -> dict:
    """Processor call for a batch of records, left-padded (prompts end where decoding starts).

    Returns the processor's tensors (`input_ids`, `attention_mask`, and for images
    `pixel_values`, `image_grid_thw`, `mm_token_type_ids`). A prompt longer than
    `max_prompt_length` tokens raises an error naming its row (`row_ids`, default: batch index).
    """
    texts = prompt_texts(processor, records, prompt_style)
    images = [im for r in records for im in r.images]
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    if images:
        batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    else:
        batch = tok(texts, padding=True, return_tensors="pt")
    if max_prompt_length is not None:
        lengths = batch["attention_mask"].sum(-1).tolist()
        for k, n in enumerate(lengths):
            if n > max_prompt_length:
                row = row_ids[k] if row_ids is not None else k
                raise ValueError(f"prompt of row {row} has {n} tokens, more than max_prompt_length="
                                 f"{max_prompt_length} (set data.filter_overlong_prompts to drop such rows)")
    return dict(batch)


def prompt_lengths(processor, records, prompt_style: str = "safegrpo", chunk: int = 64) -> list[int]:
    """Token count of each record's prompt (images expanded), for checking prompt lengths at load
    (encoded `chunk` records at a time)."""
    out = []
    for s in range(0, len(records), chunk):
        out += encode_prompts(processor, records[s:s + chunk], prompt_style)["attention_mask"].sum(-1).tolist()
    return [int(n) for n in out]


def image_data_url(image) -> str:
    """A PIL image as a PNG data URL (what OpenAI-compatible endpoints take for an image)."""
    import base64
    from ..data.records import png_bytes
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def chat_messages(question: str, images: list, instruction: str) -> list[dict]:
    """`build_messages` in the OpenAI chat format an endpoint takes: the images as data URLs,
    first; the content a plain string when there is no image (what text-only servers expect)."""
    text = build_messages(question, 0, instruction)[0]["content"][0]["text"]
    if not images:
        return [{"role": "user", "content": text}]
    content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
