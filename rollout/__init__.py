"""Rollout engines: generate G completions per prompt with sampling log-probabilities.

    from rollout import SamplingParams, NativeEngine          # VLLMEngine where vLLM is installed
    engine = NativeEngine(model, tokenizer)
    outs = engine.generate(prompt_token_ids, SamplingParams(max_tokens=256, n=8))
"""

import kernels as _kernels  # noqa: F401  (rl/__init__.py explains the shadowing check)
import rl  # noqa: F401  (runs that check)
from rollout.engine import Completion, Engine, SamplingParams
from rollout.environment import Environment, load_environment
from rollout.native import NativeEngine
from rollout.select import make_engine
from rollout.vllm_engine import VLLMEngine  # imports vLLM only when constructed

__all__ = ["Completion", "Engine", "Environment", "NativeEngine", "SamplingParams", "VLLMEngine", "load_environment",
           "make_engine"]
