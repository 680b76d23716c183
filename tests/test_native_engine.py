"""The native engine's greedy decoding against a teacher-forced reference, and its sampler against a reference.

Greedy outputs are not compared token for token with another decoder's (HF generate, another batch shape, the
dynamic-cache path): two correct fp32 computations of the same logits in another order (batch shape, kernel,
the CPU's instruction set) differ by about 1e-6, and a random model has near-ties (top-two gaps down to 5e-5
in these tests) where they may choose differently and part from there on. Instead each completion must be a
greedy decoding of its prompt under one plain forward of prompt + completion (no batch, no padding, no cache):
at every step the chosen token within TIE of the most likely one, and the engine's log-probability within TIE
of the reference's. Measured on fp32 paths: 2e-6 at most; TIE = 1e-4. A 4-bit model's reference runs
bitsandbytes' CPU forward, which rounds activations to bf16 while the engine's merged and packed paths compute
in fp32: measured 1.3e-3 at most; TIE_4BIT = 5e-3. A wrong token (wrong cache row, position, adapter or mask)
lands orders of magnitude further from the top: a random model's top two are ~0.1 apart on average.
"""

import pytest
import torch

from rollout import NativeEngine, SamplingParams
from rollout.native import filter_logits
from tests.helpers import tiny_policy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [20, 21, 22, 23, 24]]  # different lengths
TIE, TIE_4BIT = 1e-4, 5e-3


def assert_greedy(model, prompts, outs, tie=TIE):
    """Each completion of outs[i] (a list of Completion per prompt) is a greedy decoding of prompts[i] under
    `model` as it is now (its adapters on or off), to within `tie` (see the module's docstring)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt, group in zip(prompts, outs):
            for c in group:
                ids = torch.tensor([prompt + c.token_ids], device=next(model.parameters()).device)
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1).cpu()
                chosen = logp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
                below_top = (logp.max(-1).values - chosen).max().item()
                assert below_top <= tie, f"prompt {prompt}: a token {below_top:.2e} below the greedy choice"
                torch.testing.assert_close(torch.tensor(c.logprobs), chosen, atol=tie, rtol=0)
    model.train(was_training)


@pytest.mark.parametrize("merge_lora", [True, False])
@pytest.mark.parametrize("shape,load_in_4bit", [("tiny", False), ("tiny-qwen2", True), ("tiny-qwen3", False),
                                                ("tiny-mistral", True)])
def test_greedy_decoding_follows_the_model(shape, load_in_4bit, merge_lora):
    policy = tiny_policy(shape, load_in_4bit=load_in_4bit)
    model = policy.model
    engine = NativeEngine(model, policy.tokenizer, merge_lora=merge_lora)
    assert engine.decoder is not None  # the engine's own forward over a static cache, not HF's
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[])
    outs = engine.generate(PROMPTS, params)
    assert all(len(g[0].token_ids) == 24 for g in outs)
    assert_greedy(model, PROMPTS, outs, TIE_4BIT if load_in_4bit else TIE)
    with model.disable_adapter():  # the adapters really are active in the decoding above
        assert [g[0].token_ids for g in engine.generate(PROMPTS, params)] != [g[0].token_ids for g in outs]


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


def assert_stops(outs, stops, max_tokens):
    """Each completion ends at its first stop token ("stop"), or has max_tokens tokens and none ("length")."""
    for group in outs:
        for c in group:
            first = next((i for i, t in enumerate(c.token_ids) if t in stops), None)
            if first is None:
                assert c.finish_reason == "length" and len(c.token_ids) == max_tokens
            else:
                assert c.finish_reason == "stop" and len(c.token_ids) == first + 1


def test_stop_tokens_and_max_tokens(policy):
    engine = NativeEngine(policy.model, policy.tokenizer)
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[]))
    assert_stops(free, [], 16)
    stop = free[0][0].token_ids[5]  # stop at the 6th greedy token of prompt 0
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop]))
    # row 0 stops within the steps both runs decode with the same batch (the same computation, bit for bit)
    first = outs[0][0]
    assert first.token_ids == free[0][0].token_ids[:first.token_ids.index(stop) + 1]
    assert_stops(outs, [stop], 16)
    # the other rows run on in a smaller batch, unaffected by the first row leaving it: still greedy
    assert_greedy(policy.model, PROMPTS, outs)


def test_top_k_and_top_p_filter_like_a_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    # top-k: exactly the k largest survive
    z = filter_logits(logits, SamplingParams(temperature=1.0, top_k=7))
    assert ((z > float("-inf")).sum(-1) == 7).all()
    # top_k 1: the argmax alone (a filter that starts at k > 1 would sample from the whole vocabulary)
    z = filter_logits(logits, SamplingParams(temperature=1.0, top_k=1))
    assert torch.equal((z > float("-inf")).nonzero()[:, 1], logits.argmax(-1))
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
def test_static_cache_with_compaction_and_the_dynamic_cache_path_decode_greedily(policy, check_every):
    """Rows stopping at different steps leave the batch (compaction into smaller buckets, the KV cache moved
    with them); every row is still a greedy decoding, as in the HF-forward path, which drops rows one by one."""
    static = NativeEngine(policy.model, policy.tokenizer, check_every=check_every, length_bucket=8)
    dynamic = NativeEngine(policy.model, policy.tokenizer)
    dynamic.decoder = None
    prompts = PROMPTS + [[30, 31, 32], [40], [50, 51, 52, 53, 54, 55, 56]]
    free = static.generate(prompts, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[]))
    stops = sorted({g[0].token_ids[k] for g, k in zip(free, (2, 4, 7, 11, 15, 19))})
    params = SamplingParams(max_tokens=20, temperature=0, n=3, stop_token_ids=stops)
    a, b = static.generate(prompts, params), dynamic.generate(prompts, params)
    assert len({len(g[0].token_ids) for g in a}) > 2  # rows really did stop at different steps
    for outs in (a, b):  # each path, through its buckets and compactions, decodes greedily and stops right
        assert all(len(g) == 3 for g in outs)
        assert_stops(outs, stops, 20)
        assert_greedy(policy.model, prompts, outs)


def test_mistral_sliding_window_decodes_greedily():
    policy = tiny_policy("tiny-mistral")
    policy.model.config.sliding_window = 5  # far shorter than prompt + completion (HF's forward applies it too)
    engine = NativeEngine(policy.model, policy.tokenizer)
    assert engine.decoder is not None and engine.decoder.window == 5
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])
    outs = engine.generate(PROMPTS, params)
    assert_greedy(policy.model, PROMPTS, outs)
    engine.decoder.window = None  # the window really changes the output
    assert [group[0].token_ids for group in engine.generate(PROMPTS, params)] != [g[0].token_ids for g in outs]


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
    after = engine.generate(PROMPTS, params)
    assert [g[0].token_ids for g in after] != before
    assert_greedy(policy.model, PROMPTS, after, TIE_4BIT)


def test_decoding_through_the_triton_kernels_decodes_greedily(monkeypatch):
    """The decode path's Triton kernels (the interpreter on CPU): residual add + RMSNorm, RoPE, SwiGLU over the
    concatenated gate/up output, split-K decode attention."""
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    policy = tiny_policy("tiny-qwen3")
    engine = NativeEngine(policy.model, policy.tokenizer, merge_lora=True)
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])
    outs = engine.generate(PROMPTS, params)
    monkeypatch.setenv("TANDEM_KERNELS", "torch")  # the reference: no Triton kernel of ours
    assert_greedy(policy.model, PROMPTS, outs)


def test_decoding_the_4bit_codes_through_the_nf4_kernel_decodes_greedily(monkeypatch):
    """A QLoRA policy's decode steps read its NF4 codes with the adapters fused (kernels/nf4_matmul.py, the
    interpreter on CPU), and so does the prefill when no batch needed merged weights. The output is greedy under
    the model, follows an in-place update of the adapters, and changes with them disabled."""
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    policy = tiny_policy("tiny-qwen2", load_in_4bit=True)  # q/k/v biases
    model = policy.model
    engine = NativeEngine(model, policy.tokenizer, read_4bit=True)
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])
    ours_outs = engine.generate(PROMPTS, params)
    ours = [g[0].token_ids for g in ours_outs]
    packed = engine.decoder.packed
    assert packed is not None and engine.decoder.working_weights(len(PROMPTS)) is packed.layers
    assert engine.decoder.merged is None  # 3 rows: no merged copy made; the prefill read the codes too
    attn = engine.decoder.layers[0].self_attn
    qkv = packed.layers[0].qkv.packed  # the policy's q/k/v codes are views of the one concatenated buffer
    assert all(p.base_layer.weight.data.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    with model.disable_adapter():
        disabled = engine.generate(PROMPTS, params)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.5)
    moved = engine.generate(PROMPTS, params)
    monkeypatch.setenv("TANDEM_KERNELS", "torch")  # the references: no Triton kernel of ours
    assert_greedy(model, PROMPTS, moved, TIE_4BIT)
    assert [g[0].token_ids for g in moved] != ours
    with model.disable_adapter():
        assert_greedy(model, PROMPTS, disabled, TIE_4BIT)
    assert [g[0].token_ids for g in disabled] != ours
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.div_(-1.5)
    assert_greedy(model, PROMPTS, ours_outs, TIE_4BIT)
