"""What fits in a 16 GiB card: GRPO steps under a memory cap, by model shape and completion length.

    python benchmarks/bench_memory.py [--cap-gb 16] [--shapes qwen2.5-1.5b,qwen2.5-7b,llama-3.1-8b]
        [--lengths 1024,4096,8192,16384,32768] [--impls tandem-4bit,trl,unsloth] [--steps 1]
        [--cell-timeout 1200] [--json rows.json] [--logs cell-logs/]
    python benchmarks/bench_memory.py --smoke     # tiny model on the CPU: checks that the sweep runs

Each cell is one benchmarks/bench_grpo.py process with `--cap-gb` (every implementation's CUDA allocator
capped before anything is allocated, and its memory savers on): QLoRA r16, one prompt x 8 completions of
exactly `length` tokens (a random-init model rarely samples its end token), random-init weights of the
shape with the vocabulary cut to the SmolLM2 tokenizer's 49,152 (the real Llama-3.1 head is 128,256 wide:
about 1 GiB more of bf16 embeddings and head at 8B, for every implementation alike). Reported per cell:
Tandem's peak per phase and the plan its scheduler chose (micro-batch, activation policy, rollout waves),
every implementation's overall peak and seconds per step, or OOM. For each implementation the lengths run
in increasing order and stop at its first OOM or time-out: its largest length that fits is the last row
before it.
One step by default (the peaks are the first step's; its time includes one-time costs such as CUDA graph
capture): a step of 8 x 32K tokens is minutes for any of them. Tandem runs as `tandem-4bit` (decode batches
of up to 16 rows read the 4-bit codes, with no merged bf16 copy: the memory-lean path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("none", "checkpoint", "offload")


def run_cell(shape: str, impl: str, length: int, a) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_grpo.py"), "--shape", shape, "--impl", impl,
           "--steps", str(a.steps), "--completions", str(a.completions), "--tokens", str(length),
           "--cap-gb", str(a.cap_gb)] + (["--smoke"] if a.smoke else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    if a.smoke:
        env["TRITON_INTERPRET"] = "1"
    row = dict(shape=shape, impl=impl, tokens=length)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=a.cell_timeout)
    except subprocess.TimeoutExpired as e:
        _keep_log(a, row, e.stdout, e.stderr)
        return {**row, "error": f"timeout after {a.cell_timeout} s"}
    _keep_log(a, row, out.stdout, out.stderr)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode == 0 and lines:
        return {**row, **json.loads(lines[-1])}
    text = out.stderr + out.stdout
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return {**row, "error": "OOM"}
    errors = [line for line in out.stderr.splitlines() if "rror" in line] or out.stderr.splitlines() or ["?"]
    return {**row, "error": errors[-1][:300]}


def _keep_log(a, row: dict, stdout, stderr) -> None:
    """The cell's whole output, for reading why a cell failed after the sweep."""
    if not a.logs:
        return
    text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")  # noqa: E731
    path = Path(a.logs) / f"{row['shape']}-{row['impl']}-{row['tokens']}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text(stdout) + "\n--- stderr\n" + text(stderr))


def describe(r: dict) -> str:
    if "error" in r:
        return f"| {r['shape']} | {r['tokens']} | {r['impl']} | | | | {r['error']} |"
    plan = ""
    if "memory/micro_batch_size" in r:
        policy = POLICIES[int(r.get("memory/activation_policy", 0))]
        plan = f"mb {int(r['memory/micro_batch_size'])}, {policy}, {int(r.get('rollout/waves', 1))} wave(s)"
    phases = " / ".join(f"{r[k]:.2f}" for k in ("memory/rollout_peak_gb", "memory/train_peak_gb") if k in r)
    return (f"| {r['shape']} | {r['tokens']} | {r['impl']} | {phases} | {r['peak_gb'] * 1e9 / 2**30:.2f} | {plan} "
            f"| {r['s_per_step']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gb", type=float, default=16.0)
    parser.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b,llama-3.1-8b")
    parser.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    parser.add_argument("--impls", default="tandem-4bit,trl,unsloth")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--cell-timeout", type=int, default=1200, help="seconds for one cell")
    parser.add_argument("--json", help="write all rows here (after every row)")
    parser.add_argument("--logs", help="write each cell's whole output into this folder")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, two short lengths")
    a = parser.parse_args(argv)
    if a.smoke:
        a.shapes, a.lengths, a.steps, a.completions = "tiny", "8,16", 2, 4
        a.impls = ",".join(i for i in a.impls.split(",") if i != "unsloth")  # Unsloth needs a GPU
    rows = []
    for shape in a.shapes.split(","):
        for impl in a.impls.split(","):
            for length in map(int, a.lengths.split(",")):
                row = run_cell(shape, impl, length, a)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps(rows, indent=1))
                if row.get("error") == "OOM" or row.get("error", "").startswith("timeout"):
                    break  # longer completions need more memory and more time still
    print(f"\nGRPO step under a {a.cap_gb:g} GiB cap, QLoRA r16, {a.completions} completions per prompt")
    print("| shape | completion tokens | implementation | Tandem peak GiB rollout / train | peak GiB | Tandem plan "
          "| s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(describe(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
