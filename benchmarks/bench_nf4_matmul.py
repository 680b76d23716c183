"""The decode-time NF4 matmul (kernels/nf4_matmul.py) at decode shapes, against a bf16 matmul, bitsandbytes'
4-bit matmul and the bandwidth floor of reading the 4-bit weight, on one CUDA GPU.

    python benchmarks/bench_nf4_matmul.py [--rows 1,8,16] [--sweep]

Times are GPU times of 50 calls replayed from one CUDA graph (no host overhead). --sweep tries tile shapes
and K splits.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import torch.nn.functional as F

from kernels.nf4 import absmax_fp32
from kernels.nf4_matmul import nf4_matmul

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}  # 1.5B


def graph_us(fn, calls=50) -> float:
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


def bench(name: str, n: int, k: int, m: int, bw: float, sweep: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / 30
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    absmax, code = absmax_fp32(state), state.code.float()
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    nbytes = n * k / 2 + absmax.numel() * 4
    impls = {"bf16 F.linear": lambda: F.linear(x, w),
             "bitsandbytes matmul_4bit": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
             "tandem nf4_matmul": lambda: nf4_matmul(x, packed, absmax, code, n)}
    if sweep:
        for bn, bk, warps, split, stages in itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8), (1, 4, 16),
                                                             (1, 3)):
            impls[f"BN{bn} BK{bk} w{warps} split{split} stages{stages}"] = functools.partial(
                nf4_matmul, x, packed, absmax, code, n, plan=(16, bn, bk, warps, split, stages))
    for impl, fn in impls.items():
        try:
            us = graph_us(fn)
        except Exception as e:  # noqa: BLE001  (a tile shape that does not compile is reported, not fatal)
            print(f"| {name} | {m} | {impl} | error: {str(e).splitlines()[0][:80]} | | |")
            continue
        print(f"| {name} | {m} | {impl} | {us:.1f} | {nbytes / us / 1e3:.0f} | {nbytes / bw / 1e3:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--sweep", action="store_true")
    a = parser.parse_args(argv)
    x_ = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y_ = torch.empty_like(x_)
    bw = 2 * x_.numel() / graph_us(lambda: y_.copy_(x_), 5) / 1e3  # GB/s
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s")
    print("| weight | rows | impl | us | GB/s of 4-bit weight | floor us |\n|---|---|---|---|---|---|")
    for (name, (n, k)), m in itertools.product(SHAPES.items(), map(int, a.rows.split(","))):
        bench(name, n, k, m, bw, a.sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
