"""Finding reward functions by name: a built-in, `pkg.module:function`, or `path/to/file.py:function`.

    fn = load_reward("math_accuracy")
    fn = load_reward("examples/rewards.py:strict_boxed")
"""

from __future__ import annotations

import difflib
from typing import Callable

from rl.errors import RewardError
from rl.imports import import_where
from rewards import builtin, code

BUILTINS: dict[str, Callable] = {
    "math_accuracy": builtin.math_accuracy,
    "format": builtin.format,
    "overlong_penalty": builtin.overlong_penalty,
    "countdown": builtin.countdown,
    "python_tests": code.python_tests,
}


def load_reward(spec: str) -> Callable:
    """A reward function from a built-in name, `pkg.module:function` or `path/to/file.py:function`."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        close = difflib.get_close_matches(spec, list(BUILTINS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RewardError(f"unknown reward {spec!r}; {hint}use a built-in ({', '.join(BUILTINS)}), "
                          "pkg.module:function, or path/to/file.py:function")
    where, _, attr = spec.rpartition(":")
    module = import_where(where, f"reward {spec!r}", RewardError, "tandem_reward")
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise RewardError(f"reward {spec!r}: {where} has no function {attr!r}; it has: {', '.join(names)}")
    return fn
