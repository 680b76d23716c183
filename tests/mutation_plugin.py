"""pytest plugin for `make mutation` only (loaded with -p by pyproject.toml's [tool.mutmut]); not a test module.

It changes how the tests run, never what they check:
1. Imports what building a tiny policy needs (transformers' Llama modules, peft, bitsandbytes: ~4 s) and
   loads the SmolLM2 tokenizer once (rl.model.load_tokenizer, memoized: ~0.4 s a trainer, most of a tiny
   trainer's construction; no code under mutation, and nothing here modifies a tokenizer) at plugin load.
   mutmut's fork server loads the plugin when it collects the tests, so every mutant's worker, forked from it,
   starts with them. No torch computation runs in the fork server (a process forked after torch has
   computed can deadlock in its thread pool).
2. Runs a mutant's tests fastest first, by the durations mutmut measured (mutants/mutmut-stats.json): with
   -x, a mutant that a quick unit test kills never waits for the slow trainer tests.
3. Keeps each worker's torch on one thread: two workers share the two cores (tests/helpers.py's run config
   asks for two threads each, and four threads on two cores run several times slower).
"""

import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402,F401

import rl.model  # noqa: E402

_load_tokenizer = rl.model.load_tokenizer
_tokenizers: dict = {}


def _memoized_tokenizer(source, override):
    key = (str(source), str(override))
    if key not in _tokenizers:
        _tokenizers[key] = _load_tokenizer(source, override)
    return _tokenizers[key]


rl.model.load_tokenizer = _memoized_tokenizer
_memoized_tokenizer(None, None)


def pytest_runtest_setup(item):
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None  # the run config's train.num_threads is not obeyed here


def _durations() -> dict[str, float]:
    path = Path("mutmut-stats.json")  # mutmut runs pytest inside mutants/
    try:
        return json.loads(path.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}


def pytest_collection_modifyitems(config, items):
    durations = _durations()
    if durations:
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
