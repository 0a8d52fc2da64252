"""The memory plan against hand arithmetic: the paper's Qwen3-VL-8B recipe on 4 x 80 GB (the
model described by its real config values, built on the meta device, no weights)."""
import pytest
import transformers

from safegrpo.config import load_config
from safegrpo.memory import GB, MemoryPlanError, model_size, plan_memory

H, L, I, HEADS, KVH, D, V = 4096, 36, 12288, 32, 8, 128, 151_936


@pytest.fixture(scope="module")
def qwen3_vl_8b():
    text = dict(hidden_size=H, num_hidden_layers=L, intermediate_size=I, num_attention_heads=HEADS,
                num_key_value_heads=KVH, head_dim=D, vocab_size=V,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=H, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24])
    return model_size(transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False))


def test_parameter_counts_by_hand(qwen3_vl_8b):
    per_layer = H * HEADS * D + 2 * H * KVH * D + HEADS * D * H + 2 * D + 3 * H * I + 2 * H
    assert qwen3_vl_8b.layer_params == L * per_layer == 6_946_071_552
    text = L * per_layer + 2 * V * H + H                                   # + embeddings, LM head, final norm
    assert 8.7e9 < qwen3_vl_8b.params and qwen3_vl_8b.params - text < 0.6e9  # the vision tower: ~0.55 B
    assert (qwen3_vl_8b.layers, qwen3_vl_8b.kv_heads, qwen3_vl_8b.head_dim) == (L, KVH, D)


def test_the_8b_recipe_fits_4_x_80_gb_and_every_figure_is_the_formula(qwen3_vl_8b):
    cfg = load_config("configs/qwen3_vl_8b_safegrpo.yaml", world_size=4)
    plan = plan_memory(cfg, qwen3_vl_8b, 4, 80 * GB)
    N, W = qwen3_vl_8b.params, 4
    assert plan.items["weights"] == N * 4 // W                            # fp32 master weights, sharded
    assert plan.items["optimizer"] == 2 * N * 4 // W                      # AdamW moments
    assert plan.items["reference"] == N * 4 // W and plan.items["gradients"] == N * 4 // W
    assert plan.items["gathered"] == N * 2                                 # a bf16 copy (mixed precision)
    kv_per_token = L * KVH * D * (2 + 2)
    assert kv_per_token == 144 * 1024                                      # 144 KiB of bf16 keys and values
    assert plan.items["KV cache"] == cfg.rollout.max_batch_tokens * kv_per_token
    S = cfg.train.micro_batch_tokens
    assert plan.items["activations"] == L * S * H * 2 + S * (6 * H + 3 * I) * 2       # checkpointed, bf16
    assert plan.rollout == plan.items["weights"] + plan.items["optimizer"] + plan.items["reference"] \
        + plan.items["gathered"] + plan.items["KV cache"]
    plan.check()                                                            # both phases fit
    assert plan.rollout < 0.9 * 80 * GB and plan.update < 0.9 * 80 * GB


def test_a_plan_that_does_not_fit_names_the_key(qwen3_vl_8b):
    everything = load_config("configs/qwen3_vl_8b_safegrpo.yaml", ["rollout.max_batch_tokens=0"], world_size=4)
    plan = plan_memory(everything, qwen3_vl_8b, 4, 80 * GB)
    assert plan.items["KV cache"] > 300 * GB                               # 64 prompts x 8 x 6k tokens at once
    with pytest.raises(MemoryPlanError, match="lower rollout.max_batch_tokens"):
        plan.check()
    big_pass = load_config("configs/qwen3_vl_8b_safegrpo.yaml", ["train.micro_batch_tokens=200000"], world_size=4)
    with pytest.raises(MemoryPlanError, match="lower train.micro_batch_tokens"):
        plan_memory(big_pass, qwen3_vl_8b, 4, 80 * GB).check()


def test_lora_drops_the_reference_and_shrinks_optimizer_and_gradients(qwen3_vl_8b):
    cfg = load_config("configs/qwen3_vl_8b_safegrpo.yaml", ["model.lora.rank=64", "model.lora.alpha=128"],
                      world_size=4)
    plan = plan_memory(cfg, qwen3_vl_8b, 4, 80 * GB)
    full = plan_memory(load_config("configs/qwen3_vl_8b_safegrpo.yaml", world_size=4), qwen3_vl_8b, 4, 80 * GB)
    # rank 64 on q, k, v, o (4096 -> 4096 / 1024 / 1024 / 4096) and gate, up, down (4096 <-> 12288)
    per_layer = 64 * ((H + HEADS * D) + 2 * (H + KVH * D) + (HEADS * D + H) + 3 * (H + I))
    Nt = L * per_layer
    assert Nt == 174_587_904
    N, W = qwen3_vl_8b.params, 4
    assert plan.items["reference"] == 0 and full.items["reference"] == N * 4 // W
    assert plan.items["optimizer"] == 2 * Nt * 4 // W and plan.items["gradients"] == Nt * 4 // W
    assert plan.items["weights"] == (N + Nt) * 4 // W
    saved = full.update - plan.update
    assert saved == (N * 4 // W) + (2 * N * 4 // W - 2 * Nt * 4 // W) + (N * 4 // W - Nt * 4 // W) - Nt * 4 // W


def test_pass_tokens_are_the_tokens_the_update_path_runs(qwen3_vl_8b):
    """Per pass of one prompt: on one process the lean layer math runs the prompt once, every
    layer checkpointed (the prompt pass too); sharded by FSDP2 the Hugging Face layers run under
    their own checkpointing, which drops the cache, so each of the G sequences carries its prompt."""
    over = ["train.micro_batch_tokens=0", "train.micro_batch_prompts=1"]
    Lp, G, T = 2048, 8, 4096
    assert qwen3_vl_8b.lean
    one = plan_memory(load_config("configs/qwen3_vl_8b_safegrpo.yaml", over, world_size=1), qwen3_vl_8b, 1, 80 * GB)
    four = plan_memory(load_config("configs/qwen3_vl_8b_safegrpo.yaml", over, world_size=4), qwen3_vl_8b, 4, 80 * GB)
    assert one.pass_tokens == Lp + G * T and four.pass_tokens == G * Lp + G * T
    for plan in (one, four):
        S = plan.pass_tokens
        assert plan.items["activations"] == L * S * H * 2 + S * (6 * H + 3 * I) * 2   # checkpointed, bf16
