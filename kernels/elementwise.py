"""Pure-PyTorch twins of the per-token operators of a Llama-style decoder layer.

Each follows the Hugging Face modelling code's convention exactly (RMSNorm computed in fp32 and cast back;
RoPE with `rotate_half`), so that a model patched with the Triton versions computes the same function.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps), normalised in fp32 like HF's LlamaRMSNorm."""
    dtype = x.dtype
    xf = x.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: (B, H, T, D); cos, sin: (B or 1, T, D) as HF's rotary embedding module returns them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up
