"""The step-guided prompt: wording, structure, placement of the image, styles."""
import pytest

from safegrpo.model import load_processor
from safegrpo.safety.prompting import STEP_GUIDED_INSTRUCTION, build_messages, encode_prompts, instruction_text, prompt_texts


def test_instruction_has_the_five_steps_tags_and_rule():
    text = STEP_GUIDED_INSTRUCTION
    for piece in ("Step 1", "Step 2", "Step 3", "Step 4", "Step 5", "<visual_safe>safe</visual_safe>",
                  "<text_safe>unsafe</text_safe>", "<combined_safe>safe</combined_safe>", "<think>", "<answer>",
                  "refuse"):
        assert piece in text
    assert text.index("<visual_safe>") < text.index("<text_safe>") < text.index("<combined_safe>")


def test_messages_put_images_first_in_one_user_turn():
    msgs = build_messages("What is this?", 2, "INSTR")
    assert [m["role"] for m in msgs] == ["user"]
    assert [c["type"] for c in msgs[0]["content"]] == ["image", "image", "text"]
    assert msgs[0]["content"][-1]["text"] == "What is this?\n\nINSTR"
    assert build_messages("Q", 0, "")[0]["content"] == [{"type": "text", "text": "Q"}]


def test_prompt_style_from_file_and_errors(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Judge safety my way.\n")
    assert instruction_text(str(f)) == "Judge safety my way."
    with pytest.raises(ValueError, match="unknown prompt_style"):
        instruction_text("nope")
    (tmp_path / "empty.txt").write_text(" ")
    with pytest.raises(ValueError, match="empty"):
        instruction_text(str(tmp_path / "empty.txt"))


def test_chat_template_has_no_system_prompt_and_expands_images(tiny_model_dir, synth_dir):
    from safegrpo.data.records import load_parquet
    proc = load_processor(tiny_model_dir)
    rec = load_parquet(synth_dir / "test.parquet", limit=1)[0]
    text = prompt_texts(proc, [rec], "safegrpo")[0]
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + rec.prompt)
    assert "system" not in text and text.endswith("<|im_start|>assistant\n")
    batch = encode_prompts(proc, [rec], "safegrpo")
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 4      # 56x56 -> 2x2 merged patches
    with pytest.raises(ValueError, match="row 7 has .* tokens, more than max_prompt_length=10"):
        encode_prompts(proc, [rec], "safegrpo", max_prompt_length=10, row_ids=[7])
