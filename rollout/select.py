"""`rollout.engine: auto | native | vllm` -> an engine, with the choice and its reason logged."""

from __future__ import annotations

import importlib.util
import logging

from rl.errors import ConfigError
from rollout.native import NativeEngine

log = logging.getLogger("tandem")


def make_engine(kind: str, model, tokenizer):
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if kind == "vllm":
        raise ConfigError("rollout.engine is vllm, but this version of Tandem has no vLLM engine yet; "
                          "use rollout.engine native (or auto)")
    if kind == "auto":
        reason = ("vLLM is installed but this version of Tandem has no vLLM engine yet" if vllm_installed
                  else "vLLM is not installed")
        log.info("rollout engine: native (%s)", reason)
    return NativeEngine(model, tokenizer)
