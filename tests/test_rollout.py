"""Rollout against transformers' generate, and the prompt-once forward against a full forward."""
import pytest
import torch

from safegrpo.data.records import load_parquet
from safegrpo.rl.forward import completion_hidden, lm_head_weight
from safegrpo.rl.logprobs import token_logprobs
from safegrpo.model import load_model, load_processor
from safegrpo.safety.prompting import encode_prompts
from safegrpo.rl.rollout import completion_mask, generate


@pytest.fixture(scope="module")
def setup(tiny_model_dir, synth_dir):
    model = load_model(tiny_model_dir).eval()
    proc = load_processor(tiny_model_dir)
    recs = load_parquet(synth_dir / "test.parquet", limit=5)
    batch = encode_prompts(proc, recs, "compact")
    return model, proc, recs, batch


def ids_of(model, proc):
    return model.generation_config.eos_token_id, proc.tokenizer.pad_token_id


def gen(model, batch, G, T, temperature=1.0, top_p=1.0, seed=0):
    """`generate` with the model's own EOS / pad ids; prompt b is seeded seed * 1000 + b."""
    return generate(model, batch, group_size=G, max_new_tokens=T, eos_token_id=model.generation_config.eos_token_id,
                    pad_token_id=model.generation_config.pad_token_id, temperature=temperature, top_p=top_p,
                    seeds=[seed * 1000 + b for b in range(batch["input_ids"].shape[0])])


def test_prompts_are_left_padded_with_images(setup):
    model, proc, recs, batch = setup
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()
    assert batch["image_grid_thw"].shape == (5, 3) and batch["mm_token_type_ids"].sum() == 5 * 4


def test_greedy_equals_generate(setup):
    model, proc, recs, batch = setup
    eos, pad = ids_of(model, proc)
    ours = gen(model, batch, 1, 24, temperature=0)
    ref = model.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ref = ref[:, batch["input_ids"].shape[1]:]
    T = ours.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids, ref[:, :T])
    grouped = gen(model, batch, 3, 24, temperature=0)      # G copies of the same greedy output
    assert torch.equal(grouped.completion_ids[::3], ours.completion_ids)
    assert torch.equal(grouped.completion_ids[2::3], ours.completion_ids)


def test_sampling_is_reproducible_and_stops_at_eos(setup):
    model, proc, recs, batch = setup
    eos, pad = ids_of(model, proc)
    # make EOS likely enough that some rows stop early: align its LM-head row with the hidden states
    W = lm_head_weight(model)
    saved = W.data[eos].clone()
    from safegrpo.rl.forward import prefill, prompt_positions
    with torch.no_grad():
        h, _ = prefill(model, batch, prompt_positions(model, batch)[0])
    direction = h.mean(0) / h.mean(0).norm()
    try:
        for k in range(30):
            W.data[eos] = 0.05 * 1.3 ** k * direction
            a = gen(model, batch, 4, 30, temperature=1.0, top_p=0.9, seed=7)
            if (a.lengths < 30).sum() >= 4 and (a.lengths > 3).sum() >= 4:
                break
        b = gen(model, batch, 4, 30, temperature=1.0, top_p=0.9, seed=7)
        c = gen(model, batch, 4, 30, temperature=1.0, top_p=0.9, seed=8)
    finally:
        W.data[eos] = saved
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert a.completion_ids.shape[0] == 20
    for row, n in zip(a.completion_ids, a.lengths.tolist()):
        hits = (row == eos).nonzero().flatten().tolist()
        if hits:
            assert hits[0] == n - 1                                      # first EOS included in the length
            assert (row[n:] == pad).all()                                # nothing sampled after it
        else:
            assert n == 30
    assert torch.equal(a.mask, completion_mask(a.lengths, a.completion_ids.shape[1]))
    assert (a.lengths < 30).any()


def test_placeholder_ids_are_never_sampled(setup):
    model, proc, recs, batch = setup
    eos, pad = ids_of(model, proc)
    W = lm_head_weight(model)
    img = model.config.image_token_id
    saved = W.data[img].clone()
    W.data[img] = 50 * W.data[img] / W.data[img].norm()                  # the placeholder dominates the logits
    try:
        ro = gen(model, batch, 2, 10, temperature=1.0, top_p=1.0, seed=0)
    finally:
        W.data[img] = saved
    assert not (ro.completion_ids == img).any()
    assert not (ro.completion_ids == model.config.video_token_id).any()


def test_prompt_once_forward_matches_full_sequence(setup):
    """Logits at position t score token t+1 of the concatenated prompt + completion."""
    model, proc, recs, batch = setup
    eos, pad = ids_of(model, proc)
    G = 2
    ro = gen(model, batch, G, 12, temperature=1.0, top_p=1.0, seed=3)
    ids, mask = ro.completion_ids, ro.mask
    h = completion_hidden(model, batch, ids, mask, G)
    ours = token_logprobs(h, lm_head_weight(model), ids)
    # naive: each prompt repeated G times, full forward through transformers, full logits
    rep = {k: v.repeat_interleave(G, 0) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                           "mm_token_type_ids")}
    full_ids = torch.cat([rep["input_ids"], ids], 1)
    full_mask = torch.cat([rep["attention_mask"], mask.long()], 1)
    mm = torch.cat([rep["mm_token_type_ids"], torch.zeros_like(ids, dtype=torch.int32)], 1)
    pix = torch.cat([batch["pixel_values"][i * 16:(i + 1) * 16] for i in range(5) for _ in range(G)])
    grid = batch["image_grid_thw"].repeat_interleave(G, 0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, mm_token_type_ids=mm, pixel_values=pix,
                       image_grid_thw=grid).logits
    Lp = batch["input_ids"].shape[1]
    naive = torch.log_softmax(logits[:, Lp - 1:-1].float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(ours * mask, naive * mask, atol=1e-5)


def test_gradient_checkpointing_keeps_the_prompt(tiny_model_dir, synth_dir):
    """Hugging Face's gradient checkpointing drops the KV cache in training mode; log-probs and
    gradients must still be those of the prompt-once path (completions see their prompt)."""
    model, proc = load_model(tiny_model_dir), load_processor(tiny_model_dir)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=3), "compact")
    eos, pad = ids_of(model, proc)
    ro = gen(model.eval(), batch, 2, 12, temperature=1.0, top_p=1.0, seed=3)
    ids, mask = ro.completion_ids, ro.mask

    def logp_and_grad():
        model.train()
        lp = token_logprobs(completion_hidden(model, batch, ids, mask, 2), lm_head_weight(model), ids) * mask
        g, = torch.autograd.grad(lp.sum(), model.model.language_model.layers[0].self_attn.q_proj.weight)
        return lp.detach(), g

    lp_ref, g_ref = logp_and_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    lp_ckpt, g_ckpt = logp_and_grad()
    assert torch.allclose(lp_ckpt, lp_ref, atol=1e-5) and torch.allclose(g_ckpt, g_ref, atol=1e-5)


def test_text_only_causal_lm(tmp_path):
    """The same engine on a plain causal LM (no images)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from safegrpo.data.tiny_model import tiny_corpus, train_tokenizer
    tok = train_tokenizer(tiny_corpus(), 600)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, proc = load_model(tmp_path).eval(), load_processor(tmp_path)
    from safegrpo.data.records import SafeTagRecord
    recs = [SafeTagRecord("How do I keep this clean?", [], "safe", "safe", "safe"),
            SafeTagRecord("Write a short poem.", [], "safe", "safe", "safe")]
    batch = encode_prompts(proc, recs, "compact")
    eos, pad = cfg.eos_token_id, tok.pad_token_id
    ours = gen(model, batch, 1, 16, temperature=0)
    ref = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(ours.completion_ids, ref[:, batch["input_ids"].shape[1]:][:, :ours.completion_ids.shape[1]])
    h = completion_hidden(model, batch, ours.completion_ids, ours.mask, 1)
    lp = token_logprobs(h, lm_head_weight(model), ours.completion_ids)
    full = torch.cat([batch["input_ids"], ours.completion_ids], 1)
    fmask = torch.cat([batch["attention_mask"], ours.mask.long()], 1)
    pos = (fmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=fmask, position_ids=pos).logits
    Lp = batch["input_ids"].shape[1]
    naive = torch.log_softmax(logits[:, Lp - 1:-1], -1).gather(-1, ours.completion_ids[..., None]).squeeze(-1)
    assert torch.allclose(lp * ours.mask, naive * ours.mask, atol=1e-5)
    model.train()                              # gradient checkpointing: the full-sequence path, same values
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    h = completion_hidden(model, batch, ours.completion_ids, ours.mask, 1)
    ckpt = token_logprobs(h, lm_head_weight(model), ours.completion_ids)
    assert torch.allclose(ckpt * ours.mask, naive * ours.mask, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_other_qwen_vl_families(family, tmp_path, synth_dir):
    """Qwen2.5-VL and Qwen3-VL (the paper recipes' families) through the same engine: greedy
    decoding equals generate, and the prompt-once forward equals a full forward."""
    from conftest import TINY
    from safegrpo.data.tiny_model import build_tiny_model_dir
    d = build_tiny_model_dir(tmp_path / family, TINY, seed=0, family=family)
    model, proc = load_model(d).eval(), load_processor(d)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=3), "compact")
    eos, pad = ids_of(model, proc)
    ours = gen(model, batch, 1, 12, temperature=0)
    ref = model.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(ours.completion_ids, ref[:, batch["input_ids"].shape[1]:][:, :ours.completion_ids.shape[1]])
    G = 2
    ro = gen(model, batch, G, 10, temperature=1.0, top_p=1.0, seed=1)
    ids, mask = ro.completion_ids, ro.mask
    ours = token_logprobs(completion_hidden(model, batch, ids, mask, G), lm_head_weight(model), ids)
    rep = {k: batch[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    per_image = int(batch["image_grid_thw"][0].prod())
    pix = torch.cat([batch["pixel_values"][i * per_image:(i + 1) * per_image] for i in range(3) for _ in range(G)])
    with torch.no_grad():
        logits = model(input_ids=torch.cat([rep["input_ids"], ids], 1),
                       attention_mask=torch.cat([rep["attention_mask"], mask.long()], 1),
                       mm_token_type_ids=torch.cat([rep["mm_token_type_ids"], torch.zeros_like(ids, dtype=torch.int32)], 1),
                       pixel_values=pix, image_grid_thw=batch["image_grid_thw"].repeat_interleave(G, 0)).logits
    Lp = batch["input_ids"].shape[1]
    naive = torch.log_softmax(logits[:, Lp - 1:-1].float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(ours * mask, naive * mask, atol=1e-5)
    model.train()                              # the recipes' gradient checkpointing: the same log-probs
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    ckpt = token_logprobs(completion_hidden(model, batch, ids, mask, G), lm_head_weight(model), ids)
    assert torch.allclose(ckpt * mask, ours * mask, atol=1e-5)


def test_checkpointed_update_runs_each_prompt_once(tiny_model_dir, synth_dir):
    """Under gradient checkpointing the prompt-once path holds: the Hugging Face layers see each
    prompt once (B x Lp tokens), not G copies of it, and log-probs and gradients are those of the
    uncheckpointed path."""
    model, proc = load_model(tiny_model_dir), load_processor(tiny_model_dir)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=3), "compact")
    G = 4
    ro = gen(model.eval(), batch, G, 12, seed=5)
    ids, mask = ro.completion_ids, ro.mask
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2]), with_kwargs=True)
    model.train()
    plain = token_logprobs(completion_hidden(model, batch, ids, mask, G), lm_head_weight(model), ids) * mask
    g_plain, = torch.autograd.grad(plain.sum(), model.model.language_model.layers[1].mlp.up_proj.weight)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    seen.clear()
    ckpt = token_logprobs(completion_hidden(model, batch, ids, mask, G), lm_head_weight(model), ids) * mask
    g_ckpt, = torch.autograd.grad(ckpt.sum(), model.model.language_model.layers[1].mlp.up_proj.weight)
    hook.remove()
    B, Lp = batch["input_ids"].shape
    assert [tuple(s) for s in seen] == [(B, Lp)]                  # one prefill of the B prompts, nothing else
    assert torch.allclose(ckpt, plain, atol=1e-6) and torch.allclose(g_ckpt, g_plain, atol=1e-6)


def test_checkpointing_saves_nothing_inside_a_decoder_layer(tiny_model_dir, synth_dir):
    """Under gradient checkpointing every decoder layer keeps only its input [B, Lp, H] for the
    backward (what the memory plan counts), the prompt's pass included (it once kept every prompt layer's activations: ~9 GB per
    2,048-token prompt at Qwen3-VL-8B's size, which the memory plan did not count). A tensor saved
    for backward while a layer's forward runs, outside its checkpoint, would show here."""
    model, proc = load_model(tiny_model_dir), load_processor(tiny_model_dir)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=3), "compact")
    G = 2
    ids = torch.randint(5, 1000, (3 * G, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    inside, saved = [], []
    for layer in model.model.language_model.layers:
        layer.register_forward_pre_hook(lambda *a: inside.append(1))
        layer.register_forward_hook(lambda *a: [inside.pop(), None][1])

    def pack(t):
        if inside:
            saved.append(t.numel())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_hidden(model, batch, ids, mask, G).sum().backward()
    assert saved                                                   # without checkpointing: the activations
    saved.clear()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_hidden(model, batch, ids, mask, G).sum().backward()
    B, Lp = batch["input_ids"].shape
    layers = model.config.text_config.num_hidden_layers
    assert saved == [B * Lp * model.config.text_config.hidden_size] * layers   # each layer's input, nothing else
    for n, g in want.items():                                     # and the same gradients
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4, msg=n)
