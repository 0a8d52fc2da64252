"""Prompts with images of unequal sizes, two images in one prompt, and a text-only prompt in the
same batch: rollout against generate, prompt-once log-probs against one full forward per
sequence, and the trainer's micro-batch slicing against the whole batch."""
import pytest
import torch
from PIL import Image

from safegrpo.data.records import SafeTagRecord, load_parquet
from safegrpo.rl.forward import completion_hidden, lm_head_weight
from safegrpo.rl.logprobs import token_logprobs
from safegrpo.model import load_model, load_processor
from safegrpo.safety.prompting import encode_prompts
from safegrpo.rl.rollout import generate
from safegrpo.rl.batching import slice_prompts


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, synth_dir):
    model, proc = load_model(tiny_model_dir).eval(), load_processor(tiny_model_dir)
    base = load_parquet(synth_dir / "test.parquet", limit=4)
    wide = base[1].images[0].resize((112, 56))                       # 8 x 4 patches instead of 4 x 4
    tall = Image.new("RGB", (56, 112), (200, 30, 30))
    recs = [SafeTagRecord(base[0].prompt, base[0].images, "safe", "safe", "safe"),
            SafeTagRecord(base[1].prompt, [wide], "safe", "safe", "safe"),
            SafeTagRecord("Compare these two pictures.", [base[2].images[0], tall], "safe", "safe", "safe"),
            SafeTagRecord("Write a short poem.", [], "safe", "safe", "safe")]
    batch = encode_prompts(proc, recs, "compact")
    return model, proc, recs, batch


def test_the_batch_really_is_mixed(mixed):
    model, proc, recs, batch = mixed
    grids = batch["image_grid_thw"].prod(-1).tolist()
    assert len(grids) == 4 and len(set(grids)) >= 2                  # 4 images of 2+ sizes
    n_img = (batch["input_ids"] == model.config.vision_start_token_id).sum(-1).tolist()
    assert n_img == [1, 1, 2, 0]


def test_greedy_rollout_equals_generate(mixed):
    model, proc, recs, batch = mixed
    eos, pad = model.generation_config.eos_token_id, proc.tokenizer.pad_token_id
    ours = generate(model, batch, group_size=1, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad, temperature=0)
    ref = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ref = ref[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours.completion_ids, ref[:, :ours.completion_ids.shape[1]])


def _sampled(model, proc, batch, G=3):
    eos, pad = model.generation_config.eos_token_id, proc.tokenizer.pad_token_id
    return generate(model, batch, group_size=G, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad,
                    seeds=[5, 6, 7, 8])


def test_prompt_once_logprobs_equal_one_full_forward_per_sequence(mixed):
    model, proc, recs, batch = mixed
    G = 3
    ro = _sampled(model, proc, batch, G)
    ids, mask = ro.completion_ids, ro.mask
    ours = token_logprobs(completion_hidden(model, batch, ids, mask, G), lm_head_weight(model), ids)
    for n in range(ids.shape[0]):                                     # naive: no padding, no cache, one row
        one = encode_prompts(proc, [recs[n // G]], "compact")
        T = int(ro.lengths[n])
        full = torch.cat([one["input_ids"], ids[n:n + 1, :T]], 1)
        mm = one.get("mm_token_type_ids", torch.zeros_like(one["input_ids"], dtype=torch.int32))
        kw = {"mm_token_type_ids": torch.cat([mm, torch.zeros(1, T, dtype=mm.dtype)], 1)}
        if "pixel_values" in one:
            kw.update(pixel_values=one["pixel_values"], image_grid_thw=one["image_grid_thw"])
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), **kw).logits
        Lp = one["input_ids"].shape[1]
        naive = torch.log_softmax(logits[0, Lp - 1:Lp - 1 + T].float(), -1).gather(-1, ids[n, :T, None]).squeeze(-1)
        torch.testing.assert_close(ours[n, :T], naive, atol=2e-5, rtol=0)


def test_micro_batch_slices_equal_the_whole_batch(mixed):
    """Every split of the 4 prompts into micro-batches (as the trainer slices them: prompts,
    their images' patches, left padding trimmed) gives the whole batch's log-probs, also on
    the gradient-checkpointing path (prompt and completions as one sequence)."""
    model, proc, recs, batch = mixed
    G = 3
    ro = _sampled(model, proc, batch, G)
    ids, mask = ro.completion_ids, ro.mask
    n_img = [len(r.images) for r in recs]
    whole = token_logprobs(completion_hidden(model, batch, ids, mask, G), lm_head_weight(model), ids) * mask
    for cuts in ([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (2, 4)], [(0, 3), (3, 4)], [(0, 1), (1, 4)]):
        parts = []
        for a, b in cuts:
            sub = slice_prompts(batch, a, b, n_img)
            rows = slice(a * G, b * G)
            parts.append(token_logprobs(completion_hidden(model, sub, ids[rows], mask[rows], G),
                                        lm_head_weight(model), ids[rows]) * mask[rows])
        torch.testing.assert_close(torch.cat(parts), whole, atol=2e-5, rtol=0, msg=str(cuts))
    model.train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    try:
        for a, b in [(0, 2), (2, 4)]:
            rows = slice(a * G, b * G)
            ckpt = token_logprobs(completion_hidden(model, slice_prompts(batch, a, b, n_img), ids[rows], mask[rows], G),
                                  lm_head_weight(model), ids[rows]) * mask[rows]
            torch.testing.assert_close(ckpt, whole[rows], atol=2e-5, rtol=0)
    finally:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        model.eval()
