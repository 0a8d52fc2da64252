"""Reward functions for the trainer: the SafeGRPO rule by default, or a plug-in with verl's
custom-reward signature (`grpo.reward: package.module:function`).

    compute_score(data_source, solution_str, ground_truth, extra_info) -> float (or {"score": ...})
    compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list     (batch form)

The batch form is recognised by its parameter names (`solution_strs`). A plug-in receives, per
completion, data_source "safetag", the completion's text, ground_truth = extra_info = the
record's gold tags plus its meta columns. A call that raises scores 0 for its completion (for
the batch form: for the whole batch) and is counted and reported with the row; with
grpo.reward_timeout_s > 0 the plug-in runs in a worker process, and a call that runs longer is
stopped (the worker is replaced) and scores 0, counted too. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import inspect
import multiprocessing as mp
import warnings
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field


@dataclass
class Scores:
    scores: list[float]
    errors: list[tuple[int, str]] = field(default_factory=list)     # (row, what went wrong)
    timeouts: list[int] = field(default_factory=list)


def _load(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"grpo.reward {spec!r}: expected package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"grpo.reward {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"grpo.reward {spec!r} is not callable")
    return fn


def _is_batch(fn) -> bool:
    try:
        return "solution_strs" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _number(value) -> float:
    value = value.get("score") if isinstance(value, dict) else value
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {value!r}")
    return value


def _call_one(spec: str, text: str, info: dict) -> float:
    return _number(_load(spec)(data_source="safetag", solution_str=text, ground_truth=info, extra_info=info))


def _call_batch(spec: str, texts: list, infos: list) -> list:
    out = _load(spec)(data_sources=["safetag"] * len(texts), solution_strs=texts, ground_truths=infos,
                      extra_infos=infos)
    if len(out) != len(texts):
        raise ValueError(f"returned {len(out)} scores for {len(texts)} completions")
    return [_number(v) for v in out]


class PluginReward:
    """A plug-in reward (see the module docstring); `__call__(texts, infos) -> Scores`."""

    def __init__(self, spec: str, timeout_s: float = 0.0):
        self.spec, self.timeout = spec, timeout_s
        self.fn = _load(spec)                    # fail at start-up, not at the first step
        self.batch = _is_batch(self.fn)
        self.pool = None

    def _worker(self):
        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
        return self.pool

    def _restart(self):
        pool, self.pool = self.pool, None
        for p in getattr(pool, "_processes", {}).values():   # a stuck call: the worker is stopped
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, fn, *args):
        if self.timeout <= 0:
            return fn(*args)
        future = self._worker().submit(fn, *args)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            self._restart()
            raise

    def __call__(self, texts: list[str], infos: list[dict], labels: list[str] | None = None) -> Scores:
        """Scores of the completions `texts`; labels (e.g. "step 3, data/train.parquet: row 17,
        sample 2") name them in the warnings about calls that raised or timed out."""
        out = Scores([0.0] * len(texts))
        name = (lambda i: labels[i]) if labels else (lambda i: f"completion {i}")     # noqa: E731
        if self.batch:
            try:
                out.scores = self._run(_call_batch, self.spec, texts, infos)
            except FutureTimeout:
                out.timeouts = list(range(len(texts)))
            except Exception as e:  # a plug-in's own error: reported, the batch scores 0
                out.errors = [(i, f"{type(e).__name__}: {e}") for i in range(len(texts))]
        else:
            for i, (text, info) in enumerate(zip(texts, infos)):
                try:
                    out.scores[i] = self._run(_call_one, self.spec, text, info)
                except FutureTimeout:
                    out.timeouts.append(i)
                except Exception as e:  # a plug-in's own error: reported, this completion scores 0
                    out.errors.append((i, f"{type(e).__name__}: {e}"))
        if out.errors:
            row, why = out.errors[0]
            warnings.warn(f"grpo.reward {self.spec}: {len(out.errors)} call(s) raised, scored 0 "
                          f"(first: {name(row)}: {why})", stacklevel=2)
        if out.timeouts:
            warnings.warn(f"grpo.reward {self.spec}: {len(out.timeouts)} call(s) ran past "
                          f"grpo.reward_timeout_s={self.timeout}, scored 0 (first: {name(out.timeouts[0])})",
                          stacklevel=2)
        return out

    def close(self):
        if self.pool is not None:
            self._restart()
