"""The merged-weight kernel (kernels/merge_lora.py) against the PyTorch ops it replaces, for dense and NF4
bases (nested scales or not), ranks that are not powers of two, and an output that is a slice of a larger
buffer (the engine writes each projection into its group's rows).

Tolerances: the kernel computes each element as the PyTorch ops do (base rounded as bitsandbytes returns it,
fp32 product, rounded once) but sums the rank's R products in another order: fp32 results agree to 1e-6;
after rounding to bf16 they are equal except where that last fp32 bit decides the rounding (1 bf16 ulp).
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
    reference = merge_lora_torch(weight, a, b, 0.75, state, dtype)
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(buffer[3:3 + n], reference, atol=0, rtol=ulp)
    assert (buffer[:3] == 7).all() and (buffer[3 + n:] == 7).all()  # only its rows written
