"""How much of a GRPO gradient carries the combined-tag signal (a diagnostic for the tiny recipe).

    python bench/grpo_signal.py [--model runs/tiny/sft] [--prompts 32] [--group 4]

From one batch of training prompts and the model's own samples (temperature 1) it computes
three gradients over all trainable parameters (vision tower frozen, as in the recipe):
  full     the GRPO policy-gradient loss on every completion token (group advantages, token-mean);
  c-only   the same loss on the combined-tag value token alone;
  target   cross-entropy of the right combined tag at the same positions (what a labelled
           example would teach);
  demo     cross-entropy on whole warm-start demonstrations (random side tags, right combined
           tag), i.e. supervised learning of the same decision,
and prints their cosines with `target`. A low cos(full, target) with a high cos(c-only, target)
means the signal is present but buried in zero-mean noise from the other sampled tokens.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safegrpo.data.records import load_parquet  # noqa: E402
from safegrpo.rl.grpo import group_advantages  # noqa: E402
from safegrpo.model import load_model, load_processor  # noqa: E402
from safegrpo.safety.prompting import encode_prompts  # noqa: E402
from safegrpo.safety.reward import reward_breakdown  # noqa: E402
from safegrpo.rl.rollout import completion_mask, generate  # noqa: E402
from safegrpo.data.synth import demonstration  # noqa: E402
from safegrpo.rl.forward import completion_logprobs  # noqa: E402
from safegrpo.rl.rollout import decode_completions  # noqa: E402
from safegrpo.safety.judge import refusal_rule  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny/sft", help="a warm-start checkpoint (make train writes this one)")
    ap.add_argument("--data", default="data/synth/train.parquet")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        sys.exit(f"{a.model}: no model directory (run `make train` first, or pass --model)")
    torch.manual_seed(0)
    model, proc = load_model(a.model), load_processor(a.model)
    tok, G = proc.tokenizer, a.group
    model.model.visual.requires_grad_(False)
    recs = load_parquet(a.data, limit=a.prompts)
    batch = encode_prompts(proc, recs, "compact")
    with torch.no_grad():
        ro = generate(model.eval(), batch, group_size=G, max_new_tokens=96,
                      eos_token_id=model.generation_config.eos_token_id, pad_token_id=tok.pad_token_id,
                      seeds=[a.seed * 1000 + b for b in range(len(recs))])
    ids, mask = ro.completion_ids, ro.mask                                       # [N, T]
    gold = [r.tags for r in recs for _ in range(G)]
    rule = refusal_rule("keywords")
    rewards = torch.tensor([reward_breakdown(t, g, rule)["total"] for t, g in
                            zip(decode_completions(tok, ids, ro.lengths), gold)])
    adv = group_advantages(rewards, G)                                           # [N]
    cid = tok.convert_tokens_to_ids("<combined_safe>")
    pos = (ids == cid).float().argmax(-1) + 1                                    # the tag's value token
    has = (ids == cid).any(-1) & (pos < ids.shape[1])
    at_c = torch.zeros_like(mask, dtype=torch.float32)
    at_c[has, pos[has]] = 1
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(loss) -> torch.Tensor:
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])

    model.train()
    n_tok = mask.sum()
    full = grad(-(adv[:, None] * completion_logprobs(model, batch, ids, mask, G) * mask).sum() / n_tok)
    c_only = grad(-(adv[:, None] * completion_logprobs(model, batch, ids, mask, G) * at_c).sum() / n_tok)
    right = torch.tensor([tok.convert_tokens_to_ids(g["combine_tag"]) for g in gold])
    fixed = ids.clone()
    fixed[has, pos[has]] = right[has]
    target = grad(-(completion_logprobs(model, batch, fixed, mask, G) * at_c).sum() / n_tok)
    rng = random.Random(0)
    demos = [re.sub(r"<combined_safe>\w+<", f"<combined_safe>{r.combine_tag}<", demonstration(r, rng)) + tok.eos_token
             for r in recs]
    enc = [tok(d, add_special_tokens=False)["input_ids"] for d in demos]
    T = max(map(len, enc))
    x = torch.full((len(recs), T), tok.pad_token_id)
    for i, e in enumerate(enc):
        x[i, :len(e)] = torch.tensor(e)
    dmask = completion_mask(torch.tensor([len(e) for e in enc]), T)
    demo = grad(-(completion_logprobs(model, batch, x, dmask, 1) * dmask).sum() / dmask.sum())
    cos = lambda u, v: float(u @ v / u.norm() / v.norm())
    print(f"grpo_signal: {a.prompts} prompts x {G}, mean reward {rewards.mean():.3f}; cosine with the "
          f"combined-tag target: full GRPO {cos(full, target):.3f}, c-only GRPO {cos(c_only, target):.3f}, "
          f"supervised demos {cos(demo, target):.3f}; |full| / |c-only| = {full.norm() / c_only.norm():.1f}")


if __name__ == "__main__":
    main()
