"""On a CUDA GPU: one GRPO loss-and-backward of the Qwen2.5-0.5B shape (4-bit base, LoRA r16, bf16) with
Tandem's kernels patched in and without them gives the same loss and LoRA gradients within bf16 tolerance.

bf16 tolerance: each LoRA gradient tensor within 3% relative Frobenius error of the unpatched one, the loss
within 1%; the two paths round differently at every bf16 operation of 24 layers, and these bounds sit
comfortably above what such rounding produces while a wrong derivative (sign, factor, missing term) exceeds
them by far.
"""

import pytest
import torch

from kernels.patch import patch_model, unpatch_model
from rl.config import LoraSection, ModelSection
from rl.logprobs import completion_logps
from rl.model import load_policy
from rl.objectives import grpo_loss

pytestmark = pytest.mark.gpu


def step(model, ids, mask, completion_len, advantages):
    model.zero_grad(set_to_none=True)
    logps, _ = completion_logps(model, ids, mask, completion_len)
    loss, _ = grpo_loss(logps, logps.detach(), None, advantages, mask[:, -completion_len:].float(), loss_type="dapo")
    loss.backward()
    return loss.detach().float(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


def test_grpo_step_with_kernels_on_and_off_agrees():
    policy = load_policy(ModelSection(name="random:qwen2.5-0.5b", load_in_4bit=True, kernels=False),
                         LoraSection(r=16, alpha=32), seed=0)
    model = policy.model
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.01)
    b, prompt, completion = 8, 64, 256
    ids = torch.randint(0, 49152, (b, prompt + completion), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    mask[:, -37:] = 0  # some right padding
    mask[0, -completion:] = 1
    advantages = torch.randn(b, device="cuda", generator=g)
    ref_loss, ref_grads = step(model, ids, mask, completion, advantages)
    assert set(patch_model(model)) == {"rms_norm", "swiglu", "rope", "nf4_lora_linear"}
    loss, grads = step(model, ids, mask, completion, advantages)
    unpatch_model(model)
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss) + 1e-4
    assert grads.keys() == ref_grads.keys() and len(grads) == 24 * 7 * 2
    worst = max(((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm().clamp(min=1e-12)).item() for k in grads)
    print(f"loss {loss.item():.6f} vs {ref_loss.item():.6f}; worst relative LoRA-gradient error {worst:.2e}")
    assert worst <= 3e-2
