"""A LoRA projection's merged weight, W + scale * B A, written in one launch: the native engine's refresh of
its merged working weights before every rollout.

    merge_lora_into(out, weight, a, b, scale, quant_state=None)
    # out (N, K) in the compute dtype (a slice of the merged buffer); weight: the dense base (N, K), or the
    # bitsandbytes NF4 packed codes with quant_state; a (R, K), b (N, R): the adapter.

Done with PyTorch ops it is nine launches per projection (dequantize, casts of W, A and B, the product, the
scale, the sum, the cast back, the copy) and two fp32 temporaries of the weight's size (55 MB for a 1.5B
gate projection, 270 MB at 7B); here one launch per projection and no temporaries. Each element is what the
PyTorch path computes: the base as bitsandbytes dequantizes it (rounded to the compute dtype), plus the fp32
product B A (a dot of R terms, summed in another order) times the scale, rounded once.
"""

from __future__ import annotations

import torch

from kernels.backend import HAVE_TRITON, use_triton
from kernels.nf4 import check_standard_layout


def merge_lora_torch(weight, a, b, scale: float, quant_state=None, dtype=None) -> torch.Tensor:
    if quant_state is not None:
        from kernels.nf4 import dequantize_nf4

        weight = dequantize_nf4(weight, quant_state)
    return (weight.float() + (b.float() @ a.float()) * scale).to(dtype or weight.dtype)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.nf4 import block_scales, scale_args
    from kernels.triton_cast import cast_to

    _TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

    @triton.jit
    def _merge_kernel(OUT, W, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, A, B, N, K, R, stride_out, scale,
                      NF4: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                      BASE_DTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        ok = (rn < N)[:, None] & (rk < K)[None, :]
        element = rn.to(tl.int64)[:, None] * K + rk[None, :]
        if NF4:  # bitsandbytes' dequantization, rounded to its dtype as dequantize_4bit returns it
            byte = tl.load(W + element // 2, mask=ok, other=0).to(tl.int32)
            nibble = tl.where(element % 2 == 0, byte >> 4, byte & 0xF)
            scales = block_scales(ABSMAX, ABSMAX2, CODE2, OFFSET, element // BLOCKSIZE, ok, BLOCKSIZE2, NESTED)
            w = cast_to(tl.load(CODE + nibble) * scales, BASE_DTYPE).to(tl.float32)
        else:
            w = tl.load(W + element, mask=ok, other=0.0).to(tl.float32)
        r = tl.arange(0, BR)
        b = tl.load(B + rn[:, None] * R + r[None, :], mask=(rn < N)[:, None] & (r < R)[None, :], other=0.0)
        a = tl.load(A + r[:, None] * K + rk[None, :], mask=(r < R)[:, None] & (rk < K)[None, :], other=0.0)
        delta = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        # the product rounded, then the sum (launched without FMA contraction), as the PyTorch ops do it
        tl.store(OUT + rn[:, None] * stride_out + rk[None, :], cast_to(w + delta * scale, OUT.dtype.element_ty),
                 mask=ok)


def merge_lora_into(out: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                    quant_state=None) -> torch.Tensor:
    """out[:] = W + scale * b @ a, W dense or NF4 (see the module docstring)."""
    fast = (use_triton(out) and out.stride(-1) == 1 and weight.is_contiguous() and a.is_contiguous()
            and b.is_contiguous() and (quant_state is not None or weight.dtype in _TL))
    if quant_state is not None:
        fast = fast and quant_state.quant_type == "nf4" and not getattr(quant_state, "packing_format_for_cpu", 0)
    if not fast:
        out.copy_(merge_lora_torch(weight, a, b, scale, quant_state, out.dtype))
        return out
    n, k = out.shape
    nf4 = quant_state is not None
    if nf4:
        check_standard_layout(quant_state)
        absmax, absmax2, code2, offset, nested = scale_args(quant_state)
        code, base_dtype = quant_state.code, quant_state.dtype
    else:
        absmax = absmax2 = code2 = offset = code = out  # unused
        nested, base_dtype = False, weight.dtype
    bn, bk = 64, 64
    _merge_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        out, weight.reshape(-1) if nf4 else weight, code, absmax, absmax2, code2, offset, a, b, n, k, a.shape[0],
        out.stride(0), float(scale), NF4=nf4, NESTED=nested, BLOCKSIZE=quant_state.blocksize if nf4 else 64,
        BLOCKSIZE2=quant_state.state2.blocksize if nested else 1, BASE_DTYPE=_TL[base_dtype], BN=bn, BK=bk,
        BR=max(16, triton.next_power_of_2(a.shape[0])), enable_fp_fusion=False)
    return out
