"""SwiGLU: y = silu(gate) * up, the activation of Llama/Qwen/Mistral MLPs.

Triton: elementwise over the flattened tensors, in fp32 registers; the backward recomputes the sigmoid
rather than saving it.

Gradient (s = sigmoid(gate), silu(gate) = gate * s, ds/dgate = s (1 - s)):
    dup   = dy * gate * s
    dgate = dy * up * d(gate s)/dgate = dy * up * s * (1 + gate (1 - s))
"""

from __future__ import annotations

import torch

from kernels.backend import HAVE_TRITON, use_triton


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    @triton.jit
    def _forward(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        silu = cast_to(g * tl.sigmoid(g), G.dtype.element_ty).to(tl.float32)  # HF rounds silu(gate) to the dtype
        tl.store(Y + offs, cast_to(silu * u, Y.dtype.element_ty), mask=m)

    @triton.jit
    def _backward(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DU + offs, cast_to(dy * g * s, DU.dtype.element_ty), mask=m)
        tl.store(DG + offs, cast_to(dy * u * s * (1.0 + g * (1.0 - s)), DG.dtype.element_ty), mask=m)


    @triton.jit
    def _forward_concatenated(GU, Y, n, width, BLOCK: tl.constexpr):
        # GU rows are [gate | up], each `width` wide: no copies of the two halves first
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        row, col = offs // width, offs % width
        g = tl.load(GU + row * 2 * width + col, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * width + width + col, mask=m, other=0.0).to(tl.float32)
        silu = cast_to(g * tl.sigmoid(g), GU.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, cast_to(silu * u, Y.dtype.element_ty), mask=m)


_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate_c, up_c = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate_c)
        n = gate_c.numel()
        _forward[(triton.cdiv(n, _BLOCK),)](gate_c, up_c, y, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate_c, up_c)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _backward[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return _SwiGLU.apply(gate, up)
    return swiglu_torch(gate, up)


def swiglu_concatenated(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension (the output of one matmul by the
    concatenated gate and up weights), without copying the halves out first. For inference: no autograd."""
    gate, up = gate_up.chunk(2, dim=-1)
    if not use_triton(gate_up) or gate_up.requires_grad or not gate_up.is_contiguous():
        return swiglu_torch(gate, up)
    y = torch.empty(gate.shape, dtype=gate_up.dtype, device=gate_up.device)
    n = y.numel()
    _forward_concatenated[(triton.cdiv(n, _BLOCK),)](gate_up, y, n, gate.shape[-1], BLOCK=_BLOCK)
    return y
