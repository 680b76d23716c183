"""`rollout.engine: auto | native | vllm` -> an engine, with the choice and its reason logged."""

from __future__ import annotations

import logging

from rl.errors import ConfigError
from rollout.native import NativeEngine
from rollout import vllm_compat

log = logging.getLogger("tandem")


def make_engine(kind: str, model, tokenizer, *, model_dir=None, lora_rank: int = 16, max_model_len: int = 2048,
                kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.3, share_weights: bool = True,
                seed: int = 0, enforce_eager: bool | None = None, decode_4bit: bool = False,
                max_batch: int | None = None):
    """The engine for `kind`. vLLM needs the model's directory (it loads the weights itself, then the policy
    shares them). `auto` uses it only inside the tested range of releases; `vllm` also outside it, warning."""
    if kind in ("auto", "vllm"):
        reason, untested = vllm_compat.version_status(vllm_compat.installed_version())
        if reason is None and untested is not None and kind == "auto":
            reason = f"{untested.split(';')[0]}; rollout.engine vllm would try it"
        if reason is None and kind == "auto" and any(getattr(p, "quant_state", None) is not None
                                                     for p in model.parameters()):
            # vLLM can share a 4-bit base (rollout.engine vllm), but on one H200 the native engine's rollout
            # was the faster at every shape measured (benchmarks/RESULTS.md, "vLLM or the native engine")
            reason = ("a 4-bit base: the native engine generated 3.0x faster than vLLM at 8 x 256 tokens and 2.6x "
                      "at 64 x 1024 (Qwen2.5-1.5B QLoRA, one H200); rollout.engine vllm shares it with vLLM")
        if reason is None and model_dir is None:
            reason = "the model has no directory on disk for vLLM to load (e.g. a random-init model in memory)"
        if reason is None:
            from rollout.vllm_engine import VLLMEngine

            why = "requested" if kind == "vllm" else "installed, in the tested range"
            log.info("rollout engine: vLLM (%s)", why)
            try:
                engine = VLLMEngine(model, tokenizer, model_dir, lora_rank=lora_rank, max_model_len=max_model_len,
                                    kv_cache_gb=kv_cache_gb, gpu_memory_utilization=gpu_memory_utilization,
                                    share_weights=share_weights, seed=seed, enforce_eager=enforce_eager,
                                    max_batch=max_batch)
                engine.selection = f"vLLM ({why})"
                return engine
            except RuntimeError as e:
                if kind == "vllm":
                    how = "" if "rollout.engine native" in str(e) else "; use rollout.engine native"
                    raise ConfigError(f"rollout.engine is vllm, but {e}{how}") from None
                reason = str(e)
        elif kind == "vllm":
            raise ConfigError(f"rollout.engine is vllm, but {reason}. Tandem's vLLM engine is tested with vLLM "
                              f"{' and '.join(vllm_compat.TESTED)} ({vllm_compat.INSTALL}); or use "
                              "rollout.engine native")
        log.info("rollout engine: native (%s)", reason)
    else:
        reason = f"rollout.engine {kind}"
    engine = NativeEngine(model, tokenizer, max_length=max_model_len, read_4bit=decode_4bit)
    engine.selection = f"native ({reason})"  # the start-up summary says which engine runs and why
    return engine
