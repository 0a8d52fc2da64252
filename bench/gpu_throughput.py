"""GRPO throughput of a randomly initialised Qwen2.5-VL-3B-size model on one GPU (no downloads).

    python bench/gpu_throughput.py [--steps 4] [--prompts 8] [--group 8] [--tokens 256]
    python bench/gpu_throughput.py --size tiny --device cpu      # the same code path, small, on CPU

Each step is the full GRPO step of safegrpo.trainer (rollout with the KV cache, reference and
policy log-probs, clipped loss + KL, backward, AdamW), in bf16 autocast with fp32 master weights
and fp32 log-probs, FlashAttention-2 when flash_attn is importable (else SDPA), on prompts with
one image each. Rewards are random numbers (no tokenizer can read a random model's text); the
work per step is the same. Prints tokens/s per GPU per full step and model FLOPs utilisation
(6 x trainable parameters x tokens through the update, plus 2 x parameters x tokens for the
rollout and the reference pass, over the step time, against the GPU's bf16 dense peak).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safegrpo.rl.grpo import group_advantages, kl_penalty, policy_loss  # noqa: E402
from safegrpo.model import default_attention  # noqa: E402
from safegrpo.rl.rollout import generate  # noqa: E402
from safegrpo.rl.forward import completion_logprobs  # noqa: E402

SIZES = {  # Qwen2.5-VL-3B-Instruct's published sizes, and a tiny stand-in for a CPU smoke run
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, vision_depth=32, vision_hidden=1280, vision_heads=16,
               vision_intermediate=3420, out_hidden=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, vision_depth=1, vision_hidden=32, vision_heads=2,
                 vision_intermediate=64, out_hidden=64),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def build(size: str, device, attn: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    s = SIZES[size]
    V = s["vocab_size"]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=V, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                         num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                         num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
                         if size == "3b" else {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                         bos_token_id=V - 10, eos_token_id=V - 9, pad_token_id=V - 10, tie_word_embeddings=True),
        vision_config=dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], num_heads=s["vision_heads"],
                           intermediate_size=s["vision_intermediate"], out_hidden_size=s["out_hidden"],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31] if size == "3b" else [0]),
        image_token_id=V - 5, video_token_id=V - 4, vision_start_token_id=V - 3, vision_end_token_id=V - 2)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = V - 9
    return model


def prompts(model, n: int, text_len: int, grid: int, device) -> dict:
    """n left-padded prompts: <vision_start> image <vision_end> + random text, one image each."""
    c = model.config
    n_img = grid * grid // 4                                     # tokens after the 2x2 merge
    rows = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        text = torch.randint(0, c.text_config.vocab_size - 16, (text_len,), generator=g)
        rows.append(torch.cat([torch.tensor([c.vision_start_token_id]), torch.full((n_img,), c.image_token_id),
                               torch.tensor([c.vision_end_token_id]), text]))
    ids = torch.stack(rows)
    patch = 3 * 2 * 14 * 14
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(n * grid * grid, patch, generator=g).to(device),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * n).to(device),
            "mm_token_type_ids": (ids == c.image_token_id).long().to(device)}


def sub_batch(batch: dict, a: int, b: int, grid: int) -> dict:
    """Prompts [a, b) of a `prompts` batch (one image of grid x grid patches each)."""
    per = grid * grid
    return {k: (v[a * per:b * per] if k == "pixel_values" else v[a:b]) for k, v in batch.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per completion")
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--grid", type=int, default=16, help="image patches per side (16 -> 64 image tokens)")
    ap.add_argument("--micro-prompts", type=int, default=2,
                    help="prompts (whole groups) per forward/backward of the update; the token-mean loss "
                         "is normalised by the step's total token count, so the split does not change it")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                    help="gradient checkpointing (default: on for 3b, off for tiny)")
    args = ap.parse_args()
    if args.grad_ckpt is None:
        args.grad_ckpt = args.size != "tiny"
    dev = torch.device(args.device)
    attn = default_attention(dev)
    policy = build(args.size, dev, attn).train()
    ref = build(args.size, dev, attn).eval().requires_grad_(False).to(torch.bfloat16)  # never trained: bf16
    if args.grad_ckpt:
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
    policy.model.visual.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, fused=dev.type == "cuda")
    batch = prompts(policy, args.prompts, args.text_len, args.grid, dev)
    n_img = [1] * args.prompts
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    G, times, tokens, t_roll, t_ref, n_new = args.group, [], [], [], [], []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        policy.eval()
        with amp(), torch.no_grad():
            ro = generate(policy, batch, group_size=G, max_new_tokens=args.tokens,
                          eos_token_id=policy.generation_config.eos_token_id,
                          pad_token_id=policy.config.text_config.pad_token_id, seeds=[step * 1000 + b for b in range(args.prompts)])
        ids, mask = ro.completion_ids, ro.mask
        sync()
        t1 = time.perf_counter()
        rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(step))
        adv = group_advantages(rewards, G).to(dev)
        n_tok = mask.sum()
        splits = [(a, min(a + args.micro_prompts, args.prompts)) for a in range(0, args.prompts, args.micro_prompts)]
        with amp(), torch.no_grad():                             # the reference pass, whole groups per forward
            ref_logp = torch.cat([completion_logprobs(ref, sub_batch(batch, a, b, args.grid), ids[a * G:b * G],
                                                      mask[a * G:b * G], G) for a, b in splits])
        sync()
        t2 = time.perf_counter()
        policy.train()
        for a, b in splits:                                      # the update: whole groups per forward/backward
            mb = sub_batch(batch, a, b, args.grid)
            rows = slice(a * G, b * G)
            m = mask[rows]
            with amp():
                logp = completion_logprobs(policy, mb, ids[rows], m, G)
            per_tok = policy_loss(logp, logp.detach(), adv[rows], m) + 0.01 * kl_penalty(logp, ref_logp[rows]) * m
            (per_tok * m).sum().div(n_tok).backward()                         # token-mean over the step
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            t_roll.append(t1 - t0)
            t_ref.append(t2 - t1)
            n_new.append(int(mask.sum()))
            tokens.append(int(mask.sum()) + int(batch["attention_mask"].sum()))
    n_params = sum(p.numel() for p in policy.parameters())
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    t, tok = statistics.median(times), statistics.median(tokens)
    tr, tf = statistics.median(t_roll), statistics.median(t_ref)
    tu = t - tr - tf
    flops = (6 * n_train + 2 * n_params + 2 * n_params) * tok  # update (fwd+bwd), reference, rollout
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mfu = lambda f, s: f", MFU {100 * f / s / (peak * 1e12):.1f}%" if peak else ""     # noqa: E731
    print(f"gpu_throughput: {name}, {n_params / 1e9:.2f} B parameters ({attn}), {args.prompts} prompts x {G}, "
          f"{args.tokens} new tokens: {t:.2f} s/step, {tok / t:,.0f} tokens/s/GPU per full step"
          + mfu(flops, t) + (f" of {peak:.0f} TFLOP/s bf16" if peak else ""))
    print(f"gpu_throughput phases: rollout {tr:.2f} s ({statistics.median(n_new) / tr:,.0f} new tokens/s), "
          f"reference {tf:.2f} s, update {tu:.2f} s{mfu(6 * n_train * tok, tu)} (update MFU: 6 x trainable "
          "parameters x tokens)")


if __name__ == "__main__":
    main()
