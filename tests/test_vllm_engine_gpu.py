"""vLLM engine, CUDA-only paths: between rollouts vLLM pauses and gives its KV cache's memory back, while the
weights (which are the policy's own tensors) stay where they are.

Needs a CUDA GPU and vLLM together (marked gpu and vllm): on CUDA 13 with torch 2.11 that is vLLM 0.26.0, whose
KV-cache release goes through rollout/vllm_compat.py's 0.26 path. Not yet run: README says so.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
pytest.importorskip("vllm")

from rl.config import LoraSection, ModelSection  # noqa: E402
from rl.model import load_policy, resolve_source  # noqa: E402
from rollout import SamplingParams  # noqa: E402
from rollout.vllm_engine import unsupported_reason  # noqa: E402

if unsupported_reason() is not None:
    pytest.skip(unsupported_reason(), allow_module_level=True)


@pytest.fixture(scope="module")
def setup():
    from rollout.vllm_engine import VLLMEngine

    policy = load_policy(ModelSection(name="smollm2-135m-instruct", dtype="bfloat16", kernels=False),
                         LoraSection(r=8), seed=0)
    model_dir, _ = resolve_source("smollm2-135m-instruct", 0, need_dir=True)
    engine = VLLMEngine(policy.model, policy.tokenizer, model_dir, lora_rank=8, max_model_len=512,
                        gpu_memory_utilization=0.3)  # on CUDA the KV cache takes what the share leaves
    prompts = [policy.tokenizer.encode(q) for q in ("What is 12 + 7?", "Name a colour.")]
    return policy, engine, prompts


def test_kv_cache_memory_is_released_between_rollouts_and_restored(setup):
    policy, engine, prompts = setup
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    first = engine.generate(prompts, params)
    assert engine.llm.llm_engine.is_sleeping()  # paused after the rollout
    torch.cuda.synchronize()
    free_asleep = torch.cuda.mem_get_info()[0]
    engine._wake()
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > 1e9  # the KV cache (GBs at this share) is given back while asleep
    engine._sleep()
    second = engine.generate(prompts, params)  # woken, generating, asleep again
    assert [g[0].token_ids for g in second] == [g[0].token_ids for g in first]


def test_shared_weights_stay_in_place_across_sleep(setup):
    """Level 0 sleep keeps the weights on the GPU: the policy's base tensors (views of vLLM's) still hold the
    same values at the same addresses, and the policy's forward is unchanged."""
    policy, engine, prompts = setup
    ids = torch.tensor([prompts[0]], device="cuda")
    policy.model.eval()
    with torch.no_grad():
        before = policy.model(input_ids=ids).logits.float()
        pointers = {n: p.data_ptr() for n, p in policy.model.named_parameters()}
        engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
        after = policy.model(input_ids=ids).logits.float()
    assert engine.shared and pointers == {n: p.data_ptr() for n, p in policy.model.named_parameters()}
    assert torch.equal(before, after)
