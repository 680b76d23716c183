"""Rotary position embedding of Q and K together, HF's `rotate_half` convention.

    q_out = q * cos + rotate_half(q) * sin,   rotate_half([x1, x2]) = [-x2, x1]   (halves of the head dim)
    q, k: (B, H, T, D) (any strides with a contiguous last dim); cos, sin: (B or 1, T, D) as HF returns them.

Triton: one launch; each program takes one (or a few) (batch, position) pairs and rotates every head of Q
and K there, reading cos/sin once.

Gradient: per pair of halves the forward is the linear map
    out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2
whose transpose gives
    dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1
(with HF's duplicated halves, c1 = c2 and s1 = s2: a rotation by -angle).

HF's rotary modules return cos and sin as cat(freqs, freqs).cos() / .sin(): their two halves are equal, and
the kernel reads only the first half of each (the twin, written for any cos/sin, reads both). At 0.5B
shapes cos/sin are ~1/8 of the bytes moved, so this is measurable.
"""

from __future__ import annotations

import torch

from kernels.backend import HAVE_TRITON, use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    @triton.jit
    def _rotate_heads(X, Y, x_sh, y_sh, n_heads, c, s, d, dm,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
        h = tl.arange(0, BLOCK_H)
        m = (h < n_heads)[:, None] & dm[None, :]
        x_ptr = X + h[:, None] * x_sh + d[None, :]
        x1 = tl.load(x_ptr, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: a rotation by -angle
            o1 = x1 * c[None, :] + x2 * s[None, :]
            o2 = x2 * c[None, :] - x1 * s[None, :]
        else:
            o1 = x1 * c[None, :] - x2 * s[None, :]
            o2 = x2 * c[None, :] + x1 * s[None, :]
        y_ptr = Y + h[:, None] * y_sh + d[None, :]
        tl.store(y_ptr, cast_to(o1, Y.dtype.element_ty), mask=m)
        tl.store(y_ptr + HALF, cast_to(o2, Y.dtype.element_ty), mask=m)

    # lengths and token counts vary by batch: one compiled variant for all of them
    @triton.jit(do_not_specialize=["seq_len", "n_tokens"])
    def _rotate(Q, K, QO, KO, COS, SIN, q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st,
                c_sb, c_st, n_q, n_k, seq_len, n_tokens,
                HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                BACKWARD: tl.constexpr, TOKENS: tl.constexpr):
        # TOKENS (batch, position) pairs per program: for each, cos/sin read once, then every head of Q and K
        d = tl.arange(0, BLOCK_D)
        dm = d < HALF
        for i in tl.static_range(TOKENS):
            # past the last position a program redoes the last one: the same values to the same addresses
            token = tl.minimum(tl.program_id(0) * TOKENS + i, n_tokens - 1)
            b = token // seq_len
            t = token % seq_len
            c_base = COS + b * c_sb + t * c_st
            s_base = SIN + b * c_sb + t * c_st
            c = tl.load(c_base + d, mask=dm, other=0.0).to(tl.float32)  # first halves only: HF's are equal
            s = tl.load(s_base + d, mask=dm, other=0.0).to(tl.float32)
            _rotate_heads(Q + b * q_sb + t * q_st, QO + b * qo_sb + t * qo_st, q_sh, qo_sh, n_q, c, s, d, dm,
                          HALF, BLOCK_HQ, BACKWARD)
            _rotate_heads(K + b * k_sb + t * k_st, KO + b * ko_sb + t * ko_st, k_sh, ko_sh, n_k, c, s, d, dm,
                          HALF, BLOCK_HK, BACKWARD)

    @triton.jit
    def _rotate_and_store(Q, K, V, QO, K_CACHE, V_CACHE, COS, SIN, SLOT, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh,
                          qo_sb, qo_sh, kc_sb, kc_sh, kc_sl, vc_sb, vc_sh, vc_sl, c_sb, n_q, n_k,
                          HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        # decode: one program per row; Q rotated to QO, K rotated and V copied into the caches at the slot
        b = tl.program_id(0)
        slot = tl.load(SLOT)
        d = tl.arange(0, BLOCK_D)
        dm = d < HALF
        c = tl.load(COS + b * c_sb + d, mask=dm, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * c_sb + d, mask=dm, other=0.0).to(tl.float32)
        _rotate_heads(Q + b * q_sb, QO + b * qo_sb, q_sh, qo_sh, n_q, c, s, d, dm, HALF, BLOCK_HQ, False)
        _rotate_heads(K + b * k_sb, K_CACHE + b * kc_sb + slot * kc_sl, k_sh, kc_sh, n_k, c, s, d, dm, HALF,
                      BLOCK_HK, False)
        h = tl.arange(0, BLOCK_HK)
        full = tl.arange(0, 2 * BLOCK_D)
        m = (h < n_k)[:, None] & (full < 2 * HALF)[None, :]
        v = tl.load(V + b * v_sb + h[:, None] * v_sh + full[None, :], mask=m)
        tl.store(V_CACHE + b * vc_sb + slot * vc_sl + h[:, None] * vc_sh + full[None, :], v, mask=m)

    def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
                num_warps: int = 4, tokens_per_program: int = 1):
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        (b, hq, t, d), hk = q.shape, k.shape[1]
        qo, ko = torch.empty_like(q), torch.empty_like(k)  # same memory order: each program writes one run
        c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
        grid = (triton.cdiv(b * t, tokens_per_program),)
        _rotate[grid](q, k, qo, ko, cos, sin, *(x.stride(i) for x in (q, k, qo, ko) for i in (0, 1, 2)),
                      c_sb, cos.stride(1), hq, hk, t, b * t, HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq),
                      BLOCK_HK=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(d // 2),
                      BACKWARD=backward, TOKENS=tokens_per_program, num_warps=num_warps)
        return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return (*_launch(dq, dk, cos, sin, True), None, None)


def _store_kv(k, v, k_cache, v_cache, slots) -> None:
    rows = k.shape[0]
    k_cache[:rows].index_copy_(2, slots, k.to(k_cache.dtype))
    v_cache[:rows].index_copy_(2, slots, v.to(v_cache.dtype))


def rope_and_store_kv_torch(q, k, v, cos, sin, k_cache, v_cache, slots):
    q, k = apply_rope_torch(q, k, cos, sin)
    _store_kv(k, v, k_cache, v_cache, slots)
    return q


def rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots: torch.Tensor) -> torch.Tensor:
    """RoPE, and K (rotated) and V written into the caches at `slots` of rows 0..B-1 (inference: no autograd).

    q (B, Hq, T, D), k and v (B, Hk, T, D), cos/sin (B or 1, T, D); k_cache/v_cache (>= B, Hk, L, D); slots:
    T slot indices on the device. Returns the rotated q. A decode step (T = 1) is one launch that reads the
    slot on the device (a captured CUDA graph replays at any slot); a prefill is apply_rope and two copies."""
    d = q.shape[-1]
    ok = (use_triton(q) and d % 2 == 0 and q.shape[2] == 1 and not torch.is_grad_enabled()
          and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin, k_cache, v_cache)))
    if not ok:
        q, k = apply_rope(q, k, cos, sin)
        _store_kv(k, v, k_cache, v_cache, slots)
        return q
    (b, hq, _, _), hk = q.shape, k.shape[1]
    qo = torch.empty_like(q)
    half_block = triton.next_power_of_2(d // 2)
    _rotate_and_store[(b,)](q, k, v, qo, k_cache, v_cache, cos, sin, slots, q.stride(0), q.stride(1), k.stride(0),
                            k.stride(1), v.stride(0), v.stride(1), qo.stride(0), qo.stride(1),
                            *k_cache.stride()[:3], *v_cache.stride()[:3], 0 if cos.shape[0] == 1 else cos.stride(0),
                            hq, hk, HALF=d // 2, BLOCK_HQ=triton.next_power_of_2(hq),
                            BLOCK_HK=triton.next_power_of_2(hk), BLOCK_D=half_block)
    return qo


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q, k) rotated; gradients flow to q and k (cos and sin are constants of the positions)."""
    if use_triton(q) and q.shape[-1] % 2 == 0:
        return _Rope.apply(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)
