"""NF4 dequantization of bitsandbytes' packed 4-bit weights, bit-exact with `dequantize_4bit`.

bitsandbytes' format (quant_type "nf4"):
  - weight: uint8, two 4-bit codes per byte, the first element in the high nibble;
  - absmax: one fp32 scale per block of `blocksize` (64) consecutive elements of the flattened weight; with
    double quantization (`compress_statistics`, `quant_state.nested`) the scales are themselves uint8 codes
    into a dynamic map (`state2.code`) with one fp32 scale per 256 of them (`state2.absmax`), plus an offset;
  - value = code[nibble] * absmax[block], computed in fp32 and cast to the compute dtype.

Bit-exactness: the kernel undoes double quantization with bitsandbytes' own order of operations (product,
rounded, then + offset: compiled without fused multiply-adds) and does one fp32 multiply per element, as
bitsandbytes does. One launch: the scales are not materialized in a separate pass.

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
    def block_scales(ABSMAX, ABSMAX2, CODE2, OFFSET, block, ok, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
        """The fp32 scale of each quantization block in `block`. With double quantization in bitsandbytes'
        order: code2[q] * absmax2, rounded, then + offset (the caller launches without FMA contraction)."""
        if NESTED:
            q = tl.load(ABSMAX + block, mask=ok, other=0).to(tl.int32)
            return tl.load(CODE2 + q) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=ok, other=0.0) + tl.load(OFFSET)
        else:
            return tl.load(ABSMAX + block, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _dequant_kernel(PACKED, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, n, BLOCKSIZE: tl.constexpr,
                        BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
                        WHOLE_BLOCKS: tl.constexpr):
        # a tile of BLOCKS quantization blocks x BLOCKSIZE / 2 bytes: one scale per row of the tile, computed
        # once, and each byte's two elements (high nibble first) stored as one contiguous run per block.
        # WHOLE_BLOCKS (n a multiple of the block size, as weights are): masks by whole rows of the tile, which
        # the compiler can keep vectorized (an element-wise mask made it load 1 byte and store 2 per access)
        block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        block_ok = block * BLOCKSIZE < n
        scale = block_scales(ABSMAX, ABSMAX2, CODE2, OFFSET, block, block_ok, BLOCKSIZE2, NESTED)
        pair = tl.arange(0, BLOCKSIZE // 2)
        offs = block[:, None] * (BLOCKSIZE // 2) + pair[None, :]
        out = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if WHOLE_BLOCKS:
            in_mask, out_mask = block_ok[:, None], block_ok[:, None]
        else:
            in_mask, out_mask = 2 * offs < n, out < n
        byte = tl.load(PACKED + offs, mask=in_mask, other=0).to(tl.int32)
        hi = tl.load(CODE + (byte >> 4)) * scale[:, None]
        lo = tl.load(CODE + (byte & 0xF)) * scale[:, None]
        tl.store(OUT + out, cast_to(tl.interleave(hi, lo), OUT.dtype.element_ty), mask=out_mask)


_ELEMENTS = 4096  # per program


def _offset(quant_state) -> torch.Tensor:
    """The double-quantization offset as a one-element fp32 tensor on the weight's device (read in the
    kernel: turning a device tensor into a Python float would wait for the GPU on every call)."""
    offset = quant_state.offset
    if not torch.is_tensor(offset):
        offset = torch.tensor(float(offset))
    return offset.to(device=quant_state.absmax.device, dtype=torch.float32).reshape(1)


def dequantize_nf4(packed: torch.Tensor, quant_state, elements: int = _ELEMENTS, num_warps: int = 4) -> torch.Tensor:
    """Packed uint8 weight + bitsandbytes QuantState -> dense weight of quant_state.shape and .dtype.
    `elements` per program and `num_warps`: the launch shape (benchmarks/sweep_launch.py varies them)."""
    if quant_state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 handles quant_type nf4, got {quant_state.quant_type}")
    if not use_triton(packed):
        return dequantize_nf4_torch(packed, quant_state)
    check_standard_layout(quant_state)
    n = torch.Size(quant_state.shape).numel()
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=packed.device)
    absmax, absmax2, code2, offset, nested = scale_args(quant_state)
    blocks = max(1, elements // quant_state.blocksize)
    _dequant_kernel[(triton.cdiv(n, blocks * quant_state.blocksize),)](
        packed.reshape(-1).view(torch.uint8), absmax, quant_state.code, absmax2, code2, offset, out, n,
        BLOCKSIZE=quant_state.blocksize, BLOCKSIZE2=quant_state.state2.blocksize if nested else 1,
        NESTED=nested, BLOCKS=blocks, WHOLE_BLOCKS=n % quant_state.blocksize == 0, enable_fp_fusion=False,
        num_warps=num_warps)
    return out


def scale_args(quant_state):
    """(ABSMAX, ABSMAX2, CODE2, OFFSET, NESTED) for block_scales; unused slots hold absmax."""
    absmax = quant_state.absmax
    if not quant_state.nested:
        return absmax, absmax, absmax, absmax, False
    s2 = quant_state.state2
    return absmax, s2.absmax, s2.code, _offset(quant_state), True
