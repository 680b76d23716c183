"""Launch shapes of two memory-bound kernels that miss their bandwidth target, on one CUDA GPU: RoPE at the
Qwen2.5-0.5B shape (9-12% behind Liger) and NF4 dequantization (38-59% of copy bandwidth).

    python benchmarks/sweep_launch.py

RoPE: positions per program x warps (one position's 14 + 2 heads of 64 dims are 4 KB), forward and
backward, against Liger's kernel. NF4: elements per program x warps at the 0.5B and 7B MLP shapes, against
bitsandbytes. GPU times from CUDA-graph replay (bench_kernels.graph_ms); bandwidth against a measured copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.` imports from a checkout

import functools
import itertools

import torch

from benchmarks.bench_kernels import graph_ms
from kernels.nf4 import dequantize_nf4
from kernels.rope import _launch


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def rate(nbytes: float, us: float, bw: float) -> str:
    return f"{nbytes / us / 1e3:.0f} ({100 * nbytes / us / 1e3 / bw:.0f}%)"


def copy_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / graph_ms(lambda: y.copy_(x)) / 1e6


def rope(bw: float) -> None:
    from liger_kernel.ops.rope import LigerRopeFunction

    n, hq, hk, d = 8192, 14, 2, 64
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    angles = torch.randn(1, n, d // 2, device="cuda").repeat(1, 1, 2)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    nbytes = 2 * (q.numel() + k.numel()) * 2 + cos.numel() * 2  # read and write q, k; cos/sin first halves
    print("| RoPE 0.5B | positions / program | warps | forward us | backward us | GB/s forward (% copy) |\n"
          "|---|---|---|---|---|---|")
    for tokens, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
        launch = functools.partial(_launch, q, k, cos, sin, num_warps=warps, tokens_per_program=tokens)
        fwd = graph_ms(functools.partial(launch, backward=False)) * 1e3
        bwd = graph_ms(functools.partial(launch, backward=True)) * 1e3
        print(row("Tandem", tokens, warps, f"{fwd:.1f}", f"{bwd:.1f}", rate(nbytes, fwd, bw)))
    ql, kl = q.clone(), k.clone()
    fwd = graph_ms(lambda: LigerRopeFunction.apply(ql, kl, cos, sin)) * 1e3
    print(row("Liger (in place)", "-", "-", f"{fwd:.1f}", "", rate(nbytes, fwd, bw)))


def nf4(bw: float) -> None:
    print("| NF4 dequant | elements / program | warps | us | GB/s (% copy) |\n|---|---|---|---|---|")
    for name, (rows, cols) in {"0.5B": (4864, 896), "7B": (18944, 3584)}.items():
        nf4_shape(name, rows, cols, bw)


def nf4_shape(name: str, rows: int, cols: int, bw: float) -> None:
    import bitsandbytes.functional as F

    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    nbytes = w.numel() // 2 + w.numel() * 2
    for elements, warps in itertools.product((2048, 4096, 8192, 16384), (2, 4, 8)):
        us = graph_ms(lambda e=elements, nw=warps: dequantize_nf4(packed, state, e, nw)) * 1e3
        print(row(name, elements, warps, f"{us:.1f}", rate(nbytes, us, bw)))
    us = graph_ms(lambda: F.dequantize_4bit(packed, state)) * 1e3
    print(row(f"{name} bitsandbytes", "-", "-", f"{us:.1f}", rate(nbytes, us, bw)))


def main() -> int:
    bw = copy_gbs()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    rope(bw)
    nf4(bw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
