"""Importing what a user names in a config: `pkg.module:name` or `path/to/file.py:name` (reward functions,
environments). Errors say what failed and how to fix it, prefixed with the config's words for the thing."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_where(where: str, label: str, error: type[Exception], prefix: str) -> ModuleType:
    """The module part of a spec: a file path (ends in .py or holds a /) or an importable module name. `label`
    begins each error message (e.g. "reward 'x.py:f'"); `prefix` names the module a file is loaded as."""
    if not (where.endswith(".py") or "/" in where):
        try:
            return importlib.import_module(where)
        except ImportError as e:
            raise error(f"{label}: cannot import module {where!r} ({e}); check the name and that it is installed "
                        "or on PYTHONPATH") from None
    path = Path(where)
    if not path.is_file():
        raise error(f"{label}: file {path} does not exist; check the path (relative paths start from the current "
                    "directory)")
    name = f"{prefix}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # lets the module's own functions pickle and import siblings
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise error(f"{label}: importing {path} failed with {type(e).__name__}: {e}") from None
    return module
