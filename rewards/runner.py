"""Runs the configured reward functions on a batch of completions, concurrently, under a per-call timeout.

Each function is called once per batch, in its own worker thread, with the prompts, the completions and the
dataset columns it accepts (all of them if it takes **kwargs). Its output is checked: one float or None per
completion, finite. Anything else stops the run with a RewardError naming the function, the row and the fix,
rather than training on a silently wrong signal.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import math
import time
import numbers
from typing import Callable

import torch

from rl.errors import RewardError
from rewards.registry import load_reward


def _accepted(fn: Callable, columns: dict) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return columns
    return {k: v for k, v in columns.items() if k in params}


def _check_output(name: str, out, n: int) -> list[float]:
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if not hasattr(out, "__len__") or isinstance(out, (str, bytes, dict)):
        raise RewardError(f"reward function {name} returned {type(out).__name__}; it must return a list with one "
                          "float (or None) per completion")
    if len(out) != n:
        raise RewardError(f"reward function {name} returned {len(out)} values for {n} completions; it must "
                          "return exactly one float (or None) per completion")
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {name} returned {v!r} for completion {i}; return a float, or "
                              "None where the reward does not apply")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward function {name} returned {v} for completion {i}; rewards must be finite: "
                              "return None where the reward does not apply")
        values.append(float(v))
    return values


class RewardRunner:
    def __init__(self, specs: list[str], weights: list[float] | None = None, timeout_s: float = 60.0,
                 options: dict[str, dict] | None = None):
        self.fns = [load_reward(s) for s in specs]
        self.names = [getattr(fn, "__name__", spec.split(":")[-1]) for fn, spec in zip(self.fns, specs)]
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(specs), dtype=torch.float32)
        self.timeout_s = timeout_s
        self.options = options or {}

    def _call(self, i: int, prompts: list, completions: list, columns: dict) -> list[float]:
        fn, name = self.fns[i], self.names[i]
        kwargs = _accepted(fn, {**columns, **self.options.get(name, {})})
        try:
            out = fn(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}. Fix the function, or run "
                              "with --debug for its traceback") from e
        return _check_output(name, out, len(completions))

    def __call__(self, prompts: list, completions: list, columns: dict) -> torch.Tensor:
        """-> rewards (N, F): one column per function, NaN where a function returned None."""
        pool = cf.ThreadPoolExecutor(max_workers=len(self.fns), thread_name_prefix="reward")
        try:
            deadline = time.monotonic() + self.timeout_s  # the calls start together: one deadline for all
            futures = [pool.submit(self._call, i, prompts, completions, columns) for i in range(len(self.fns))]
            cols = []
            for name, future in zip(self.names, futures):
                try:
                    cols.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
                except cf.TimeoutError:
                    raise RewardError(f"reward function {name} took longer than rewards.timeout_s = "
                                      f"{self.timeout_s:g} s on one batch; make it faster or raise the limit") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return torch.tensor(cols, dtype=torch.float32).T  # (N, F)

    def combine(self, per_function: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions, skipping None (NaN) entries: (N, F) -> (N,)."""
        return torch.nansum(per_function * self.weights, dim=1)
