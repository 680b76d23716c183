"""Finding reward functions by name: a built-in, `pkg.module:function`, or `path/to/file.py:function`.

    fn = load_reward("math_accuracy")
    fn = load_reward("examples/rewards.py:strict_boxed")
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from rl.errors import RewardError
from rewards import builtin, code

BUILTINS: dict[str, Callable] = {
    "math_accuracy": builtin.math_accuracy,
    "format": builtin.format,
    "overlong_penalty": builtin.overlong_penalty,
    "countdown": builtin.countdown,
    "python_tests": code.python_tests,
}


def _from_file(path: Path, attr: str, spec: str):
    if not path.is_file():
        raise RewardError(f"reward {spec!r}: file {path} does not exist; check the path (relative paths start "
                          "from the current directory)")
    module_name = f"tandem_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # lets the module's own functions pickle and import siblings
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise RewardError(f"reward {spec!r}: importing {path} failed with {type(e).__name__}: {e}") from None
    return module


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
    if where.endswith(".py") or "/" in where:
        module = _from_file(Path(where), attr, spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardError(f"reward {spec!r}: cannot import module {where!r} ({e}); check the name and that "
                              "it is installed or on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise RewardError(f"reward {spec!r}: {where} has no function {attr!r}; it has: {', '.join(names)}")
    return fn
