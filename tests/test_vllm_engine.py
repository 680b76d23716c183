"""The vLLM engine for real (vLLM on CPU, in this process) with SmolLM2-135M-Instruct in fp32.

fp32, not bf16: vLLM's CPU kernels and PyTorch round bf16 differently, and differently again on CPUs with and
without AMX / AVX512-BF16, so two correct bf16 engines part at the first near-tie of greedy decoding, at a
place that depends on the machine. In fp32 the two engines' log-probabilities differ by summation order only
(measured: at most 5e-6 nats), so the tests can be sharp on any x86-64 CPU: the first token's log-probability of
the live policy within FP32_LOGP nats, and greedy decoding identical except where the policy's own top two
log-probabilities are within FP32_LOGP (a near-tie of fp32 rounding; counted and printed).
"""

import gc
import weakref

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from rl.config import LoraSection, ModelSection  # noqa: E402
from rl.model import load_policy, resolve_source  # noqa: E402
from rollout import NativeEngine, SamplingParams  # noqa: E402
from rollout.vllm_engine import unsupported_reason  # noqa: E402
from tests.helpers import greedy_partings, grpo_with_vllm  # noqa: E402

if unsupported_reason() is not None:
    pytest.skip(unsupported_reason(), allow_module_level=True)
if torch.cuda.is_available():  # vLLM takes its CUDA platform wherever a GPU is visible
    pytest.skip("vLLM's CPU path; with a GPU visible, tests/test_vllm_engine_gpu.py tests the engine",
                allow_module_level=True)

QUESTIONS = ["What is 12 + 7?", "Name a colour.", "Write one word.", "Count to three."]
FP32_LOGP = 1e-3  # nats: ~200x what vLLM and the policy differ by in fp32


@pytest.fixture(scope="module")
def setup():
    from rollout.vllm_engine import VLLMEngine

    torch.manual_seed(0)
    policy = load_policy(ModelSection(name="smollm2-135m-instruct", dtype="float32", kernels=False),
                         LoraSection(r=8), seed=0)
    _perturb_lora(policy.model, seed=1)
    before = {n: weakref.ref(p) for n, p in policy.model.named_parameters() if not p.requires_grad}
    model_dir, _ = resolve_source("smollm2-135m-instruct", 0, need_dir=True)
    engine = VLLMEngine(policy.model, policy.tokenizer, model_dir, lora_rank=8, max_model_len=512)
    prompts = [policy.tokenizer.encode(q) for q in QUESTIONS]
    return policy, engine, prompts, before


def _perturb_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)


def _logprobs(model, ids):
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def _check_agreement(policy, prompts, ours, theirs):
    agreed = greedy_partings(policy.model, prompts, ours, theirs, FP32_LOGP)
    assert all(k > 0 for k in agreed), "the engines disagree on the first token"
    return sum(agreed) / sum(max(len(a[0].token_ids), len(b[0].token_ids)) for a, b in zip(ours, theirs))


def test_base_weights_are_shared_not_copied(setup):
    policy, engine, _, before = setup
    theirs = [p for p in engine.vllm_model.parameters()]
    ranges = [(p.untyped_storage().data_ptr(), p.untyped_storage().data_ptr() + p.untyped_storage().nbytes())
              for p in theirs]
    frozen = {n: p for n, p in policy.model.named_parameters() if not p.requires_grad}
    inside = [n for n, p in frozen.items() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert len(inside) == len(frozen) > 200, f"{len(inside)} of {len(frozen)} frozen tensors are vLLM's"
    # the policy's own base tensors are gone, not kept beside vLLM's: nothing refers to them any more (an
    # fp32 load maps the weights from the file, so the process's resident memory would not tell)
    gc.collect()
    kept = [n for n, ref in before.items() if ref() is not None]
    assert not kept, f"{len(kept)} of the policy's own base tensors are still alive, e.g. {kept[:3]}"


def test_greedy_agrees_with_the_native_engine(setup):
    policy, engine, prompts, _ = setup
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[])
    ours = engine.generate(prompts, params)
    native = NativeEngine(policy.model, policy.tokenizer).generate(prompts, params)
    assert _check_agreement(policy, prompts, ours, native) > 0.9


def test_lora_changes_reach_vllm_in_memory(setup):
    policy, engine, prompts, _ = setup
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
    old = [g[0].token_ids for g in engine.generate(prompts, params)]
    for seed in (2, 3):
        _perturb_lora(policy.model, seed=seed)
        ours = engine.generate(prompts, params)
        assert engine.last_sync_s > 0  # the adapter was copied in (how fast is benchmarked, not tested)
        gaps = []
        for prompt, group in zip(prompts, ours):  # the first token's log-probability is the live policy's
            lp = _logprobs(policy.model, prompt)
            gaps.append(abs(group[0].logprobs[0] - float(lp[group[0].token_ids[0]])))
        print(f"first-token log-probabilities, vLLM against the live policy: at most {max(gaps):.1e} nats apart")
        assert max(gaps) < FP32_LOGP
        native = NativeEngine(policy.model, policy.tokenizer).generate(prompts, params)
        _check_agreement(policy, prompts, ours, native)
    assert [g[0].token_ids for g in ours] != old


def test_sampling_returns_processed_logprobs(setup):
    policy, engine, prompts, _ = setup
    outs = engine.generate(prompts[:2], SamplingParams(max_tokens=6, temperature=0.8, top_k=20, n=3, seed=5))
    assert [len(g) for g in outs] == [3, 3]
    again = engine.generate(prompts[:2], SamplingParams(max_tokens=6, temperature=0.8, top_k=20, n=3, seed=5))
    assert [[c.token_ids for c in g] for g in outs] == [[c.token_ids for c in g] for g in again]
    for prompt, group in zip(prompts, outs):
        c = group[0]
        z = torch.log_softmax(_logprobs(policy.model, prompt) / 0.8, -1)  # temperature applied...
        kth = z.topk(20).values[-1]
        z = torch.log_softmax(z.masked_fill(z < kth, float("-inf")), -1)  # ...then top-k, renormalized
        assert abs(c.logprobs[0] - float(z[c.token_ids[0]])) < FP32_LOGP


def test_grpo_run_with_the_vllm_engine(tmp_path):
    """Three steps of `python -m rl.grpo` with rollout.engine vllm (its own process, as a user runs it)."""
    result, rows = grpo_with_vllm(tmp_path, "{name: smollm2-135m-instruct, dtype: bfloat16}")
    assert "rollout engine: vLLM" in result.stderr
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("timing/lora_sync", "sampling/importance_sampling_ratio/mean",
                "sampling/sampling_logp_difference/mean"):
        assert all(key in r for r in rows), key


def test_a_4bit_policy_is_refused_where_vllm_has_no_bitsandbytes(tmp_path, caplog, monkeypatch):
    """vLLM 0.32 without vllm-bnb-plugin cannot hold a 4-bit base for the policy to share (sharing with the
    plugin: tests/test_vllm_engine_4bit.py). `vllm` says so (before loading anything) and how to proceed;
    `auto` gives the policy the native engine."""
    from rl.errors import ConfigError
    from rollout import vllm_compat
    from rollout.select import make_engine
    from tests.helpers import tiny_policy

    monkeypatch.setattr(vllm_compat, "has_bitsandbytes", lambda version: False)

    policy = tiny_policy("tiny", load_in_4bit=True)
    with pytest.raises(ConfigError, match="no bitsandbytes.*vllm-bnb-plugin.*engine native.*load_in_4bit false"):
        make_engine("vllm", policy.model, policy.tokenizer, model_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="tandem"):
        engine = make_engine("auto", policy.model, policy.tokenizer, model_dir=str(tmp_path))
    assert isinstance(engine, NativeEngine)
    assert any("rollout engine: native" in r.getMessage() and "4-bit" in r.getMessage() for r in caplog.records)


def test_multiturn_greedy_conversations_agree_with_the_native_engine(setup):
    """The turn loop (rollout/environment.py) over vLLM and over the native engine: the same conversations, the
    environment's answers included, up to fp32 near-ties."""
    from rl.model import unwrap
    from rollout.engine import Completion
    from rollout.environment import open_conversations, run_turns
    from rollout.native import eos_token_ids
    from tests.environments import Echo

    policy, engine, _, _ = setup
    _perturb_lora(policy.model, seed=1)  # the fixture's adapter (other tests change it): turns that end and go on
    rows = [{"prompt": q} for q in QUESTIONS[:2]]
    eot = eos_token_ids(unwrap(policy.model), policy.tokenizer)
    params = SamplingParams(max_tokens=64, temperature=0, stop_token_ids=eot)
    native = NativeEngine(policy.model, policy.tokenizer)
    both = []
    for generate in (engine.generate, native.generate):
        envs, prompts = open_conversations(rows, 1, Echo, policy.tokenizer, 10.0, 512)
        both.append(run_turns(generate, policy.tokenizer, envs, prompts, params, 3, 10.0, eot))
    ours, theirs = ([[Completion(c.token_ids, [], c.finish_reason)] for c in convs] for convs in both)
    assert max(c.tool_calls for c in both[1]) >= 1  # a conversation went past its first turn
    assert _check_agreement(policy, prompts, ours, theirs) > 0.5
    for a, b in zip(*both):  # where a conversation is the same, so is what the loss counts in it
        if a.token_ids == b.token_ids:
            assert a.mask == b.mask and a.history == b.history
