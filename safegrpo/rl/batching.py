"""How a GRPO step's prompts are cut into forward/backward passes.

    slice_prompts   prompts a..b-1 of an encoded batch, with their images' patches
    passes_of       a mini-batch's passes (prompt ranges): a fixed number of prompts each,
                    or as many whole groups as fit in a token budget
    split_to        the same prompts in exactly n passes (every rank must run as many)

A group (a prompt and its G completions) is never split: the prompt-once forward runs a
prompt once for all its samples. The token-mean loss does not depend on the split.
"""
from __future__ import annotations


def slice_prompts(batch: dict, a: int, b: int, images_per_prompt: list[int]) -> dict:
    """Prompts a..b-1 of an encoded batch, with their images' patches, left padding trimmed."""
    mask = batch["attention_mask"][a:b]
    keep = int(mask.sum(-1).max())
    out = {k: batch[k][a:b, -keep:] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
    if batch.get("image_grid_thw") is not None:
        i0, i1 = sum(images_per_prompt[:a]), sum(images_per_prompt[:b])
        patches = batch["image_grid_thw"].prod(-1)
        p0, p1 = int(patches[:i0].sum()), int(patches[:i1].sum())
        if i1 > i0:
            out["image_grid_thw"] = batch["image_grid_thw"][i0:i1]
            out["pixel_values"] = batch["pixel_values"][p0:p1]
    return out


def passes_of(costs: list[int], prompts: int, token_budget: int = 0) -> list[tuple[int, int]]:
    """The prompt ranges [a, b) of one mini-batch's forward/backward passes: `prompts` per pass,
    or with token_budget > 0 as many whole groups as fit in that many tokens (`costs[i]`: prompt
    i once plus its G completions, the prompt-once forward), at least one. The token-mean loss
    does not depend on the split."""
    passes, a = [], 0
    while a < len(costs):
        b = a + 1
        if token_budget > 0:
            used = costs[a]
            while b < len(costs) and used + costs[b] <= token_budget:
                used += costs[b]
                b += 1
        else:
            b = min(a + prompts, len(costs))
        passes.append((a, b))
        a = b
    return passes


def split_to(passes: list[tuple[int, int]], costs: list[int], n: int) -> list[tuple[int, int]]:
    """The same prompts in exactly n passes (n >= len(passes), n <= number of prompts): split the
    costliest pass of more than one prompt where its halves' costs balance, until there are n.
    Under torchrun every rank must run the same number of forward/backward passes per
    mini-batch (FSDP's collectives pair up pass by pass), so ranks whose prompts are shorter
    split further; no pass grows, so the token budget still holds."""
    passes = list(passes)
    while len(passes) < n:
        k = max((i for i, (a, b) in enumerate(passes) if b - a > 1), key=lambda i: sum(costs[slice(*passes[i])]))
        a, b = passes[k]
        run = [sum(costs[a:m]) for m in range(a + 1, b)]          # cost of [a, m) for each cut m
        total = sum(costs[a:b])
        m = a + 1 + min(range(len(run)), key=lambda i: abs(2 * run[i] - total))
        passes[k:k + 1] = [(a, m), (m, b)]
    return passes
