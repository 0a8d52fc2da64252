"""One decode step of the rollout engine against the HBM-bandwidth limit (random init, no downloads).

    python bench/gpu_decode.py                            # 3B- and 8B-size text stacks, batch 64 and 256
    python bench/gpu_decode.py --sizes tiny --device cpu   # the same code path, small, on CPU

For each size (Qwen2.5-VL-3B's and Qwen3-VL-8B's text stacks: hidden, layers, heads, KV heads,
MLP width and vocabulary of the released models, bf16 weights) and batch (rows = prompts x G),
it prefills prompts of --prompt-len tokens, decodes --context tokens, then times --steps more
decode steps: the lean decoder's step plus the LM head and the sampler, as the rollout runs
them (`rl/rollout.py`). The limit is the bytes one step must read (the text stack's weights and
LM head once, each prompt's cache once, each row's generated cache) over the device's copy
bandwidth, measured here with a large device-to-device copy. Prints ms/step, the limit, and
their ratio; results in bench/results.json under "gpu_decode".
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
sys.path.insert(0, str(ROOT / "bench"))

from results import record  # noqa: E402
from safegrpo.rl.decode import LeanDecoder  # noqa: E402
from safegrpo.rl.forward import prefill, prompt_positions  # noqa: E402
from safegrpo.rl.rollout import _next_tokens  # noqa: E402
from safegrpo.rl.sampling import row_keys  # noqa: E402

SIZES = {  # the released models' text stacks
    "3b": dict(cls="Qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "8b": dict(cls="Qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "tiny": dict(cls="Qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
}


def build(size: str, device, dtype):
    import transformers
    s = dict(SIZES[size])
    cls = s.pop("cls")
    cfg = getattr(transformers, f"{cls}Config")(**s, max_position_embeddings=32768, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, f"{cls}ForCausalLM")(cfg).to(dtype)
    return model.eval()


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_step(model, rows: int, G: int, prompt_len: int, context: int, steps: int, device) -> tuple[float, int]:
    """(median seconds per decode step, bytes it must read) at `rows` rows after `context` tokens."""
    B = rows // G
    V = model.config.vocab_size
    ids = torch.randint(10, V - 10, (B, prompt_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pos, nxt = prompt_positions(model, batch)
    last, cache = prefill(model, batch, pos)
    T = context + steps + 1
    kv = (cache.layers[0].keys.dtype, cache.layers[0].values.dtype)
    dec = LeanDecoder(model, B, prompt_len, rows, T, G, kv, device, dense=True)
    for b in range(B):
        dec.add_prompt(b, [cl.keys[b] for cl in cache.layers], [cl.values[b] for cl in cache.layers],
                       batch["attention_mask"][b])
    r = torch.arange(rows, device=device)
    prompt, g = r // G, r % G
    table = (r + 1)[:, None]
    W = model.get_output_embeddings().weight.float()
    keys = row_keys(range(B), G, device)
    h = last.repeat_interleave(G, 0)
    times = []
    for t in range(context + steps):
        tt = torch.full((rows,), t, device=device)
        sync(device)
        t0 = time.perf_counter()
        tok = _next_tokens(h, W, [], 1.0, 1.0, keys, tt)[0]           # (token, log-probs)
        h = dec.step(tok, nxt[prompt] + t, prompt, g, tt, table, canonical=True, t_max=t)
        sync(device)
        if t >= context:
            times.append(time.perf_counter() - t0)
    c, layers = model.config, model.config.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    el = next(model.parameters()).element_size()
    kv_token = 2 * layers * c.num_key_value_heads * head_dim * el
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * el
    read = weights + W.numel() * 4 + B * prompt_len * kv_token + rows * (context + steps // 2) * kv_token
    return statistics.median(times), read


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["3b", "8b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--context", type=int, default=512, help="tokens decoded before timing")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_decode: {name}, copy bandwidth {bw / 1e12:.2f} TB/s, {dtype}, prompts of {args.prompt_len}, "
          f"G {args.group}, {args.context} tokens decoded before timing")
    res = {}
    for size in args.sizes:
        model = build(size, device, dtype)
        for rows in args.batches:
            s, read = time_step(model, rows, args.group, args.prompt_len, args.context, args.steps, device)
            limit = read / bw
            res[f"{size}_b{rows}"] = {"ms_per_step": round(1e3 * s, 3), "limit_ms": round(1e3 * limit, 3),
                                      "bytes_per_step": read, "fraction_of_limit": round(limit / s, 3)}
            print(f"gpu_decode {size} batch {rows}: {1e3 * s:.2f} ms/step, limit {1e3 * limit:.2f} ms "
                  f"({read / 1e9:.2f} GB read per step), {limit / s:.1%} of the bandwidth limit")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record("gpu_decode", {"device": name, "copy_bandwidth_tb_s": round(bw / 1e12, 3), **res})


if __name__ == "__main__":
    main()
