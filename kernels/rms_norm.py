"""RMSNorm: y = weight * cast(x / sqrt(mean(x^2) + eps)), normalised in fp32 like HF's LlamaRMSNorm.

Triton: tiles of rows per program for the forward (keeps each row's 1/rms for the backward); the backward
recomputes x_hat from x and 1/rms, and accumulates dW per program in fp32 before one final sum.

Gradient (r = 1/rms, x_hat = x * r, g = dy * weight):
    r = (mean(x^2) + eps)^(-1/2)          dr/dx_j = -r^3 x_j / N
    dx_j = sum_i g_i d(x_i r)/dx_j = r g_j - r^3 x_j / N sum_i g_i x_i
         = r (g_j - x_hat_j mean(g * x_hat))
    dweight = sum over rows of dy * x_hat        (x_hat in the input dtype, as the forward uses it)
The cast of x_hat to the input dtype is treated as the identity in the backward, as autograd does.
"""

from __future__ import annotations

import functools

import torch

from kernels.backend import HAVE_TRITON, use_triton


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    # the row count changes with every batch's length: left unspecialized, or Triton compiles a new variant
    # (about a second, mid-run) whenever its divisibility by 16 changes; it only bounds masks
    @triton.jit(do_not_specialize=["n_rows"])
    def _forward(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # ROWS rows per program, so that short rows (896 columns) still give each program a few KB to move
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        rm = rows < n_rows
        m = rm[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        # x_hat rounded to the input dtype, as HF does before the weight multiply; the product is formed in
        # fp32 and rounded once, which equals a correctly rounded 16-bit product
        x_hat = cast_to(x * rstd[:, None], X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = cast_to(w[None, :] * x_hat, Y.dtype.element_ty)
        tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y, mask=m)
        tl.store(RSTD + rows, rstd, mask=rm)

    @triton.jit(do_not_specialize=["n_rows"])
    def _add_forward(X, D, W, H, Y, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # inference: the residual sum h = x + d, rounded to the dtype as `x + d` is, stored, and normalized
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        m = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.load(D + offs, mask=m, other=0.0).to(tl.float32)
        h = cast_to(x + d, H.dtype.element_ty)
        tl.store(H + offs, h, mask=m)
        h = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / n_cols + eps)
        x_hat = cast_to(h * rstd[:, None], H.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(Y + offs, cast_to(w[None, :] * x_hat, Y.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
    def _backward(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # each program walks its share of rows ROWS at a time (several loads in flight) and keeps its dW
        # partial sum in fp32 registers until the end
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cm = cols < n_cols
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        start = pid * rows_per_program
        end = tl.minimum(start + rows_per_program, n_rows)
        for first in range(start, end, ROWS):
            rows = first + tl.arange(0, ROWS)
            rm = rows < end
            m = rm[:, None] & cm[None, :]
            r64 = rows[:, None].to(tl.int64)
            x = tl.load(X + r64 * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rm, other=0.0)[:, None]
            x_hat = x * rstd
            g = dy * w[None, :]
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
            tl.store(DX + r64 * stride_dx + cols[None, :], cast_to(dx, DX.dtype.element_ty), mask=m)
            dw += dy * cast_to(x_hat, X.dtype.element_ty).to(tl.float32)
        tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw, axis=0), mask=cm)


def _rows_per_tile(block: int) -> int:
    return max(1, min(16, 4096 // block))  # a tile of ~4K elements: 16 rows of 256, 4 of 1024, 1 of 4096


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows, n = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        tile = _rows_per_tile(block)
        _forward[(triton.cdiv(rows, tile),)](x2, weight, y, rstd, x2.stride(0), y.stride(0), rows, n, eps,
                                              ROWS=tile, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(rows, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(n)
        tile = _rows_per_tile(block)
        programs = max(1, min(triton.cdiv(rows, tile), 2 * _sm_count(x2.device)))
        per_program = triton.cdiv(triton.cdiv(rows, programs), tile) * tile
        programs = triton.cdiv(rows, per_program)
        dw_part = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        _backward[(programs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
                               rows, n, per_program, ROWS=tile, BLOCK=block)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:  # a device query costs host time on every backward otherwise
    return torch.cuda.get_device_properties(index).multi_processor_count


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if use_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(h, rms_norm(h)) with h = x + delta: a residual add and the next norm in one pass (inference: no
    autograd). The decode path's pattern, twice per layer."""
    fused = use_triton(x) and not (torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad))
    if not fused or x.shape != delta.shape or x.dtype != delta.dtype or not (x.is_contiguous() and
                                                                            delta.is_contiguous()):
        h = x + delta
        return h, rms_norm(h, weight, eps)
    n = x.shape[-1]
    rows = x.numel() // n
    h = torch.empty_like(x)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    tile = _rows_per_tile(block)
    _add_forward[(triton.cdiv(rows, tile),)](x, delta, weight, h, y, rows, n, eps, ROWS=tile, BLOCK=block)
    return h, y
