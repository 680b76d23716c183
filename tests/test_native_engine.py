"""The native engine against HF generate (greedy, token for token) and its sampler against a reference."""

import pytest
import torch

from rollout import NativeEngine, SamplingParams
from rollout.native import filter_logits
from tests.helpers import tiny_policy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [20, 21, 22, 23, 24]]  # different lengths


def hf_greedy(model, prompts, max_new_tokens, pad_id):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("merge_lora", [True, False])
@pytest.mark.parametrize("shape,load_in_4bit", [("tiny", False), ("tiny-qwen2", True), ("tiny-qwen3", False),
                                                ("tiny-mistral", True)])
def test_greedy_equals_hf_generate(shape, load_in_4bit, merge_lora):
    policy = tiny_policy(shape, load_in_4bit=load_in_4bit)
    model = policy.model
    engine = NativeEngine(model, policy.tokenizer, merge_lora=merge_lora)
    assert engine.decoder is not None  # the engine's own forward over a static cache, not HF's
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[])
    ours = [group[0].token_ids for group in engine.generate(PROMPTS, params)]
    assert ours == hf_greedy(model, PROMPTS, 24, policy.tokenizer.pad_token_id)
    with model.disable_adapter():  # the adapters really are active in the comparison above
        assert [g[0].token_ids for g in engine.generate(PROMPTS, params)] != ours


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("tiny")


def test_seeded_sampling_is_reproducible(policy):
    engine = NativeEngine(policy.model, policy.tokenizer)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, n=4, seed=7)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert [[c.logprobs for c in g] for g in a] == [[c.logprobs for c in g] for g in b]
    c = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, n=4, seed=8))
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]
    assert all(len(g) == 4 for g in a) and len({tuple(x.token_ids) for x in a[0]}) > 1


def test_sampling_logprobs_match_a_reference_forward(policy):
    """Each returned logprob equals log softmax(logits / T) of a plain full forward over prompt + completion."""
    model = policy.model
    engine = NativeEngine(model, policy.tokenizer)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.7, n=2, seed=1, stop_token_ids=[]))
    model.eval()
    with torch.no_grad():
        for prompt, group in zip(PROMPTS, outs):
            for c in group:
                ids = torch.tensor([prompt + c.token_ids], device=engine.device)
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / 0.7
                targets = torch.tensor(c.token_ids, device=engine.device)[:, None]
                ref = torch.log_softmax(logits, -1).gather(1, targets).squeeze(1).cpu()
                torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-4, rtol=0)


def test_stop_tokens_and_max_tokens(policy):
    engine = NativeEngine(policy.model, policy.tokenizer)
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[]))
    assert all(g[0].finish_reason == "length" and len(g[0].token_ids) == 16 for g in free)
    stop = free[0][0].token_ids[5]  # stop at the 6th greedy token of prompt 0
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop]))
    first = outs[0][0]
    assert first.finish_reason == "stop" and first.token_ids == free[0][0].token_ids[:first.token_ids.index(stop) + 1]
    for g, f in zip(outs[1:], free[1:]):  # other rows run on, unaffected by the first row leaving the batch
        n = len(g[0].token_ids)
        assert g[0].token_ids == f[0].token_ids[:n]


def test_top_k_and_top_p_filter_like_a_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    # top-k: exactly the k largest survive
    z = filter_logits(logits, SamplingParams(temperature=1.0, top_k=7))
    assert ((z > float("-inf")).sum(-1) == 7).all()
    # top-p: the smallest prefix of the sorted distribution whose mass reaches p survives
    z = filter_logits(logits, SamplingParams(temperature=0.5, top_p=0.8))
    probs = torch.softmax(logits / 0.5, -1)
    for row in range(5):
        sorted_p, order = probs[row].sort(descending=True)
        keep = int((sorted_p.cumsum(0) < 0.8).sum()) + 1
        assert set(order[:keep].tolist()) == set((z[row] > float("-inf")).nonzero().squeeze(1).tolist())


def test_sampling_distribution_matches_reference_statistically():
    """Token frequencies from the engine's sampler agree with softmax(logits / T) after filtering (chi-square)."""
    from rollout.native import sample_tokens

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    tokens, _ = sample_tokens(logits, params, torch.Generator().manual_seed(0))
    expected = torch.softmax(filter_logits(logits[:1], params), -1)[0] * 20000
    observed = torch.bincount(tokens, minlength=6).float()
    keep = expected > 0
    assert observed[~keep].sum() == 0
    chi2 = (((observed - expected)[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 20.5  # 99.9th percentile of chi-square with <= 5 degrees of freedom


@pytest.mark.parametrize("check_every", [1, 3])
def test_static_cache_with_compaction_equals_the_dynamic_cache_path(policy, check_every):
    """Rows stopping at different steps leave the batch (compaction into smaller buckets, the KV cache moved
    with them); every row's output equals the HF-forward path's, which drops rows one by one."""
    static = NativeEngine(policy.model, policy.tokenizer, check_every=check_every, length_bucket=8)
    dynamic = NativeEngine(policy.model, policy.tokenizer)
    dynamic.decoder = None
    prompts = PROMPTS + [[30, 31, 32], [40], [50, 51, 52, 53, 54, 55, 56]]
    free = static.generate(prompts, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[]))
    stops = sorted({g[0].token_ids[k] for g, k in zip(free, (2, 4, 7, 11, 15, 19))})
    params = SamplingParams(max_tokens=20, temperature=0, n=3, stop_token_ids=stops)
    a, b = static.generate(prompts, params), dynamic.generate(prompts, params)
    assert [[(c.token_ids, c.finish_reason) for c in g] for g in a] == \
        [[(c.token_ids, c.finish_reason) for c in g] for g in b]
    assert len({len(g[0].token_ids) for g in a}) > 2  # rows really did stop at different steps
    for ga, gb in zip(a, b):
        for ca, cb in zip(ga, gb):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4, rtol=0)


def test_mistral_sliding_window_equals_hf_generate():
    policy = tiny_policy("tiny-mistral")
    policy.model.config.sliding_window = 5  # far shorter than prompt + completion
    engine = NativeEngine(policy.model, policy.tokenizer)
    assert engine.decoder is not None and engine.decoder.window == 5
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    ours = [group[0].token_ids for group in engine.generate(PROMPTS, params)]
    assert ours == hf_greedy(policy.model, PROMPTS, 16, policy.tokenizer.pad_token_id)
    engine.decoder.window = None  # the window really changes the output
    assert [group[0].token_ids for group in engine.generate(PROMPTS, params)] != ours


def test_merged_weights_follow_the_live_adapters():
    """After an optimizer-like in-place update of the adapters, the next rollout decodes with the new ones."""
    policy = tiny_policy("tiny-qwen2", load_in_4bit=True)
    engine = NativeEngine(policy.model, policy.tokenizer, merge_lora=True)
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    before = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    assert engine.decoder.merged is not None
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.5)
    after = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    assert after != before
    assert after == hf_greedy(policy.model, PROMPTS, 16, policy.tokenizer.pad_token_id)


def test_decoding_through_the_triton_kernels_equals_hf_generate(monkeypatch):
    """The decode path's Triton kernels (the interpreter on CPU): residual add + RMSNorm, RoPE, SwiGLU over the
    concatenated gate/up output, split-K decode attention."""
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    policy = tiny_policy("tiny-qwen3")
    engine = NativeEngine(policy.model, policy.tokenizer, merge_lora=True)
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])
    ours = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    monkeypatch.setenv("TANDEM_KERNELS", "torch")
    assert ours == hf_greedy(policy.model, PROMPTS, 8, policy.tokenizer.pad_token_id)


def test_decoding_the_4bit_codes_through_the_nf4_kernel_equals_hf_generate(monkeypatch):
    """A QLoRA policy's decode steps read its NF4 codes with the adapters fused (kernels/nf4_matmul.py, the
    interpreter on CPU), and so does the prefill when no batch needed merged weights. Greedy output equals HF
    generate, follows an in-place update of the adapters, and changes with them disabled."""
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    policy = tiny_policy("tiny-qwen2", load_in_4bit=True)  # q/k/v biases
    model = policy.model
    engine = NativeEngine(model, policy.tokenizer, read_4bit=True)
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])
    ours = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    packed = engine.decoder.packed
    assert packed is not None and engine.decoder.working_weights(len(PROMPTS)) is packed.layers
    assert engine.decoder.merged is None  # 3 rows: no merged copy made; the prefill read the codes too
    attn = engine.decoder.layers[0].self_attn
    qkv = packed.layers[0].qkv.packed  # the policy's q/k/v codes are views of the one concatenated buffer
    assert all(p.base_layer.weight.data.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    with model.disable_adapter():
        disabled = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.5)
    moved = [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    monkeypatch.setenv("TANDEM_KERNELS", "torch")
    assert moved == hf_greedy(model, PROMPTS, 10, policy.tokenizer.pad_token_id) and moved != ours
    with model.disable_adapter():
        assert disabled == hf_greedy(model, PROMPTS, 10, policy.tokenizer.pad_token_id) != ours
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.div_(-1.5)
    assert ours == hf_greedy(model, PROMPTS, 10, policy.tokenizer.pad_token_id)
