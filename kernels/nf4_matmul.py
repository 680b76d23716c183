"""y = x W^T + u B^T + bias with W read as 4-bit NF4 codes: the decode-time projection of a QLoRA policy.

    y = nf4_matmul(x, packed, absmax, code, out_features, u=None, lora_b=None, bias=None)
    # x (M, K); packed: uint8, two codes per byte, high nibble first, the (out_features, K) weight flattened
    # row-major (bitsandbytes' layout); absmax: fp32, one scale per `blocksize` elements; code: the 16 NF4
    # values; u = x A^T (M, R) and lora_b (out_features, R), the low-rank path with its scale folded into B.

At decode a batch of a few rows multiplies every weight once: the step is bound by the bytes of the
weights, and dequantizing to a dense copy first moves nine times the bytes (read 0.5, write 2, read 2 per
element, against 0.5). This kernel reads the codes and scales and dequantizes in registers, tile by tile,
straight into tensor-core dots (`tl.dot` wants 16 rows or more: a smaller batch is masked up to 16 rows,
which costs arithmetic that the memory-bound step has to spare). Each element is dequantized as
bitsandbytes does it, code * absmax in fp32 then cast, so the product is the one of `dequantize_4bit(W) @ x`
up to summation order. A decode batch has few output tiles, so K is split across programs to keep enough
loads in flight (partial sums added by a second kernel, in a fixed order: deterministic). The low-rank path
is one more small dot per output tile in the last kernel, so a LoRA projection is two or three launches
(u = x A^T, this) instead of five.

Inference only (no autograd): training goes through kernels/lora.py.
"""

from __future__ import annotations

import torch

from kernels.backend import HAVE_TRITON, interpreting, use_triton


def nf4_weight_torch(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
                     blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    flat = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack(((flat >> 4), (flat & 0xF)), dim=1).reshape(-1).long()
    blocks = torch.arange(idx.numel(), device=packed.device) // blocksize
    return (code.float()[idx] * absmax[blocks]).to(dtype).reshape(out_features, -1)


def nf4_matmul_torch(x, packed, absmax, code, out_features: int, u=None, lora_b=None, bias=None, blocksize=64):
    y = x @ nf4_weight_torch(packed, absmax, code, out_features, blocksize, x.dtype).T
    if u is not None:
        y = y + (u @ lora_b.T).to(y.dtype)
    if bias is not None:
        y = y + bias
    return y


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    @triton.jit
    def _lora_bias_store(acc, rm, rn, m_ok, n_ok, U, LB, BIAS, Y, stride_um, stride_ym, R: tl.constexpr,
                         HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_FP32: tl.constexpr):
        if HAS_LORA:
            r = tl.arange(0, R)
            u = tl.load(U + rm[:, None] * stride_um + r[None, :], mask=m_ok[:, None], other=0.0)
            b = tl.load(LB + rn[:, None] * R + r[None, :], mask=n_ok[:, None], other=0.0)
            if DOT_FP32:
                u, b = u.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(u, tl.trans(b), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], cast_to(acc, Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["M"])  # the batch (1..16 at decode): one compiled variant for all
    def _nf4_matmul_kernel(X, PACKED, ABSMAX, CODE, U, LB, BIAS, Y, PARTIAL, M, N, K, K_PER, stride_xm,
                           stride_um, stride_ym, R: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCKSIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           SPLIT: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        # program (n tile, k slice, m tile): the dot of its rows of x with its tile of W over K_PER columns;
        # with SPLIT the fp32 partial goes to PARTIAL[k slice] and _nf4_reduce_kernel finishes the sum
        rm = tl.program_id(2) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        m_ok, n_ok = rm < M, rn < N
        # byte j of a tile holds columns k0 + 2j (high nibble) and k0 + 2j + 1 (low): x's even and odd columns.
        # The weight tile as (rows, quantization blocks, bytes of a block): one scale per block, loaded once
        # and broadcast in registers (a load per element would cap the kernel below the memory's speed)
        NB: tl.constexpr = BK // BLOCKSIZE
        HALF_BLOCK: tl.constexpr = BLOCKSIZE // 2
        nb = tl.arange(0, NB)
        in_block = tl.arange(0, HALF_BLOCK)
        row = rn.to(tl.int64) * K
        k_start = tl.program_id(1) * K_PER
        k_end = tl.minimum(k_start + K_PER, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            # x's columns k0.. as one contiguous (vectorized) load, split into even and odd in registers
            cols = k0 + tl.arange(0, BK)
            x = tl.load(X + rm[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & (cols < k_end)[None, :],
                        other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BM, BK // 2, 2)))
            w_ok = n_ok[:, None] & (k0 + nb * BLOCKSIZE < k_end)[None, :]  # (BN, NB): whole blocks in or out
            scale = tl.load(ABSMAX + (row + k0)[:, None] // BLOCKSIZE + nb[None, :], mask=w_ok, other=0.0)
            byte_at = (row + k0)[:, None, None] // 2 + nb[None, :, None] * HALF_BLOCK + in_block[None, None, :]
            byte = tl.load(PACKED + byte_at, mask=w_ok[:, :, None], other=0).to(tl.int32)
            w_hi = tl.reshape(tl.load(CODE + (byte >> 4)) * scale[:, :, None], (BN, BK // 2))
            w_lo = tl.reshape(tl.load(CODE + (byte & 0xF)) * scale[:, :, None], (BN, BK // 2))
            w_hi, w_lo = cast_to(w_hi, X.dtype.element_ty), cast_to(w_lo, X.dtype.element_ty)
            if DOT_FP32:  # the same products, exact in fp32 (see nf4_matmul)
                x_even, x_odd, w_hi, w_lo = (x_even.to(tl.float32), x_odd.to(tl.float32), w_hi.to(tl.float32),
                                             w_lo.to(tl.float32))
            acc += tl.dot(x_even, tl.trans(w_hi), input_precision=PRECISION)
            acc += tl.dot(x_odd, tl.trans(w_lo), input_precision=PRECISION)
        if SPLIT:
            tile = PARTIAL + tl.program_id(1).to(tl.int64) * M * N
            tl.store(tile + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
        else:
            _lora_bias_store(acc, rm, rn, m_ok, n_ok, U, LB, BIAS, Y, stride_um, stride_ym, R, HAS_LORA, HAS_BIAS,
                             PRECISION, DOT_FP32)

    @triton.jit(do_not_specialize=["M"])
    def _nf4_reduce_kernel(PARTIAL, U, LB, BIAS, Y, M, N, S, stride_um, stride_ym, R: tl.constexpr,
                           HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(S):  # in a fixed order: the result does not depend on which slice finished first
            tile = PARTIAL + s * M * N
            acc += tl.load(tile + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        _lora_bias_store(acc, rm, rn, m_ok, n_ok, U, LB, BIAS, Y, stride_um, stride_ym, R, HAS_LORA, HAS_BIAS,
                         PRECISION, DOT_FP32)


# Enough loads in flight to cover the memory latency: a tile of 64 rows x 128 columns is 4 KB of codes per
# iteration (168 registers a thread at 4 warps on sm_90: three programs per multiprocessor), and the grid
# aims for ~4 programs per multiprocessor of an H100/H200 (132 of them); a decode batch's few output tiles
# are made many by splitting K (the partial sums are added in a fixed order).
_TARGET_PROGRAMS = 4 * 132


def _plan(m: int, n: int, k: int, blocksize: int) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, warps, split, stages) for an (m x k) @ (k x n) product; BK holds whole quantization blocks.
    One stage: Triton's software pipelining would stage every code lookup through shared memory (a 4-byte
    async copy per element, seen in the sm_90 SASS); unpipelined they are plain loads that hit L1, and the
    split of K keeps enough programs in flight to hide the latency instead."""
    if m > 16:  # a prefill-sized product: enough tiles without splitting (8 warps: 4 spill at 64 x 64)
        return 64, 64, max(128, blocksize), 8, 1, 1
    bn, bk = 64, max(128, blocksize)
    tiles = triton.cdiv(n, bn)
    split = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), triton.cdiv(k, bk)))
    return 16, bn, bk, 4, split, 1


def nf4_matmul(x, packed, absmax, code, out_features: int, u=None, lora_b=None, bias=None, blocksize: int = 64,
               plan: tuple[int, int, int, int, int, int] | None = None):
    """x (..., K) -> (..., out_features); see the module docstring. `lora_b` has R columns, R a power of two
    >= 16 (pad with zeros), and u = x A^T has the same R. `plan` = (BM, BN, BK, warps, split, stages) overrides the
    choice of tiles (for benchmarks/bench_nf4_matmul.py)."""
    if not use_triton(x):
        return nf4_matmul_torch(x, packed, absmax, code, out_features, u, lora_b, bias, blocksize)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    if k % 2:
        raise ValueError(f"nf4_matmul needs an even number of input features, got {k}")
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    has_lora = u is not None
    if has_lora:
        u = u.reshape(-1, u.shape[-1])
        r = u.shape[-1]
        if r < 16 or r & (r - 1) or lora_b.shape != (out_features, r) or not lora_b.is_contiguous():
            raise ValueError("nf4_matmul: u (M, R) and lora_b (out, R) contiguous, R a power of two >= 16")
    bm, bn, bk, warps, split, stages = plan or _plan(m, out_features, k, blocksize)
    if k % blocksize or bk % blocksize:
        raise ValueError(f"nf4_matmul: in_features ({k}) and the K tile ({bk}) must be multiples of the "
                         f"quantization block ({blocksize})")
    k_per = triton.cdiv(triton.cdiv(k, split), bk) * bk  # each slice a whole number of BK columns
    split = triton.cdiv(k, k_per)
    partial = torch.empty((split, m, out_features), dtype=torch.float32, device=x.device) if split > 1 else y
    # Triton's CPU interpreter computes bf16 dots wrongly; products of bf16 values are exact in fp32, so the
    # interpreter gets fp32 operands and IEEE dots: the same result a GPU's bf16 dot accumulates in fp32
    dot_fp32 = x.dtype == torch.float32 or interpreting()
    common = dict(R=u.shape[-1] if has_lora else 16, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
                  PRECISION="ieee" if dot_fp32 else "tf32", DOT_FP32=dot_fp32)
    lora_args = (u if has_lora else x2, lora_b if has_lora else x2, bias if bias is not None else x2)
    _nf4_matmul_kernel[(triton.cdiv(out_features, bn), split, triton.cdiv(m, bm))](
        x2, packed, absmax, code, *lora_args, y, partial, m, out_features, k, k_per, x2.stride(0),
        u.stride(0) if has_lora else 0, y.stride(0), BLOCKSIZE=blocksize, BM=bm, BN=bn, BK=bk, SPLIT=split > 1,
        num_warps=warps, num_stages=stages, **common)
    if split > 1:
        _nf4_reduce_kernel[(triton.cdiv(out_features, 64), triton.cdiv(m, bm))](
            partial, *lora_args, y, m, out_features, split, u.stride(0) if has_lora else 0, y.stride(0),
            BM=bm, BN=64, **common)
    return y.view(*shape[:-1], out_features)
