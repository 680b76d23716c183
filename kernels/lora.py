"""A LoRA linear layer over an NF4 base weight: y = x W^T + bias + s (x A^T) B^T, W dequantized on the fly.

    y = nf4_lora_linear(x, packed, quant_state, lora_a, lora_b, scale, bias=None)
    # x (..., in); packed/quant_state: bitsandbytes' 4-bit weight of shape (out, in);
    # lora_a (r, in), lora_b (out, r); the LoRA path runs in the adapters' dtype, as peft runs it.

The dense W exists only for the duration of one matmul, in the forward and again in the backward (it is
never saved), so the 4-bit base costs its packed size between the two. The base weight is frozen: no
gradient is formed for it.

Gradient (xa = x A^T, the only activation saved besides x):
    dx = dy W + s (dy B) A          dA = s (dy B)^T x          dB = s dy^T xa
"""

from __future__ import annotations

import torch

from kernels.nf4 import dequantize_nf4, dequantize_nf4_torch


def nf4_lora_linear_torch(x, packed, quant_state, lora_a, lora_b, scale: float, bias=None):
    w = dequantize_nf4_torch(packed, quant_state).to(x.dtype)
    y = x @ w.T
    if bias is not None:
        y = y + bias
    lora = (x.to(lora_a.dtype) @ lora_a.T) @ lora_b.T
    return (y + (lora * scale).to(y.dtype)).to(x.dtype)


class _NF4LoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, lora_a, lora_b, scale, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w = dequantize_nf4(packed, quant_state).to(x.dtype)  # (out, in), freed after the matmul
        y = x2 @ w.T
        del w
        if bias is not None:
            y = y + bias
        xa = x2.to(lora_a.dtype) @ lora_a.T  # (N, r)
        y = y + ((xa @ lora_b.T) * scale).to(y.dtype)
        ctx.save_for_backward(x2, packed, lora_a, lora_b, xa)
        ctx.quant_state, ctx.scale, ctx.shape, ctx.has_bias = quant_state, scale, shape, bias is not None
        return y.to(x.dtype).view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, packed, lora_a, lora_b, xa = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dy_b = dy2.to(lora_b.dtype) @ lora_b  # (N, r)
        dx = None
        if ctx.needs_input_grad[0]:
            w = dequantize_nf4(packed, ctx.quant_state).to(dy2.dtype)
            dx = (dy2 @ w + ((dy_b @ lora_a) * ctx.scale).to(dy2.dtype)).view(ctx.shape)
        d_a = (dy_b.T @ x2.to(lora_a.dtype)) * ctx.scale if ctx.needs_input_grad[3] else None
        d_b = (dy2.to(lora_b.dtype).T @ xa) * ctx.scale if ctx.needs_input_grad[4] else None
        d_bias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[6] else None
        return dx, None, None, d_a, d_b, None, d_bias


def nf4_lora_linear(x, packed, quant_state, lora_a, lora_b, scale: float, bias=None):
    return _NF4LoRA.apply(x, packed, quant_state, lora_a, lora_b, float(scale), bias)
