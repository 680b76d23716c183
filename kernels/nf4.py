"""NF4 dequantization of bitsandbytes' packed 4-bit weights, bit-exact with `dequantize_4bit`.

bitsandbytes' format (quant_type "nf4"):
  - weight: uint8, two 4-bit codes per byte, the first element in the high nibble;
  - absmax: one fp32 scale per block of `blocksize` (64) consecutive elements of the flattened weight; with
    double quantization (`compress_statistics`, `quant_state.nested`) the scales are themselves uint8 codes
    into a dynamic map (`state2.code`) with one fp32 scale per 256 of them (`state2.absmax`), plus an offset;
  - value = code[nibble] * absmax[block], computed in fp32 and cast to the compute dtype.

Bit-exactness: the scales are dequantized in torch with bitsandbytes' own order of operations (product,
then += offset: no fused multiply-add), and the kernel does one fp32 multiply per element, as bitsandbytes.

    w = dequantize_nf4(layer.weight, layer.weight.quant_state)            # (out, in) in quant_state.dtype
"""

from __future__ import annotations

import torch

from kernels.backend import HAVE_TRITON, use_triton


def absmax_fp32(quant_state) -> torch.Tensor:
    """The per-block fp32 scales, undoing double quantization the way bitsandbytes does."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    codes = s2.code[quant_state.absmax.long()]  # (n_blocks,) fp32
    blocks = torch.arange(codes.numel(), device=codes.device) // s2.blocksize
    absmax = codes * s2.absmax[blocks]
    absmax += quant_state.offset
    return absmax.float()


def check_standard_layout(quant_state) -> None:
    # bitsandbytes repacks a CPU layer's weight into its own CPU layout on the first inference-mode forward
    # (when the CPU has AVX-512 bf16); that layout is not the one described above
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("this 4-bit weight is in bitsandbytes' CPU-packed layout, not its standard NF4 layout")


def dequantize_nf4_torch(packed: torch.Tensor, quant_state) -> torch.Tensor:
    check_standard_layout(quant_state)
    flat = packed.reshape(-1).view(torch.uint8)
    n = torch.Size(quant_state.shape).numel()
    idx = torch.stack(((flat >> 4), (flat & 0xF)), dim=1).reshape(-1)[:n].long()  # high nibble first
    values = quant_state.code.float()[idx]
    scales = absmax_fp32(quant_state)
    blocks = torch.arange(n, device=packed.device) // quant_state.blocksize
    return (values * scales[blocks]).reshape(quant_state.shape).to(quant_state.dtype)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    @triton.jit
    def _dequant_kernel(PACKED, ABSMAX, CODE, OUT, n, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(PACKED + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)
        value = tl.load(CODE + nibble, mask=mask, other=0.0)
        scale = tl.load(ABSMAX + offs // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(OUT + offs, cast_to(value * scale, OUT.dtype.element_ty), mask=mask)


_BLOCK = 1024


def dequantize_nf4(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Packed uint8 weight + bitsandbytes QuantState -> dense weight of quant_state.shape and .dtype."""
    if quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles quant_type nf4, got {quant_state.quant_type}")
    if not use_triton(packed):
        return dequantize_nf4_torch(packed, quant_state)
    check_standard_layout(quant_state)
    n = torch.Size(quant_state.shape).numel()
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=packed.device)
    _dequant_kernel[(triton.cdiv(n, _BLOCK),)](packed.reshape(-1).view(torch.uint8), absmax_fp32(quant_state),
                                               quant_state.code.float().contiguous(), out, n,
                                               BLOCKSIZE=quant_state.blocksize, BLOCK=_BLOCK)
    return out
