"""Reward functions for the trainer: the SafeGRPO rule by default, or a plug-in with verl's
custom-reward signature (`reward.plugin: package.module:function`).

    compute_score(data_source, solution_str, ground_truth, extra_info) -> float (or {"score": ...})
    compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list     (batch form)

The batch form is recognised by its parameter names (`solution_strs`). A plug-in receives, per
completion, data_source "safetag", the completion's text, ground_truth = extra_info = the
record's gold tags plus its meta columns (copies: a plug-in that changes them in place changes
nothing here). A call that raises, calls sys.exit, or returns anything but a number (a string
such as "0.75", a bool) scores 0 for its completion (for the batch form: for the whole batch)
and is counted and reported with the row. The plug-in runs in reward.workers worker processes
(so that not even os._exit or a crash in it can end training), started and with the plug-in
imported before any call; the calls of a step run on them at once. With reward.timeout_s > 0
the step waits at most timeout x ceil(calls / workers) in all: calls not finished then are
stopped (the workers are replaced) and score 0, counted as timeouts. A worker that dies is
replaced and its calls counted as errors. A plug-in that fails to import is one error at
start-up. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import inspect
import multiprocessing as mp
import warnings
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field


@dataclass
class Scores:
    scores: list[float]
    errors: list[tuple[int, str]] = field(default_factory=list)     # (row, what went wrong)
    timeouts: list[int] = field(default_factory=list)


def _load(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"reward.plugin {spec!r}: expected package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.plugin {spec!r}: {e}") from None
    except (Exception, SystemExit) as e:               # the plug-in's own code failed at import
        raise ValueError(f"reward.plugin {spec!r}: importing {module} raised {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward.plugin {spec!r} is not callable")
    return fn


def _is_batch(fn) -> bool:
    try:
        return "solution_strs" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _number(value) -> float:
    value = value.get("score") if isinstance(value, dict) else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):      # "0.75", True: a plug-in's bug
        raise TypeError(f"returned {value!r} ({type(value).__name__}), not a number")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {value!r}")
    return value


def _call_one(spec: str, text: str, info: dict) -> float:
    return _number(_load(spec)(data_source="safetag", solution_str=text, ground_truth=dict(info),
                               extra_info=dict(info)))


def _call_batch(spec: str, texts: list, infos: list) -> list:
    n = len(texts)
    out = _load(spec)(data_sources=["safetag"] * n, solution_strs=list(texts), ground_truths=[dict(i) for i in infos],
                      extra_infos=[dict(i) for i in infos])
    if len(out) != n:
        raise ValueError(f"returned {len(out)} scores for {n} completions")
    return [_number(v) for v in out]


def _warm(spec: str) -> None:
    """Run in a new worker before any timed call: the plug-in's import is not a call's time."""
    _load(spec)


def _why(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"the plug-in called sys.exit({e.code!r})"
    if isinstance(e, BrokenProcessPool):
        return "the reward worker process died"
    return f"{type(e).__name__}: {e}"


class PluginReward:
    """A plug-in reward (see the module docstring); `__call__(texts, infos) -> Scores`."""

    def __init__(self, spec: str, timeout_s: float = 0.0, workers: int = 4):
        self.spec, self.timeout, self.workers = spec, timeout_s, max(1, workers)
        self.fn = _load(spec)                    # fail at start-up, not at the first step
        self.batch = _is_batch(self.fn)
        self.pool = None

    def _pool(self):
        """The worker processes, started (and the plug-in imported in each) without a time limit."""
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            for f in [self.pool.submit(_warm, self.spec) for _ in range(self.workers)]:
                f.result()
        return self.pool

    def _restart(self):
        pool, self.pool = self.pool, None
        for p in getattr(pool, "_processes", {}).values():   # stuck calls: the workers are stopped
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)

    def _run_all(self, fn, calls: list[tuple]) -> list:
        """fn(*args) for each args of `calls`: [result, or the exception it raised, or
        FutureTimeout when the step's deadline passed first]."""
        futures = [self._pool().submit(fn, *args) for args in calls]
        deadline = self.timeout * -(-len(calls) // self.workers) if self.timeout > 0 else None
        wait(futures, timeout=deadline)
        out, stuck, broken = [], False, False
        for f in futures:
            if not f.done():
                out.append(FutureTimeout())
                stuck = True
                continue
            e = f.exception()
            broken |= isinstance(e, BrokenProcessPool)
            out.append(f.result() if e is None else e)
        if stuck or broken:
            self._restart()
        return out

    def __call__(self, texts: list[str], infos: list[dict], labels: list[str] | None = None) -> Scores:
        """Scores of the completions `texts`; labels (e.g. "step 3, data/train.parquet: row 17,
        sample 2") name them in the warnings about calls that failed or timed out."""
        n = len(texts)
        out = Scores([0.0] * n)
        name = (lambda i: labels[i]) if labels else (lambda i: f"completion {i}")     # noqa: E731
        if self.batch:
            got = self._run_all(_call_batch, [(self.spec, list(texts), [dict(i) for i in infos])])[0]
            if isinstance(got, FutureTimeout):
                out.timeouts = list(range(n))
            elif isinstance(got, BaseException):
                out.errors = [(i, _why(got)) for i in range(n)]
            else:
                out.scores = got
        else:
            got = self._run_all(_call_one, [(self.spec, t, dict(i)) for t, i in zip(texts, infos)])
            for i, g in enumerate(got):
                if isinstance(g, FutureTimeout):
                    out.timeouts.append(i)
                elif isinstance(g, BaseException):
                    out.errors.append((i, _why(g)))
                else:
                    out.scores[i] = g
        if out.errors:
            row, why = out.errors[0]
            warnings.warn(f"reward.plugin {self.spec}: {len(out.errors)} call(s) failed, scored 0 "
                          f"(first: {name(row)}: {why})", stacklevel=2)
        if out.timeouts:
            warnings.warn(f"reward.plugin {self.spec}: {len(out.timeouts)} call(s) ran past "
                          f"reward.timeout_s={self.timeout}, scored 0 (first: {name(out.timeouts[0])})",
                          stacklevel=2)
        return out

    def close(self):
        if self.pool is not None:
            self._restart()
