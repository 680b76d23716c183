"""Attention of one new query token per row over a static KV cache, split along the keys (flash-decoding).

    out = decode_attention(q, k_cache, v_cache, valid, scale)
    # q (B, KV heads, G, D): the G query heads that share each KV head; k_cache, v_cache (>= B, KV heads, >= L,
    # D), any strides with a contiguous last dim; valid (B, L) bool: which of the first L slots each row
    # attends to. -> (B, KV heads, G, D)

A decode step has B x KV-heads independent problems of G query rows each, far too few to fill a GPU when
each walks its keys serially (B = 8 and 2 KV heads make 16 programs for 132 multiprocessors). The keys are
cut into slices, each program computes its slice's softmax statistics (running max m, sum l) and weighted
values, and a second kernel combines the slices exactly:
    out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,   M = max_s m_s.
The slot mask is read as it is (no additive float mask built per layer), and the query heads of a KV head
share every load of K and V (no copy of K and V per query head).

Inference only (no autograd). The PyTorch twin is scaled_dot_product_attention on the same grouping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import HAVE_TRITON, interpreting, use_triton


def decode_attention_torch(q, k_cache, v_cache, valid, scale: float):
    b, length = valid.shape
    keys, values = k_cache[:b, :, :length], v_cache[:b, :, :length]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None, :], scale=scale)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    @triton.jit
    def _partial_kernel(Q, K, V, VALID, M_OUT, L_OUT, ACC, length, per_split, n_kv, group, head_dim,
                        sq_b, sq_h, sq_g, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, s_valid, scale, n_split,
                        GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                        PRECISION: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b, h = bh // n_kv, bh % n_kv
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        d_ok = d < head_dim
        q = tl.load(Q + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :],
                    mask=(g[:, None] < group) & d_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        m = tl.full((GP,), -1e30, dtype=tl.float32)  # finite: a slice with no valid key contributes exp(-1e30)=0
        total = tl.zeros((GP,), dtype=tl.float32)
        acc = tl.zeros((GP, D), dtype=tl.float32)
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            ok = tl.load(VALID + b * s_valid + n, mask=n_ok, other=0) != 0
            k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_l + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_l + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(cast_to(p, V.dtype.element_ty), v)
            m = m_new
        row = bh * n_split + split
        tl.store(M_OUT + row * GP + g, m)
        tl.store(L_OUT + row * GP + g, total)
        tl.store(ACC + (row * GP + g[:, None]) * D + d[None, :], acc)

    @triton.jit
    def _combine_kernel(M_IN, L_IN, ACC, OUT, n_kv, group, head_dim, n_split, so_b, so_h, so_g,
                        GP: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // n_kv, bh % n_kv
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        top = tl.full((GP,), -1e30, dtype=tl.float32)
        for s in range(n_split):
            top = tl.maximum(top, tl.load(M_IN + (bh * n_split + s) * GP + g))
        total = tl.zeros((GP,), dtype=tl.float32)
        out = tl.zeros((GP, D), dtype=tl.float32)
        for s in range(n_split):  # a fixed order: the result does not depend on which slice finished first
            row = bh * n_split + s
            w = tl.exp(tl.load(M_IN + row * GP + g) - top)
            total += w * tl.load(L_IN + row * GP + g)
            out += w[:, None] * tl.load(ACC + (row * GP + g[:, None]) * D + d[None, :])
        out = out / total[:, None]
        tl.store(OUT + b * so_b + h * so_h + g[:, None] * so_g + d[None, :], cast_to(out, OUT.dtype.element_ty),
                 mask=(g[:, None] < group) & (d[None, :] < head_dim))


_TARGET_PROGRAMS = 2 * 132  # two per multiprocessor of an H100/H200


def _block_n(head_dim: int) -> int:
    # keys per iteration: 64 x 128-dim K and V tiles take 250 registers a thread at 4 warps (two programs per
    # multiprocessor, compiled for sm_90); 32 of them take 168 (three)
    return 64 if head_dim <= 64 else 32


def _splits(problems: int, length: int, block_n: int) -> int:
    blocks = triton.cdiv(length, block_n)
    return max(1, min(blocks, triton.cdiv(_TARGET_PROGRAMS, problems)))


def decode_attention(q, k_cache, v_cache, valid, scale: float, splits: int | None = None):
    if not use_triton(q):
        return decode_attention_torch(q, k_cache, v_cache, valid, scale)
    b, n_kv, group, head_dim = q.shape
    length = valid.shape[1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or valid.stride(-1) != 1:
        raise ValueError("decode_attention needs a contiguous last dimension in q, the caches and valid")
    gp, d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))
    block_n = _block_n(head_dim)
    n_split = splits or _splits(b * n_kv, length, block_n)
    per_split = triton.cdiv(triton.cdiv(length, n_split), block_n) * block_n
    n_split = triton.cdiv(length, per_split)
    stats = torch.empty((2, b * n_kv * n_split, gp), dtype=torch.float32, device=q.device)
    acc = torch.empty((b * n_kv * n_split, gp, d), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    valid_bytes = valid.view(torch.uint8)
    # as in kernels/nf4_matmul.py: the interpreter's bf16 dots are wrong, so it gets fp32 operands
    dot_fp32 = q.dtype == torch.float32 or interpreting()
    _partial_kernel[(b * n_kv, n_split)](
        q, k_cache, v_cache, valid_bytes, stats[0], stats[1], acc, length, per_split, n_kv, group, head_dim,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], valid.stride(0), scale, n_split,
        GP=gp, D=d, BLOCK_N=block_n, DOT_FP32=dot_fp32, PRECISION="ieee" if dot_fp32 else "tf32")
    _combine_kernel[(b * n_kv,)](stats[0], stats[1], acc, out, n_kv, group, head_dim, n_split, *out.stride()[:3],
                                 GP=gp, D=d)
    return out
