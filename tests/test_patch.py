"""A model patched with Tandem's kernels computes what the unpatched model computes (CPU: Triton interpreter)."""

import pytest
import torch

from kernels.patch import patch_model, unpatch_model
from tests.helpers import tiny_policy


def loss_and_lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    loss = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape,load_in_4bit", [("tiny", True), ("tiny-qwen2", False), ("tiny-qwen3", True),
                                                ("tiny-mistral", False)])
def test_patched_model_matches_unpatched(shape, load_in_4bit, monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    policy = tiny_policy(shape, load_in_4bit=load_in_4bit)
    model = policy.model.train()  # in eval mode bitsandbytes would repack 4-bit CPU weights into its CPU layout
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_lora_grads(model, ids)
    kinds = patch_model(model)
    expected = {"rms_norm", "swiglu", "rope"} | ({"nf4_lora_linear"} if load_in_4bit else set())
    assert set(kinds) == expected
    loss, grads = loss_and_lora_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    with model.disable_adapter():  # peft's own path still works when adapters are disabled
        model(input_ids=ids)
    unpatch_model(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_patched_model_decodes_with_its_own_forwards(monkeypatch):
    """Without autograd (rollout decoding) the patched modules run their own forwards: same tokens, and no
    kernel is called."""
    import kernels.patch as patch
    from rollout import NativeEngine, SamplingParams

    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    policy = tiny_policy("tiny-qwen3")
    engine = NativeEngine(policy.model, policy.tokenizer)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [14, 15], [20, 21, 22]]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])
    reference = [g[0].token_ids for g in engine.generate(prompts, params)]
    patch_model(policy.model)
    for name in ("rms_norm", "swiglu", "apply_rope"):
        monkeypatch.setattr(patch, name, lambda *a, **k: pytest.fail("a kernel ran during decoding"))
    assert [g[0].token_ids for g in engine.generate(prompts, params)] == reference
