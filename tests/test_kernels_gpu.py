"""On a CUDA GPU: one GRPO loss-and-backward of the Qwen2.5-0.5B shape (4-bit NF4 base, LoRA r16) with
Tandem's kernels patched in agrees with the unpatched model.

The unpatched reference runs no Triton kernel of ours (TANDEM_KERNELS=torch): completion_logps would otherwise
take the Triton log-probability kernel for any CUDA tensor, on both sides of the comparison.

Two comparisons, because a random-init 24-layer model is chaotic: rounding differences grow by orders of
magnitude on their way back to the first layers' adapters.
  - fp32 compute (the NF4 weights dequantized to fp32, the kernels compiled for fp32): loss within 1e-5
    relative and all LoRA gradients together within 1e-3 relative L2 error. Rounding at fp32 stays far
    below that even after the amplification; a wrong derivative (a sign, a factor, a missing term) lands
    at O(1).
  - bf16 compute, the training configuration: loss within 1e-2 relative, LoRA gradients within 6e-2
    relative L2 error (bf16 keeps 8 mantissa bits; the two paths round at different points of every layer,
    measured on an H200: 2.8e-2 to 3.1e-2).
The ratio exp(logps - old_logps) is made different from 1 so that the loss itself depends on the model.
"""

import math

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


def batch():
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 49152, (B, PROMPT + COMPLETION), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    mask[1:, -37:] = 0  # right padding on all but the first sequence
    advantages = torch.randn(B, device="cuda", generator=g)
    # old_logps: a fixed tensor near a random model's log-probabilities (about -log V), so that the ratio
    # exp(logps - old_logps), and with it the loss, depends on the model
    old_logps = -math.log(49152) + 0.05 * torch.randn(B, COMPLETION, device="cuda", generator=g)
    return ids, mask, advantages, old_logps


def step(model, ids, mask, advantages, old_logps):
    model.zero_grad(set_to_none=True)
    logps, _ = completion_logps(model, ids, mask, COMPLETION)
    loss, _ = grpo_loss(logps, old_logps, None, advantages, mask[:, -COMPLETION:].float(), loss_type="dapo",
                        epsilon=10.0)  # a wide clip range: every token keeps its gradient
    loss.backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().item(), grads


def relative_error(grads, ref):
    num = sum((grads[k] - ref[k]).pow(2).sum() for k in ref)
    return (num / sum(ref[k].pow(2).sum() for k in ref)).sqrt().item()


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [("float32", 1e-5, 1e-3), ("bfloat16", 1e-2, 6e-2)])
def test_grpo_step_with_kernels_on_and_off_agrees(monkeypatch, dtype, loss_tol, grad_tol):
    model = policy(dtype)
    data = batch()
    monkeypatch.setenv("TANDEM_KERNELS", "torch")  # the reference: PyTorch only, log-probabilities included
    ref_loss, ref = step(model, *data)
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    assert set(patch_model(model)) == {"rms_norm", "swiglu", "rope", "nf4_lora_linear"}
    loss, ours = step(model, *data)
    unpatch_model(model)
    assert ours.keys() == ref.keys() and len(ours) == 24 * 7 * 2
    err = relative_error(ours, ref)
    print(f"\n{dtype}: loss unpatched {ref_loss:.7f}, patched {loss:.7f}; LoRA gradients relative L2 error {err:.2e}")
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss)
    assert err <= grad_tol


def test_a_new_sequence_length_does_not_recompile_the_training_kernels():
    """Row counts and sequence lengths change with every batch; Triton specializes integer arguments on their
    divisibility by 16 unless told not to, which compiled new variants (about 2 s) in the middle of runs.
    After a first length, lengths of other residues mod 16 (and 1) compile nothing new."""
    from kernels.rms_norm import _backward, _forward, rms_norm
    from kernels.rope import _rotate, apply_rope

    def variants(kernel) -> int:
        entries = list(getattr(kernel, "device_caches", {}).values())
        if not entries or not all(isinstance(e, tuple) and isinstance(e[0], dict) for e in entries):
            pytest.skip("this Triton keeps its compiled variants elsewhere")
        return sum(len(entry[0]) for entry in entries)

    weight = torch.ones(896, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(t):
        x = torch.randn(8, t, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        rms_norm(x, weight, 1e-6).sum().backward()
        q = torch.randn(8, 14, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(8, 2, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cos, sin = torch.randn(1, t, 64, device="cuda"), torch.randn(1, t, 64, device="cuda")
        sum(o.float().sum() for o in apply_rope(q, k, cos, sin)).backward()

    run(37)
    before = [variants(k) for k in (_forward, _backward, _rotate)]
    for t in (48, 50, 63, 64, 1):
        run(t)
    assert [variants(k) for k in (_forward, _backward, _rotate)] == before
