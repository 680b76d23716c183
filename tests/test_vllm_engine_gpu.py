"""vLLM engine on CUDA, with a bf16 and with a 4-bit (NF4) base: one copy of the base shared by vLLM and the
policy; the live adapter reaching vLLM; greedy agreement with the native engine up to bf16 near-ties; the KV
cache's memory given back between rollouts (the weights, the policy's own tensors, staying where they are) and
generation working after it comes back.

Needs a CUDA GPU and vLLM together (marked gpu and vllm): on CUDA 13 with torch 2.11 that is vLLM 0.26.0 (its
bitsandbytes built in; its KV-cache release goes through rollout/vllm_compat.py's 0.26 path). vLLM runs with
enforce_eager here, so that the tests start in seconds rather than compile.

vLLM's sleep-mode allocator (which the KV cache's release needs) serves one engine per process: a second engine
in the same process is skipped, with the command that runs it. benchmarks/gpu_check.py runs each base alone
(`pytest tests/test_vllm_engine_gpu.py -k bf16`, then `-k nf4`).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
pytest.importorskip("vllm")

from rl.config import LoraSection, ModelSection  # noqa: E402
from rl.model import load_policy, resolve_source  # noqa: E402
from rollout import NativeEngine, SamplingParams  # noqa: E402
from rollout.vllm_compat import has_bitsandbytes, installed_version  # noqa: E402
from rollout.vllm_engine import unsupported_reason  # noqa: E402
from tests.helpers import greedy_partings, next_token_logprobs, set_lora_b  # noqa: E402

if unsupported_reason() is not None:
    pytest.skip(unsupported_reason(), allow_module_level=True)

QUESTIONS = ["What is 12 + 7?", "Name a colour.", "Write one word.", "Count to three."]
BF16_LOGP = 0.25  # nats: both engines compute in bf16 here; the CPU tests measured gaps up to 0.054
# bf16 keeps 8 significant bits: a logit of 16-32 (these adapters give up to ~19) is stored 0.125 apart, and the
# engines' one-row decode and the model's prefill sum in other orders, so one token's log-prob may be off by
# ~2 spacings (BF16_LOGP; measured 0.09-0.27 on the H200 along whole completions, both engines alike) and the
# difference of two tokens' by twice that: a greedy parting is a near-tie when the model's gap is within it
BF16_PAIR = 2 * BF16_LOGP
SLACK = 2 * 2**30  # bytes: vLLM's buffers besides its KV cache (activations, sampler, LoRA slots, workspace)
BUILT: list[str] = []  # the base of the engine this process built


@pytest.fixture(scope="module", params=["bf16", "nf4"])
def setup(request):
    from rollout.vllm_engine import VLLMEngine

    four_bit = request.param == "nf4"
    if BUILT:
        pytest.skip(f"this process built vLLM's engine for the {BUILT[0]} base, and vLLM's sleep-mode allocator serves "
                    f"one engine per process: run `pytest tests/test_vllm_engine_gpu.py -k {request.param}` on its own")
    if four_bit and not has_bitsandbytes(installed_version()):
        pytest.skip("this vLLM has no bitsandbytes")
    torch.manual_seed(0)
    policy = load_policy(ModelSection(name="smollm2-135m-instruct", dtype="bfloat16", kernels=False,
                                      load_in_4bit=four_bit), LoraSection(r=8), seed=0)
    set_lora_b(policy.model, seed=1)
    torch.cuda.synchronize()
    used_policy = _used()
    model_dir, _ = resolve_source("smollm2-135m-instruct", 0, need_dir=True)
    BUILT.append(request.param)
    engine = VLLMEngine(policy.model, policy.tokenizer, model_dir, lora_rank=8, max_model_len=512,
                        gpu_memory_utilization=0.3, enforce_eager=True)
    torch.cuda.synchronize()
    used_engine = _used()
    prompts = [policy.tokenizer.encode(q) for q in QUESTIONS]
    yield dict(policy=policy, engine=engine, prompts=prompts, four_bit=four_bit, used_policy=used_policy,
               used_engine=used_engine)
    engine.close()


def _used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def _base_tensors(policy, four_bit):
    if four_bit:
        return {n: p for n, p in policy.model.named_parameters() if getattr(p, "quant_state", None) is not None}
    return {n: p for n, p in policy.model.named_parameters() if not p.requires_grad}


def test_one_copy_of_the_base(setup):
    """Every base tensor of the policy lies inside one of vLLM's, and the process's GPU memory grew by no more
    than vLLM's KV cache and buffers when the engine was built (measured by releasing the cache)."""
    engine, policy = setup["engine"], setup["policy"]
    ranges = [(p.untyped_storage().data_ptr(), p.untyped_storage().data_ptr() + p.untyped_storage().nbytes())
              for p in engine.vllm_model.parameters()]
    base = _base_tensors(policy, setup["four_bit"])
    inside = [n for n, p in base.items() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert len(inside) == len(base) >= 210, f"{len(inside)} of {len(base)} base tensors are vLLM's"
    engine.generate(setup["prompts"], SamplingParams(max_tokens=4, temperature=0))  # ends with the cache released
    torch.cuda.synchronize()
    used_released = _used()
    kv_cache = setup["used_engine"] - used_released
    grown = setup["used_engine"] - setup["used_policy"]
    print(f"GPU memory: policy {setup['used_policy'] / 2**30:.2f} GiB, +engine {grown / 2**30:.2f} GiB, of which "
          f"KV cache {kv_cache / 2**30:.2f} GiB; after the release {used_released / 2**30:.2f} GiB")
    assert kv_cache > 2**30  # the cache (GBs at this share) was given back
    assert grown <= kv_cache + SLACK
    assert used_released - setup["used_policy"] <= SLACK  # back to about the policy's own level


def test_lora_changes_reach_vllm_in_memory(setup):
    policy, engine, prompts = setup["policy"], setup["engine"], setup["prompts"]
    for seed in (2, 3):
        set_lora_b(policy.model, seed=seed)
        outs = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, stop_token_ids=[]))
        gaps, moved = [], []
        for prompt, group in zip(prompts, outs):
            token, theirs = group[0].token_ids[0], group[0].logprobs[0]
            mine = float(next_token_logprobs(policy.model, prompt)[token])
            with policy.model.disable_adapter():
                base = float(next_token_logprobs(policy.model, prompt)[token])
            gaps.append(abs(theirs - mine))
            moved.append(abs(mine - base))
        print(f"adapter {seed}: |vLLM - policy| {[round(g, 3) for g in gaps]}, |policy - base| "
              f"{[round(m, 3) for m in moved]}")
        assert max(gaps) < BF16_LOGP and max(moved) > 2 * BF16_LOGP


def test_greedy_agrees_with_the_native_engine_up_to_bf16_near_ties(setup):
    policy, engine, prompts = setup["policy"], setup["engine"], setup["prompts"]
    set_lora_b(policy.model, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[])
    ours = engine.generate(prompts, params)
    native = NativeEngine(policy.model, policy.tokenizer).generate(prompts, params)
    greedy_partings(policy.model, prompts, ours, native, BF16_PAIR)


def test_generation_works_again_after_the_cache_comes_back_and_the_weights_stayed(setup):
    """Between rollouts the cache is released (paused); the next rollout maps it again and generates the same
    greedy tokens; the policy's base tensors kept their addresses and values throughout."""
    policy, engine, prompts = setup["policy"], setup["engine"], setup["prompts"]
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    base = _base_tensors(policy, setup["four_bit"])
    pointers = {n: p.data_ptr() for n, p in base.items()}
    ids = torch.tensor([prompts[0]], device="cuda")
    policy.model.eval()
    with torch.no_grad():
        before = policy.model(input_ids=ids).logits.float()
    first = engine.generate(prompts, params)
    assert engine.llm.llm_engine.is_sleeping()  # paused, its cache released, after the rollout
    second = engine.generate(prompts, params)
    assert [g[0].token_ids for g in second] == [g[0].token_ids for g in first]
    with torch.no_grad():
        after = policy.model(input_ids=ids).logits.float()
    assert pointers == {n: p.data_ptr() for n, p in base.items()}
    assert torch.equal(before, after)
