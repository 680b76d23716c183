"""The merged-weight kernel (kernels/merge_lora.py) against the PyTorch ops it replaces, for dense and NF4
bases (nested scales or not), ranks that are not powers of two, and an output that is a slice of a larger
buffer (the engine writes each projection into its group's rows).

The reference is PyTorch throughout (TANDEM_KERNELS=torch): under "triton" its NF4 dequantization would be
our Triton kernel, which shares its block scales with the merge kernel, so one mistake would sit on both sides.

Tolerance, per element: the kernel computes each element as the PyTorch ops do (base rounded as bitsandbytes
returns it, fp32 product B A times the scale, then the sum, rounded once) but sums the rank's R products in
another order. Two fp32 sums of the same R terms t_r differ by at most 2 (R - 1) u sum |t_r| (u = 2^-24),
and the scaling adds 2 u s sum |t_r|: at most 2 R u s sum_r |b_r a_r| before the final rounding; each side's
rounding to the output dtype adds half an ulp, at most 2^-24 |x| in fp32 and 2^-8 |x| in bf16. Relative
error alone (1e-6) does not hold in fp32: where the base and the product nearly cancel, a 1e-8 difference
is a large fraction of the result (seen on a CPU under Triton's interpreter).
"""

import pytest
import torch

from kernels.merge_lora import merge_lora_into, merge_lora_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized,nested", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("n,k,r", [(1, 64, 1), (67, 192, 8), (130, 320, 20)])
def test_merge_lora_equals_the_pytorch_ops(monkeypatch, n, k, r, quantized, nested, dtype):
    import bitsandbytes.functional as F

    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    g = torch.Generator().manual_seed(n * k + r)
    weight = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    state = None
    if quantized:
        weight, state = F.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=nested)
    a = torch.randn(r, k, generator=g).to(DEVICE) / 8  # fp32, as peft keeps adapters
    b = torch.randn(n, r, generator=g).to(DEVICE) / 8
    buffer = torch.full((n + 5, k), 7.0, dtype=dtype, device=DEVICE)
    merge_lora_into(buffer[3:3 + n], weight, a, b, 0.75, state)
    monkeypatch.setenv("TANDEM_KERNELS", "torch")  # the reference: no Triton kernel of ours (see above)
    reference = merge_lora_torch(weight, a, b, 0.75, state, dtype)
    ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7  # two half-ulps: both sides' final rounding
    bound = 2 * r * 2.0 ** -24 * 0.75 * (b.abs() @ a.abs()) + ulp * reference.float().abs()  # (n, k)
    error = (buffer[3:3 + n].float() - reference.float()).abs()
    assert (error <= bound).all(), f"{int((error > bound).sum())} elements beyond the bound, worst " \
        f"{(error / bound).max().item():.2f} x"
    assert (buffer[:3] == 7).all() and (buffer[3 + n:] == 7).all()  # only its rows written
