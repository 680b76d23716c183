"""Kernel benchmark: Tandem's Triton kernels against eager torch, torch.compile and Liger, on one CUDA GPU.

    python benchmarks/bench_kernels.py [--tokens 8192] [--shapes qwen2.5-0.5b,...] [--json out.json]

For each operator and model shape (hidden sizes of Qwen2.5-0.5B/1.5B/7B and Llama-3.1-8B, bf16, `--tokens`
rows): forward, backward and forward+backward time (steady state, see cuda_ms; backward = both - forward),
queued from Python as eager training runs them and replayed from a CUDA graph (the GPU's time alone).
Memory-bound operators report achieved GB/s against the device-to-device copy bandwidth measured in the same
run; selective_logprobs (matmul-bound) reports TFLOP/s and its peak memory, with a trainable and with a
frozen LM head, and its peak memory at 16384 rows of a 152K vocabulary against the materialized logits.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

import torch

from kernels.logprobs import selective_logprobs
from kernels.nf4 import dequantize_nf4
from kernels.rms_norm import rms_norm, rms_norm_torch
from kernels.rope import apply_rope, apply_rope_torch
from kernels.swiglu import swiglu, swiglu_torch

SHAPES = {  # hidden, intermediate, q heads, kv heads, head dim, vocabulary
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64, 151936),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 4, 128, 152064),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128, 128256),
}
DT = torch.bfloat16


def cuda_ms(fn, repeats: int = 5, warmup: int = 3, target_ms: float = 40.0) -> float:
    """Steady-state milliseconds per call: calls queued back to back between two CUDA events (the host runs
    ahead as it does in training, so per-launch host overhead is hidden unless it exceeds the GPU time),
    as many as fill ~target_ms (3 to 100), median over `repeats`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def timed(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    iters = int(min(100, max(3, target_ms / max(timed(1), 1e-3))))
    return statistics.median(timed(iters) for _ in range(repeats))


def copy_bandwidth_gbs() -> float:
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MiB
    y = torch.empty_like(x)
    return 2 * x.numel() / cuda_ms(lambda: y.copy_(x)) / 1e6


def graph_ms(fn, label: str = "") -> float | None:
    """Milliseconds per call of fn replayed from a CUDA graph: the GPU's time alone, without the host's
    launch and autograd overhead. None when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = cuda_ms(graph.replay)
        del graph
        return ms
    except Exception as e:  # e.g. a peer that synchronizes with the host
        print(f"no CUDA graph for {label}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
        torch.cuda.synchronize()
        return None
    finally:
        torch.cuda.empty_cache()  # a graph's private memory pool, released


def time_op(fn, make_inputs, label: str = "", graph: bool = True) -> dict:
    """Forward, backward (= both - forward) and forward+backward milliseconds, queued (host overhead
    included, as in eager training) and replayed from a CUDA graph (GPU time only), and the peak MiB of
    forward+backward above the inputs."""
    inputs = make_inputs()
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [randn(*o.shape, dtype=o.dtype) for o in outs]
    del outs  # holding this graph would pin its gradient accumulators to the default stream (no capture)

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def both():
        for t in inputs:
            t.grad = None
        o = fn(*inputs)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)

    fwd, tot = cuda_ms(forward), cuda_ms(both)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    both()
    torch.cuda.synchronize()
    row = dict(fwd_ms=fwd, bwd_ms=tot - fwd, total_ms=tot,
               peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20)
    if not graph:
        return row
    g_fwd, g_tot = graph_ms(forward, f"{label} forward"), graph_ms(both, f"{label} forward+backward")
    if g_fwd is not None and g_tot is not None:
        row.update(fwd_gpu_ms=g_fwd, bwd_gpu_ms=g_tot - g_fwd, total_gpu_ms=g_tot)
    return row


def leaf(*shape, scale=1.0):
    return (randn(*shape, dtype=DT) * scale).requires_grad_(True)


_GEN: torch.Generator | None = None


def generator() -> torch.Generator:
    """Inputs come from a generator of their own: a CUDA graph capture that fails (a peer that cannot be
    captured) leaves the default generator unusable."""
    global _GEN
    if _GEN is None:
        _GEN = torch.Generator(device="cuda").manual_seed(0)
    return _GEN


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator())


def randint(high, n):
    return torch.randint(0, high, (n,), device="cuda", generator=generator())


def liger():
    try:
        import liger_kernel.ops.fused_linear_cross_entropy as flce
        import liger_kernel.ops.rms_norm as lrms
        import liger_kernel.ops.rope as lrope
        import liger_kernel.ops.swiglu as lswiglu
    except ImportError:
        return None
    return dict(
        rms_norm=lambda x, w: lrms.LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        swiglu=lambda g, u: lswiglu.LigerSiLUMulFunction.apply(g, u),
        rope=lambda q, k, c, s: lrope.LigerRopeFunction.apply(q, k, c, s),
        logprobs=lambda h, w, t: -flce.LigerFusedLinearCrossEntropyFunction.apply(h, w, t, None, None, -100, 0.0,
                                                                                   0.0, "none")[0],
    )


def first(out):
    return out[0] if isinstance(out, tuple) else out


def with_head(fn, weight, hidden):
    """fn(hidden, weight) with the head bound, so that the head is not one of the timed op's inputs."""
    return first(fn(hidden, weight))


def full_logits_logprobs(hidden, weight, targets):
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1)


def bench_shape(name: str, n: int, peers, only: set[str] | None = None) -> list[dict]:
    hidden, inter, hq, hk, hd, vocab = SHAPES[name]
    rows = []

    def record(op, impl, fn, make_inputs, bytes_fwd=None, bytes_bwd=None, flops=None):
        try:
            # Liger's fused linear cross-entropy reads a count back to the host: not capturable, and a failed
            # capture leaves the device in a state that spoils the captures after it
            graph = "FLCE" not in impl
            row = dict(shape=name, op=op, impl=impl, **time_op(fn, make_inputs, f"{name} {op} {impl}", graph))
        except Exception as e:  # a peer that cannot run this shape is reported, not fatal
            rows.append(dict(shape=name, op=op, impl=impl, error=f"{type(e).__name__}: {e}"[:200]))
            return
        fwd, bwd, tot = (row.get(f"{k}_gpu_ms", row[f"{k}_ms"]) for k in ("fwd", "bwd", "total"))
        if bytes_fwd:  # bandwidth from the GPU time: what the kernel achieves once launched
            row.update(fwd_gbs=bytes_fwd / fwd / 1e6, bwd_gbs=bytes_bwd / max(bwd, 1e-6) / 1e6)
        if flops:
            row.update(tflops=flops / tot / 1e9)
        rows.append(row)

    rms_inputs = lambda: (leaf(n, hidden), leaf(hidden))  # noqa: E731
    swi_inputs = lambda: (leaf(n, inter, scale=3.0), leaf(n, inter))  # noqa: E731
    batch, seq = 1, n
    angles = randn(1, seq, hd // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(DT), torch.cat([angles.sin()] * 2, -1).to(DT)
    # q and k as HF makes them: (B, T, H, D) projections seen as (B, H, T, D); leaves, so that nothing
    # upstream of them is differentiated in the timing
    rope_inputs = lambda: tuple(leaf(batch, seq, h, hd).transpose(1, 2).detach().requires_grad_()  # noqa: E731
                                for h in (hq, hk))
    ops = {
        "rms_norm": (rms_inputs, {"triton": lambda x, w: rms_norm(x, w, 1e-6),
                                  "eager": lambda x, w: rms_norm_torch(x, w, 1e-6),
                                  "compile": torch.compile(lambda x, w: rms_norm_torch(x, w, 1e-6))},
                     4 * n * hidden, 6 * n * hidden),
        "swiglu": (swi_inputs, {"triton": swiglu, "eager": swiglu_torch, "compile": torch.compile(swiglu_torch)},
                   6 * n * inter, 10 * n * inter),
        "rope": (rope_inputs, {"triton": lambda q, k: apply_rope(q, k, cos, sin),
                               "eager": lambda q, k: apply_rope_torch(q, k, cos, sin),
                               "compile": torch.compile(lambda q, k: apply_rope_torch(q, k, cos, sin))},
                 4 * n * (hq + hk) * hd, 4 * n * (hq + hk) * hd),
    }
    ops = {k: v for k, v in ops.items() if only is None or k in only}
    for op, (make, impls, b_fwd, b_bwd) in ops.items():
        if peers:
            impls = {**impls, "liger": (lambda f: (lambda *a: f(*a, cos, sin)) if op == "rope" else f)(peers[op])}
        for impl, fn in impls.items():
            record(op, impl, fn, make, b_fwd, b_bwd)

    if only is None or "selective_logprobs" in only:
        targets = randint(vocab, n)
        for frozen in (False, True):
            # trainable head: d hidden and d weight (6NHV useful FLOPs); frozen (LoRA): d hidden only (4NHV).
            # (The chunked torch twin is a correctness reference, not a contender: tests/, not timed here.)
            lp_impls = {"triton": lambda h, w: selective_logprobs(h, w, targets),
                        "eager (full logits)": lambda h, w: full_logits_logprobs(h, w, targets),
                        "compile (full logits)": torch.compile(lambda h, w: full_logits_logprobs(h, w, targets))}
            if peers:
                lp_impls["liger FLCE"] = lambda h, w: peers["logprobs"](h, w, targets)
            weight = leaf(vocab, hidden, scale=0.02).requires_grad_(not frozen)
            head = "frozen head" if frozen else "trainable head"
            for impl, fn in lp_impls.items():
                record("selective_logprobs", f"{impl}, {head}", functools.partial(with_head, fn, weight),
                       lambda: (leaf(n, hidden),), flops=(4 if frozen else 6) * n * hidden * vocab)
            del weight

    if only is not None and "nf4_dequant" not in only:
        return rows
    import bitsandbytes.functional as F

    w = randn(inter, hidden, dtype=DT)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(dequantize_nf4(packed, state), F.dequantize_4bit(packed, state))
    nbytes = w.numel() // 2 + w.numel() * 2
    for impl, fn in {"triton": lambda: dequantize_nf4(packed, state),
                     "bitsandbytes": lambda: F.dequantize_4bit(packed, state)}.items():
        ms, gpu_ms = cuda_ms(fn), graph_ms(fn, f"{name} nf4_dequant {impl}")
        rows.append(dict(shape=name, op="nf4_dequant", impl=impl, fwd_ms=ms, fwd_gpu_ms=gpu_ms,
                         fwd_gbs=nbytes / (gpu_ms or ms) / 1e6))
    return rows


def logits_memory_rows(n: int = 16384, hidden: int = 3584, vocab: int = 151936) -> list[dict]:
    """Peak memory of forward+backward above the inputs at N rows, against the materialized logits."""
    rows = [dict(shape=f"N={n} H={hidden} V={vocab}", op="logits memory", impl="materialized bf16 logits",
                 peak_mib=n * vocab * 2 / 2**20)]
    targets = randint(vocab, n)
    for frozen in (False, True):
        weight = leaf(vocab, hidden, scale=0.02).requires_grad_(not frozen)
        for impl, fn in {"triton": selective_logprobs, "eager (full logits)": full_logits_logprobs}.items():
            h, weight.grad = leaf(n, hidden), None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            first(fn(h, weight, targets)).backward(torch.ones(n, device="cuda"))
            torch.cuda.synchronize()
            rows.append(dict(shape=rows[0]["shape"], op="logits memory",
                             impl=f"{impl}, {'frozen' if frozen else 'trainable'} head",
                             peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20))
            del h
        del weight
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--ops", help="only these, comma-separated: rms_norm, swiglu, rope, selective_logprobs, "
                        "nf4_dequant")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    copy = copy_bandwidth_gbs()
    peers = liger()
    rows = []

    def save():  # after every shape, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy, "tokens": args.tokens,
                           "rows": rows}, f, indent=1)

    for name in filter(None, args.shapes.split(",")):  # --shapes "" measures only the logits memory
        rows += bench_shape(name, args.tokens, peers, set(args.ops.split(",")) if args.ops else None)
        save()
    rows += logits_memory_rows()
    save()
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; copy bandwidth {copy:.0f} GB/s; "
          f"{args.tokens} tokens, bf16")
    print("| shape | op | impl | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd ms, GPU | fwd GB/s (% copy) | bwd GB/s | "
          "TFLOP/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['op']} | {r['impl']} | error: {r['error']} ||||||||")
            continue
        gbs = f"{r['fwd_gbs']:.0f} ({100 * r['fwd_gbs'] / copy:.0f}%)" if "fwd_gbs" in r else ""
        gpu = r.get("total_gpu_ms", r.get("fwd_gpu_ms") if "total_ms" not in r else None)
        print(f"| {r['shape']} | {r['op']} | {r['impl']} | {r.get('fwd_ms', nan):.3f} | {r.get('bwd_ms', nan):.3f} | "
              f"{r.get('total_ms', nan):.3f} | {gpu if gpu is None else f'{gpu:.3f}'} | {gbs} | "
              f"{r.get('bwd_gbs', 0):.0f} | {r.get('tflops', 0):.0f} | {r.get('peak_mib', 0):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
