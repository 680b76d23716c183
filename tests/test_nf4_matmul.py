"""The decode-time NF4 matmul (kernels/nf4_matmul.py) against bitsandbytes' own dequantization followed by a
plain matmul, at awkward shapes; on CPU through Triton's interpreter, on a GPU compiled.

Tolerances: fp32 1e-5 relative (the same products, summed in another order; the kernel's dots are IEEE fp32,
not TF32); bf16: the dequantized weights are the same bf16 values, products are accumulated in fp32 by both,
and the output is rounded once to bf16, so they agree within one bf16 rounding (4e-3 relative) plus the
order of summation: 1e-2.
"""

import pytest
import torch

from kernels.nf4 import absmax_fp32
from kernels.nf4_matmul import nf4_matmul, nf4_matmul_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def _case(m, k, n, dtype, nested, seed):
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=nested)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    return x, packed, state, F.dequantize_4bit(packed, state).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 1), (3, 192, 7), (16, 320, 48), (17, 128, 100), (70, 448, 33)])
@pytest.mark.parametrize("lora,bias", [(False, False), (True, True)])
def test_nf4_matmul_equals_dequantize_then_matmul(monkeypatch, m, k, n, dtype, lora, bias):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    x, packed, state, w = _case(m, k, n, dtype, nested=(m % 2 == 1), seed=m * n)
    g = torch.Generator().manual_seed(k)
    u = torch.randn(m, 16, generator=g).to(dtype).to(DEVICE) if lora else None
    lora_b = torch.randn(n, 16, generator=g).to(dtype).to(DEVICE) / 4 if lora else None
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    reference = x.float() @ w.float().T
    if lora:
        reference += u.float() @ lora_b.float().T
    if bias:
        reference += b.float()
    absmax = absmax_fp32(state)
    ours = nf4_matmul(x, packed, absmax, state.code, n, u, lora_b, b)
    twin = nf4_matmul_torch(x, packed, absmax, state.code, n, u, lora_b, b)
    assert ours.dtype == dtype and ours.shape == (m, n)
    torch.testing.assert_close(ours.float(), reference, **TOL[dtype])
    torch.testing.assert_close(twin.float(), reference, **TOL[dtype])


@pytest.mark.parametrize("plan", [(16, 16, 64, 4, 3, 1), (16, 32, 128, 4, 2, 3), (64, 64, 128, 4, 1, 1)])
def test_every_tiling_and_split_of_k_gives_the_same_product(monkeypatch, plan):
    """Split K (partials summed by a second kernel in a fixed order), odd tiles, the LoRA/bias epilogue in
    either kernel: all equal the reference."""
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    x, packed, state, w = _case(5, 448, 37, torch.float32, nested=True, seed=11)
    g = torch.Generator().manual_seed(1)
    u, lora_b, b = torch.randn(5, 16, generator=g), torch.randn(37, 16, generator=g), torch.randn(37, generator=g)
    x, u, lora_b, b = (t.to(DEVICE) for t in (x, u, lora_b, b))
    reference = x @ w.T + u @ lora_b.T + b
    ours = nf4_matmul(x, packed, absmax_fp32(state), state.code, 37, u, lora_b, b, plan=plan)
    torch.testing.assert_close(ours, reference, **TOL[torch.float32])


def test_the_weight_it_reads_is_bitsandbytes_dequantization_bit_for_bit(monkeypatch):
    """With x the identity, y = W^T exactly: the in-register dequantization is bit-exact, not just close."""
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    for dtype in (torch.float32, torch.bfloat16):
        _, packed, state, w = _case(1, 128, 40, dtype, nested=True, seed=3)
        eye = torch.eye(128, dtype=dtype, device=DEVICE)
        assert torch.equal(nf4_matmul(eye, packed, absmax_fp32(state), state.code, 40), w.T)


def test_bad_lora_rank_is_refused(monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    x, packed, state, _ = _case(2, 64, 8, torch.float32, nested=False, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        nf4_matmul(x, packed, absmax_fp32(state), state.code, 8, torch.zeros(2, 12), torch.zeros(8, 12))
