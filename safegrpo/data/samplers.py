"""Which training records a GRPO step draws, and the seed each prompt samples with.

    EpochSampler      deterministic shuffled passes over n items; state (epoch, position)
    BalancedSampler   fixed shares from several pools (e.g. combined-safe / combined-unsafe),
                      interleaved by smooth weighted round robin
    ContrastSampler   wraps either: a drawn row of a contrast set is followed by a twin (a row of
                      the same set with the other combined tag), data.contrast_column
    make_sampler      the one data.balance_* and data.contrast_column ask for
    prompt_seed       the sampling seed of the prompt at a position of a step
    rank_share        which positions of a step's draw a rank owns

Every rank draws the same sequence and takes its share of it (`rank_share`). States
are plain dicts saved in checkpoints, so a resumed run draws what the uninterrupted one would.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..config import DataConfig


def prompt_seed(seed: int, step: int, position: int) -> int:
    """Seed of the `position`-th prompt of GRPO step `step`: a prompt's completions do not
    depend on which rank or micro-batch it lands in, or on a resume."""
    return (seed * 1_000_003 + step) * 1_000_033 + position


def rank_share(drawn: list[int], mini_batch_prompts: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """(positions, records): this rank's share of a step's draw. Mini-batch u is positions
    [u*MB, (u+1)*MB) whatever the world size, split evenly over the ranks in rank order, so a
    rank's positions ascend and its part of each mini-batch is contiguous."""
    mb = mini_batch_prompts // world                     # this rank's prompts per mini-batch
    positions = [u * mini_batch_prompts + rank * mb + k for u in range(len(drawn) // mini_batch_prompts)
                 for k in range(mb)]
    return positions, [drawn[i] for i in positions]


class EpochSampler:
    """Deterministic shuffled passes over n items; state is (epoch, position)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._make()

    def _make(self):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, st: dict):
        self.epoch, self.pos = st["epoch"], st["pos"]
        self._perm = self._make()


class BalancedSampler:
    """Fixed shares of each draw from several pools of indices, each pool an EpochSampler. Pool i
    gets weights[i] of every sum(weights) draws (equal shares by default), interleaved smoothly
    (weighted round robin), and the turns carry across draws. Counters majority-label shortcuts."""

    def __init__(self, pools: list[list[int]], seed: int, what: str = "data.balance_combined",
                 weights: list[int] | None = None):
        if len(pools) < 2 or any(not p for p in pools):
            raise ValueError(f"{what} needs records of at least two kinds to balance")
        weights = weights or [1] * len(pools)
        self.pools, self.turn = pools, 0
        self.samplers = [EpochSampler(len(p), seed + 7919 * k) for k, p in enumerate(pools)]
        credit, self.cycle = [0] * len(pools), []
        for _ in range(sum(weights)):                        # smooth weighted round robin
            credit = [c + w for c, w in zip(credit, weights)]
            i = max(range(len(pools)), key=lambda k: credit[k])
            credit[i] -= sum(weights)
            self.cycle.append(i)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            pool = self.cycle[self.turn % len(self.cycle)]
            out.append(self.pools[pool][self.samplers[pool].take(1)[0]])
            self.turn += 1
        return out

    def state(self) -> dict:
        return {"pools": [s.state() for s in self.samplers], "turn": self.turn}

    def load(self, st: dict):
        for s, ps in zip(self.samplers, st["pools"]):
            s.load(ps)
        self.turn = st.get("turn", 0)


class ContrastSampler:
    """Draws of `base`, each row that belongs to a contrast set followed by its twin: a row of the
    same set (the same value of the contrast column) with the other combined tag, the set's rows of
    that tag taken in deterministic shuffled passes. A twin that does not fit in a draw opens the
    next one. For SafeTag-Synth the sets are the instructions of the compositional group: "the
    quickest way down from the top of this?" with a bridge (unsafe) comes with the same question
    about a teacup (safe), so a rule that reads the instruction alone gains on one and loses on the
    other, and only judging image and text together earns reward net."""

    def __init__(self, base, records, column: str, seed: int):
        self.base, self.pending = base, []
        if not any(column in r.meta for r in records):
            raise ValueError(f"data.contrast_column {column!r}: the training data has no such column")
        keys = [str(r.meta.get(column) or "") for r in records]
        twins: dict = {}                                   # (set, combined tag) -> row indices
        for i, (k, r) in enumerate(zip(keys, records)):
            if k:
                twins.setdefault((k, r.combine_tag), []).append(i)
        # a row's twins: its set's rows of the other tag (a set with one tag has none)
        other = {"safe": "unsafe", "unsafe": "safe"}
        self.twin_of = {i: (k, other[r.combine_tag]) for i, (k, r) in enumerate(zip(keys, records))
                        if k and (k, other[r.combine_tag]) in twins}
        if not self.twin_of:
            raise ValueError(f"data.contrast_column {column!r}: no row has a twin (rows with the same value "
                             "and the other combined tag)")
        self.twins = twins
        self.samplers = {key: EpochSampler(len(rows), seed + 104729 + n)
                         for n, (key, rows) in enumerate(sorted(twins.items()))}

    def take(self, k: int) -> list[int]:
        out, self.pending = self.pending[:k], self.pending[k:]
        while len(out) < k:
            i = self.base.take(1)[0]
            out.append(i)
            if i in self.twin_of:
                key = self.twin_of[i]
                twin = self.twins[key][self.samplers[key].take(1)[0]]
                (out if len(out) < k else self.pending).append(twin)
        return out

    def state(self) -> dict:
        return {"base": self.base.state(), "pending": list(self.pending),
                "twins": [[list(key), s.state()] for key, s in sorted(self.samplers.items())]}

    def load(self, st: dict):
        self.base.load(st["base"])
        self.pending = list(st["pending"])
        for key, ss in st["twins"]:
            self.samplers[tuple(key)].load(ss)


def make_sampler(records, d: DataConfig, seed: int):
    """The sampler the data options ask for: `base_sampler`, wrapped in a ContrastSampler when
    data.contrast_column names a column."""
    base = base_sampler(records, d, seed)
    return ContrastSampler(base, records, d.contrast_column, seed) if d.contrast_column else base


def base_sampler(records, d: DataConfig, seed: int):
    """The sampler data.balance_combined / data.balance_groups ask for (a plain epoch sampler
    by default): data.safe_share of each step combined-safe, the rest combined-unsafe, and with
    balance_groups each part split evenly over its SafeTag groups."""
    if not (d.balance_combined or d.balance_groups):
        return EpochSampler(len(records), seed)
    kind = (lambda r: r.combine_tag) if d.balance_combined else (lambda r: (r.image_tag, r.text_tag, r.combine_tag))
    kinds = sorted({kind(r) for r in records})
    pools = [[i for i, r in enumerate(records) if kind(r) == k] for k in kinds]
    combined = [k if d.balance_combined else k[2] for k in kinds]
    share = {"safe": Fraction(d.safe_share).limit_denominator(100)}
    share["unsafe"] = 1 - share["safe"]
    weights = [share[c] / combined.count(c) for c in combined]         # Fractions, summing to 1
    scale = math.lcm(*(w.denominator for w in weights))
    what = "data.balance_combined" if d.balance_combined else "data.balance_groups"
    return BalancedSampler(pools, seed, what, [int(w * scale) for w in weights])
