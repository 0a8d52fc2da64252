"""The lean decode step against the Hugging Face step it replaces, family by family."""
import pytest
import torch

from safegrpo.data.records import load_parquet
from safegrpo.rl.decode import LeanDecoder, lean_supported
from safegrpo.rl.forward import continuation_positions, prefill, prompt_positions, step
from safegrpo.model import load_model, load_processor
from safegrpo.safety.prompting import encode_prompts
from safegrpo.rl.rollout import generate


def _compare_steps(model, batch, G=2, steps=6, seed=0, relative=False):
    """Decode the same random tokens with both steps over identical caches; max |hidden diff|
    (relative: divided by max |hidden| of the Hugging Face step)."""
    pos, next_pos = prompt_positions(model, batch)
    with torch.no_grad():
        _, prompt_cache = prefill(model, batch, pos)                 # once per prompt (lean)
        _, cache = prefill(model, batch, pos, reserve=steps)          # repeated G times (Hugging Face)
        cache.batch_repeat_interleave(G)
    B, Lp = batch["input_ids"].shape
    N = B * G
    next_pos = next_pos.repeat_interleave(G)
    attn = torch.cat([batch["attention_mask"].repeat_interleave(G, 0),
                      batch["attention_mask"].new_ones(N, steps)], 1)
    kv = (prompt_cache.layers[0].keys.dtype, prompt_cache.layers[0].values.dtype)
    page = 4                                                        # small pages: a row spans several
    per_row = -(-steps // page)
    lean = LeanDecoder(model, B, Lp, N * per_row, page, G, kv, batch["input_ids"].device)
    for b in range(B):                                              # prompt b in slot b, its rows b*G..b*G+G-1
        lean.add_prompt(b, [cl.keys[b] for cl in prompt_cache.layers], [cl.values[b] for cl in prompt_cache.layers],
                        batch["attention_mask"][b])
    rows = torch.arange(N, device=batch["input_ids"].device)
    # pages handed out in a shuffled order, as a long rollout leaves them
    table = (torch.randperm(N * per_row, generator=torch.Generator().manual_seed(seed)) + 1).view(N, per_row)
    ids = torch.randint(10, model.config.get_text_config().vocab_size - 10, (steps, N),
                        generator=torch.Generator().manual_seed(seed)).to(batch["input_ids"].device)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for t in range(steps):
            ours = lean.step(ids[t], next_pos + t, rows // G, rows % G, torch.full_like(rows, t), table.to(rows.device),
                             canonical=t % 2 == 0)           # both attention paths
            ref = step(model, ids[t][:, None], attn[:, :Lp + t + 1], continuation_positions(model, next_pos, 1, offset=t),
                       cache)[:, -1]
            worst = max(worst, (ours - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return worst / scale if relative else worst


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_lean_step_equals_hf_step_vl(family, tmp_path, synth_dir):
    from conftest import TINY
    from safegrpo.data.tiny_model import build_tiny_model_dir
    d = build_tiny_model_dir(tmp_path / family, TINY, seed=0, family=family)
    model, proc = load_model(d).eval(), load_processor(d)
    assert lean_supported(model)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=3), "compact")  # left-padded
    assert not batch["attention_mask"][:, 0].all()
    assert _compare_steps(model, batch) < 1e-5
    eos, pad = model.generation_config.eos_token_id, proc.tokenizer.pad_token_id
    kw = dict(temperature=1.0, top_p=0.9)
    a = generate(model, batch, group_size=3, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad, seeds=[3, 4, 5], lean=True, **kw)
    b = generate(model, batch, group_size=3, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad, seeds=[3, 4, 5], lean=False, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.lengths, b.lengths)


def _text_lm(kind, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from safegrpo.data.tiny_model import tiny_corpus, train_tokenizer
    tok = train_tokenizer(tiny_corpus(), 600)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=tok.pad_token_id)
    cls, cfg = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "qwen3": (Qwen3ForCausalLM, Qwen3Config),
                "llama": (LlamaForCausalLM, LlamaConfig)}[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}      # Qwen3: head_dim not hidden / heads
    torch.manual_seed(0)
    cls(cfg(**common, **extra)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_model(tmp_path).eval(), load_processor(tmp_path)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_lean_step_equals_hf_step_text(kind, tmp_path):
    from safegrpo.data.records import SafeTagRecord
    model, proc = _text_lm(kind, tmp_path)
    assert lean_supported(model)
    recs = [SafeTagRecord("How do I keep this clean?", [], "safe", "safe", "safe"),
            SafeTagRecord("Write a short poem about the sea, please.", [], "safe", "safe", "safe")]
    batch = encode_prompts(proc, recs, "compact")
    assert _compare_steps(model, batch, G=3) < 1e-5


def test_unsupported_models_fall_back_and_say_why(tmp_path):
    from safegrpo.rl.decode import decode_path
    model, _ = _text_lm("qwen2", tmp_path)
    assert decode_path(model).startswith("lean decoder")
    model.config.model_type = "gemma"                          # unknown architecture: Hugging Face step
    assert not lean_supported(model)
    assert decode_path(model) == ("Hugging Face step (the lean decoder does not apply: model type 'gemma' is not "
                                  "one of llama, qwen2, qwen2_5_vl, qwen2_vl, qwen3, qwen3_vl)")
    model.config.model_type = "qwen2"
    model.model.rotary_emb.rope_type = "dynamic"               # RoPE that changes with the length
    assert not lean_supported(model) and "dynamic RoPE" in decode_path(model)
    model.model.rotary_emb.rope_type = "default"
    model.config.use_sliding_window = True
    assert "sliding-window" in decode_path(model)


@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast"])
def test_lean_step_in_bf16(mode, tiny_model_dir, synth_dir):
    """The GPU recipes' precisions, on the CPU: bf16 weights, or fp32 weights under bf16 autocast.
    The lean step runs (no dtype clash) and stays within bf16 rounding of the Hugging Face step."""
    import contextlib
    model = load_model(tiny_model_dir).eval()
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
    proc = load_processor(tiny_model_dir)
    batch = encode_prompts(proc, load_parquet(synth_dir / "test.parquet", limit=3), "compact")
    if mode == "bf16-weights":
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16-autocast" else contextlib.nullcontext()
    # relative to bf16's unit roundoff u = 2^-8: measured over seeds 0-4, 1.4-2.2 u with bf16 weights
    # (every operand rounded), 0.5-0.9 u under autocast (fp32 weights, bf16 matmuls)
    bound = {"bf16-weights": 3.0, "bf16-autocast": 1.25}[mode] * 2 ** -8
    with ctx:
        for seed in range(3):
            assert _compare_steps(model, batch, G=2, steps=4, seed=seed, relative=True) < bound
