"""Where a decode step's GPU time goes: the native engine's kernels by total time, on one CUDA GPU.

    python benchmarks/profile_decode.py [--shape qwen2.5-1.5b] [--quant bf16] [--batch 64] [--context 1024]

Generates `--context` tokens for `--batch` rows (graphs off, so that the profiler sees each kernel), then
profiles 16 more decode steps and prints the kernels by GPU time per step, with their count per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.` imports from a checkout

import argparse

from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_rollout import load, prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b")
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=25)
    a = parser.parse_args(argv)
    from rollout import NativeEngine, SamplingParams

    model, tokenizer = load(a.shape, a.quant)
    engine = NativeEngine(model, tokenizer, cuda_graphs=False)
    ps = prompts(a.batch, len(tokenizer))
    steps = 16
    engine.generate(ps, SamplingParams(max_tokens=a.context, temperature=1.0, stop_token_ids=[], seed=0))
    base = SamplingParams(max_tokens=a.context - steps, temperature=1.0, stop_token_ids=[], seed=0)
    full = SamplingParams(max_tokens=a.context, temperature=1.0, stop_token_ids=[], seed=0)
    engine.generate(ps, base)
    with profile(activities=[ProfilerActivity.CUDA]) as short:
        engine.generate(ps, base)
    with profile(activities=[ProfilerActivity.CUDA]) as long:
        engine.generate(ps, full)
    # the difference of the two runs is `steps` decode steps at the end of the context
    per: dict[str, list[float]] = {}
    for sign, prof in ((1, long), (-1, short)):
        for e in prof.key_averages():
            t = per.setdefault(e.key, [0.0, 0.0])
            t[0] += sign * e.device_time_total / steps
            t[1] += sign * e.count / steps
    rows = sorted(((k, v) for k, v in per.items() if v[0] > 0.05), key=lambda kv: -kv[1][0])
    total = sum(v[0] for _, v in rows)
    print(f"{a.shape} {a.quant} batch {a.batch}, context {a.context}: {total / 1e3:.3f} ms of GPU time per "
          f"decode step, {sum(v[1] for _, v in rows):.0f} kernels")
    print("| us/step | % | launches/step | kernel |\n|---|---|---|---|")
    for k, (t, n) in rows[:a.rows]:
        print(f"| {t:.1f} | {100 * t / total:.1f} | {n:.0f} | {k[:110]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
