"""Runs the configured reward functions on a batch of completions, concurrently, under a per-call timeout.

Each function is called once per batch, in its own worker thread, with the prompts, the completions and the
dataset columns it accepts (all of them if it takes **kwargs). Its output is checked: one float or None per
completion, finite. Anything else stops the run with a RewardError naming the function, the row and the fix,
rather than training on a silently wrong signal.

A function still running `rewards.timeout_s` seconds after the batch's calls started stops the run too (a
step cannot go on without its rewards), with a RewardError naming the function, the limit and the fix. Python
cannot kill a thread, so the late call is left behind; its thread is a daemon, so that it does not keep the
stopped process alive until it returns (a pool's workers are joined at exit: a function that never returned
hung the process after the message).
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
import time
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
        results: list = [None] * len(self.fns)  # each call's values, or the exception it raised

        def run(i: int) -> None:
            try:
                results[i] = self._call(i, prompts, completions, columns)
            except BaseException as e:  # re-raised in the caller's thread, with its traceback
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,), name=f"reward-{name}", daemon=True)
                   for i, name in enumerate(self.names)]
        deadline = time.monotonic() + self.timeout_s  # the calls start together: one deadline for all
        for t in threads:
            t.start()
        for name, t in zip(self.names, threads):
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise RewardError(
                    f"reward function {name} did not return within rewards.timeout_s = {self.timeout_s:g} s (one "
                    f"call on {len(completions)} completions), so the run stops: a step cannot go on without its "
                    f"rewards. Make the function faster, or raise the limit (--rewards.timeout_s "
                    f"{2 * self.timeout_s:g}, or timeout_s in the YAML's rewards section)")
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return torch.tensor(results, dtype=torch.float32).T  # (N, F)

    def combine(self, per_function: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions, skipping None (NaN) entries: (N, F) -> (N,)."""
        return torch.nansum(per_function * self.weights, dim=1)
