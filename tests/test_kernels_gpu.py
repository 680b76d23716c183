"""On a CUDA GPU: one GRPO loss-and-backward of the Qwen2.5-0.5B shape (4-bit NF4 base, LoRA r16, bf16)
with Tandem's kernels patched in agrees with the unpatched model within bf16 tolerance.

"Within bf16 tolerance" is measured, not assumed: the same step computed in fp32 (same NF4 codes and scales,
dequantized to fp32; same adapters) is the truth, and the patched bf16 step may be no further from it than
the unpatched bf16 step is, with a 25% margin (plus 1e-3 absolute), for the loss and for all LoRA gradients
together. A wrong derivative (sign, factor, missing term) lands orders of magnitude outside that.
"""

import pytest
import torch

from kernels.patch import patch_model, unpatch_model
from rl.config import LoraSection, ModelSection
from rl.logprobs import completion_logps
from rl.model import load_policy
from rl.objectives import grpo_loss

pytestmark = pytest.mark.gpu
B, PROMPT, COMPLETION = 8, 64, 256


def policy(dtype: str):
    p = load_policy(ModelSection(name="random:qwen2.5-0.5b", load_in_4bit=True, kernels=False, dtype=dtype),
                    LoraSection(r=16, alpha=32), seed=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(p.model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g, device="cuda") * 0.01)
    return p.model.train()


def step(model, ids, mask, advantages):
    model.zero_grad(set_to_none=True)
    logps, _ = completion_logps(model, ids, mask, COMPLETION)
    loss, _ = grpo_loss(logps, logps.detach(), None, advantages, mask[:, -COMPLETION:].float(), loss_type="dapo")
    loss.backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().item(), grads


def relative_error(grads, truth):
    num = sum((grads[k] - truth[k]).pow(2).sum() for k in truth)
    return (num / sum(truth[k].pow(2).sum() for k in truth)).sqrt().item()


def test_grpo_step_with_kernels_on_and_off_agrees():
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 49152, (B, PROMPT + COMPLETION), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    mask[1:, -37:] = 0  # right padding on all but the first sequence
    advantages = torch.randn(B, device="cuda", generator=g)

    truth_loss, truth = step(policy("float32"), ids, mask, advantages)
    torch.cuda.empty_cache()
    model = policy("bfloat16")
    ref_loss, ref = step(model, ids, mask, advantages)
    assert set(patch_model(model)) == {"rms_norm", "swiglu", "rope", "nf4_lora_linear"}
    loss, ours = step(model, ids, mask, advantages)
    unpatch_model(model)

    assert ours.keys() == ref.keys() == truth.keys() and len(ours) == 24 * 7 * 2
    err_ref, err_ours = relative_error(ref, truth), relative_error(ours, truth)
    print(f"\nloss: fp32 {truth_loss:.6f}, bf16 unpatched {ref_loss:.6f}, bf16 patched {loss:.6f}")
    print(f"LoRA gradients, relative L2 error against fp32: unpatched {err_ref:.3e}, patched {err_ours:.3e}, "
          f"patched vs unpatched {relative_error(ours, ref):.3e}")
    assert err_ours <= 1.25 * err_ref + 1e-3
    assert abs(loss - truth_loss) <= 1.25 * abs(ref_loss - truth_loss) + 1e-3 * abs(truth_loss) + 1e-5
