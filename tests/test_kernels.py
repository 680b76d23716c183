"""Triton kernels against their pure-torch twins at awkward shapes, and the twins against gradcheck.

On a CPU machine the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py);
on a GPU (tests/test_kernels_gpu.py) they are compiled. Tolerances, by dtype:
  fp32: 1e-5 (twin and kernel do the same fp32 arithmetic in a different order);
  bf16: outputs 2e-2, gradients 3e-2 relative-ish (bf16 keeps 8 bits of mantissa: one rounding of a value
        of magnitude ~1 is up to 4e-3, and a reduction over hundreds of elements compounds a few of those).
"""

import pytest
import torch

from kernels.lora import nf4_lora_linear, nf4_lora_linear_torch
from kernels.nf4 import dequantize_nf4, dequantize_nf4_torch
from kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_torch
from kernels.rope import apply_rope, apply_rope_torch, rope_and_store_kv, rope_and_store_kv_torch
from kernels.swiglu import swiglu, swiglu_concatenated, swiglu_torch
from kernels.logprobs import selective_logprobs, selective_logprobs_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")


def leaves(*tensors):
    return [t.detach().to(DEVICE).clone().requires_grad_(True) for t in tensors]


def compare(fn_triton, fn_torch, inputs, dtype, seed=0, fp32_reference=False):
    """Outputs and input gradients of both implementations under the same random upstream gradient.

    With fp32_reference, a bf16 kernel is held to the twin evaluated in fp32 on the same (bf16-valued)
    inputs, for kernels that accumulate in fp32 where the bf16 twin rounds every partial product."""
    a = leaves(*inputs)
    b = [t.float() for t in leaves(*inputs)] if fp32_reference and dtype != torch.float32 else leaves(*inputs)
    b = [t.detach().requires_grad_(True) for t in b]
    out_a, out_b = fn_triton(*a), fn_torch(*b)
    out_a = out_a if isinstance(out_a, tuple) else (out_a,)
    out_b = out_b if isinstance(out_b, tuple) else (out_b,)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g).to(o.dtype).to(DEVICE) for o in out_a]
    for x, y in zip(out_a, out_b):
        assert x.shape == y.shape and (fp32_reference or x.dtype == y.dtype)
        torch.testing.assert_close(x.float(), y.float(), **TOL[dtype])
    torch.autograd.backward(out_a, ups)
    torch.autograd.backward(out_b, [u.to(o.dtype) for u, o in zip(ups, out_b)])
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 7, 13), (2, 5, 100), (1, 31, 96), (1, 997, 40), (2, 13, 1030)])
def test_rms_norm(triton_backend, shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    compare(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_torch(x, w, 1e-6), (x, w), dtype,
            fp32_reference=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hk,t,d,cos_batch", [(1, 1, 1, 1, 8, 1), (2, 3, 1, 7, 16, 2), (1, 5, 5, 13, 64, 1),
                                                   (3, 14, 2, 11, 64, 3)])
def test_apply_rope(triton_backend, b, hq, hk, t, d, cos_batch, dtype):
    g = torch.Generator().manual_seed(t * d)
    # q and k as HF makes them: a projection viewed (B, T, H, D) and transposed, so not contiguous
    q = torch.randn(b, t, hq, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, generator=g).to(dtype).transpose(1, 2)
    angles = torch.randn(cos_batch, t, d // 2, generator=g)
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(DEVICE)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype).to(DEVICE)
    compare(lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: apply_rope_torch(q, k, cos, sin), (q, k), dtype)


@pytest.mark.parametrize("tokens,warps", [(1, 1), (4, 2), (8, 4)])
def test_rope_launch_shapes_agree(triton_backend, tokens, warps):
    """Several positions per program (the last program ragged: 3 x 7 = 21 positions) and other warp counts
    rotate exactly as one position per program does, forward and backward."""
    from kernels.rope import _launch

    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(3, 7, 5, 16, generator=g).transpose(1, 2).to(DEVICE)
    k = torch.randn(3, 7, 2, 16, generator=g).transpose(1, 2).to(DEVICE)
    angles = torch.randn(3, 7, 8, generator=g)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE) for f in (torch.cos, torch.sin))
    for backward in (False, True):
        reference = _launch(q, k, cos, sin, backward)
        ours = _launch(q, k, cos, sin, backward, num_warps=warps, tokens_per_program=tokens)
        assert all(torch.equal(a, b) for a, b in zip(ours, reference))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 7, 13), (2, 1031), (5, 2048)])
def test_swiglu(triton_backend, shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    gate, up = (torch.randn(shape, generator=g) * 3).to(dtype), torch.randn(shape, generator=g).to(dtype)
    compare(swiglu, swiglu_torch, (gate, up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hk,d,cos_batch", [(1, 2, 1, 64, False), (3, 14, 2, 64, True), (2, 7, 7, 80, True)])
def test_rope_and_store_kv(triton_backend, b, hq, hk, d, cos_batch, dtype):
    """The decode step's RoPE with the cache write: q rotated as apply_rope rotates it, K rotated and V copied
    into the caches at the slot (read from the device), every other slot untouched."""
    g = torch.Generator().manual_seed(b * d)
    qkv = torch.randn(b, 1, (hq + 2 * hk) * d, generator=g).to(dtype).to(DEVICE)  # views of one matmul output
    q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
    q, k = q.view(b, 1, hq, d).transpose(1, 2), k.view(b, 1, hk, d).transpose(1, 2)
    v = v.view(b, 1, hk, d).transpose(1, 2)
    angles = torch.randn(b if cos_batch else 1, 1, d // 2, generator=g).repeat(1, 1, 2).to(DEVICE)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # HF's rotary module returns the model's dtype
    caches = [torch.randn(b + 2, hk, 11, d, generator=g).to(dtype).to(DEVICE) for _ in range(2)]
    twin_caches = [c.clone() for c in caches]
    ref_q, ref_k = apply_rope_torch(q.float(), k.float(), cos, sin)  # fp32 reference
    ref_caches = [c.float() for c in caches]
    ref_caches[0][:b, :, 7], ref_caches[1][:b, :, 7] = ref_k[:, :, 0], v[:, :, 0].float()
    slot = torch.tensor([7], device=DEVICE)
    with torch.no_grad():
        ours = rope_and_store_kv(q, k, v, cos, sin, *caches, slot)
        twin = rope_and_store_kv_torch(q, k, v, cos, sin, *twin_caches, slot)
    for out, kv in ((ours, caches), (twin, twin_caches)):
        torch.testing.assert_close(out.float(), ref_q, **TOL[dtype])
        for c, r in zip(kv, ref_caches):
            torch.testing.assert_close(c.float(), r, **TOL[dtype])
    keep = torch.arange(11, device=DEVICE) != 7
    for c, before in zip(caches, twin_caches):  # every other slot untouched
        assert torch.equal(c[:, :, keep], before[:, :, keep])
    assert torch.equal(caches[1][:b, :, 7], v[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1, 96), (17, 896)])
def test_add_rms_norm(triton_backend, shape, dtype):
    """The decode path's residual add fused with the next norm: h equals x + delta to the bit (rounded once to
    the dtype, as `x + delta` is) and the norm is rms_norm's of that h."""
    g = torch.Generator().manual_seed(shape[-1])
    x, delta = (torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    weight = (1 + torch.randn(shape[-1], generator=g) / 4).to(dtype).to(DEVICE)
    h, y = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(h, x + delta)
    torch.testing.assert_close(y, rms_norm_torch(x + delta, weight, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2), (3, 1, 26), (7, 4864)])
def test_swiglu_concatenated(triton_backend, shape, dtype):
    """The decode path's variant reads [gate | up] as one tensor (no copies of the halves)."""
    gate_up = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])).to(dtype).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu_concatenated(gate_up), swiglu_torch(gate, up), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,temperature", [(1, 8, 17, 1.0), (37, 24, 131, 0.7), (19, 16, 5003, 1.3)])
def test_selective_logprobs(triton_backend, n, h, v, temperature, dtype, monkeypatch):
    import kernels.logprobs as lp

    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 14 * v)  # several chunks of rows and of the vocabulary
    g = torch.Generator().manual_seed(v)
    hidden, weight = torch.randn(n, h, generator=g).to(dtype), (torch.randn(v, h, generator=g) / 2).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    compare(lambda x, w: selective_logprobs(x, w, targets, temperature),
            lambda x, w: selective_logprobs_torch(x, w, targets, temperature), (hidden, weight), dtype)
    # frozen head (LoRA): the path that differentiates in the forward
    frozen = weight.to(DEVICE)
    compare(lambda x: selective_logprobs(x, frozen, targets, temperature)[0],
            lambda x: selective_logprobs_torch(x, frozen, targets, temperature)[0], (hidden,), dtype)


def _quantized(rows, cols, dtype, nested=True, seed=0):
    import bitsandbytes.functional as F

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=nested)
    return packed, state


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (67, 128), (128, 4160)])
def test_nf4_dequant_is_bit_exact_with_bitsandbytes(triton_backend, shape, dtype, nested):
    import bitsandbytes.functional as F

    packed, state = _quantized(*shape, dtype, nested)
    reference = F.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), reference)
    assert torch.equal(dequantize_nf4_torch(packed, state), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d_in,d_out,r", [(1, 64, 64, 1), (7, 128, 67, 8), (13, 192, 130, 16)])
def test_nf4_lora_linear(triton_backend, n, d_in, d_out, r, dtype):
    packed, state = _quantized(d_out, d_in, dtype, seed=n)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(2, n, d_in, generator=g).to(dtype)
    a, b = torch.randn(r, d_in, generator=g) / 8, torch.randn(d_out, r, generator=g) / 8  # fp32, as peft keeps them
    bias = torch.randn(d_out, generator=g).to(dtype)
    compare(lambda x, a, b, bias: nf4_lora_linear(x, packed, state, a, b, 2.0, bias),
            lambda x, a, b, bias: nf4_lora_linear_torch(x, packed, state, a, b, 2.0, bias), (x, a, b, bias), dtype)


def test_nf4_lora_linear_matches_peft_layer():
    """The fused layer computes what peft's 4-bit LoRA layer computes, on a real quantized model."""
    from tests.helpers import tiny_policy

    policy = tiny_policy("tiny", load_in_4bit=True)
    policy.model.train()  # in eval mode bitsandbytes would repack a CPU weight into its CPU layout
    layer = policy.model.base_model.model.model.layers[0].mlp.up_proj
    base = layer.base_layer
    dtype = base.compute_dtype  # what the layer's input is in a real forward (fp32 on CPU, bf16 on CUDA)
    x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.to(base.weight.device)
    ours = nf4_lora_linear(x, base.weight, base.weight.quant_state, layer.lora_A["default"].weight,
                           layer.lora_B["default"].weight, layer.scaling["default"], base.bias)
    # bf16: peft rounds the LoRA output to bf16 before scaling it, the fused layer after
    torch.testing.assert_close(ours, layer(x), **TOL[dtype])


def test_twins_pass_gradcheck_in_fp64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_torch(x, w, 1e-6), (x, w))
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: apply_rope_torch(q, k, cos, sin), (q, k))
    gate = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_torch, (gate, up))
    packed, state = _quantized(6, 64, torch.float32)
    packed = packed.cpu()
    state.to("cpu")  # in place
    state.dtype = torch.float64  # dequantize to fp64 for the check
    xin = torch.randn(3, 64, dtype=torch.float64, generator=g, requires_grad=True)
    la = torch.randn(2, 64, dtype=torch.float64, generator=g, requires_grad=True)
    lb = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: nf4_lora_linear_torch(x, packed, state, a, b, 0.5), (xin, la, lb))
