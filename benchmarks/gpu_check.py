"""The GPU gate: what only a GPU runs, run on one, in one command (about 15 minutes on one H200 with vLLM installed).

    python benchmarks/gpu_check.py [--out DIR] [--commit SHA] [--steps 3] [--no-peers] [--parts tests,vllm,...]

1. tests: every test marked `gpu`, those marked `vllm` (on the GPU where vLLM is installed; skipped where it
   is not: the summary lists every skip and its reason), and the kernel tests that run on CUDA whenever
   there is one (compiled Triton kernels against their torch twins: KERNEL_TESTS).
2. the capped step: GRPO steps of the Qwen2.5-1.5B shape (QLoRA NF4 r16, one prompt x 8 completions of 1,024
   tokens) under train.gpu_memory_gb 16, as on a 16 GiB card: the scheduler's plan and each phase's peak.
3. the step beside the peers: the Qwen2.5-1.5B QLoRA step at 8 x 256 for Tandem, Unsloth and TRL
   (benchmarks/bench_grpo.py, one process each, in the same run; the peers where they are installed).

Prints one summary table last and writes it, with every part's log, under DIR (default gpu_check/). The exit
status is 0 only when every test passed and every part ran. `--parts` runs some of the parts (tests, kernels,
vllm, capped, peers), for machines that stop a command after a few minutes: the gate is then the union of
calls on one commit, each summary naming its parts. Its summary (date, commit, GPU) belongs in
benchmarks/RESULTS.md before an issue that touches code a GPU runs is resolved.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# not marked gpu: on a CPU they run the kernels through Triton's interpreter, on CUDA compiled
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_decode_attention.py", "tests/test_merge_lora.py",
                "tests/test_nf4_matmul.py", "tests/test_selective_logprobs.py"]
# vLLM's sleep-mode allocator on CUDA serves one engine per process: this module runs once per base, each alone
VLLM_GPU_TESTS, VLLM_BASES = "tests/test_vllm_engine_gpu.py", ("bf16", "nf4")
PARTS = ("tests", "kernels", "vllm", "capped", "peers")


def run_logged(name: str, cmd: list[str], out: Path, timeout: int) -> tuple[int, float]:
    """Runs cmd with its output streamed into out/<name>.log; -> (exit status, 124 on timeout; seconds)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.perf_counter() - start
    print(f"== {name}: exit {code} after {seconds:.0f} s", flush=True)
    return code, seconds


def test_counts(xml_paths: list[Path]) -> dict:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skips": []}
    for xml_path in xml_paths:
        if not xml_path.is_file():
            counts["errors"] += 1
            counts["failed"].append(f"(no report from {xml_path.stem}: pytest did not finish)")
            continue
        root = ET.parse(xml_path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for k in ("tests", "failures", "errors", "skipped"):
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"].append(name)
            elif case.find("skipped") is not None:
                counts["skips"].append(f"{name} ({case.find('skipped').get('message', '')[:80]})")
    return counts


def bench_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="logs and the summary go here")
    parser.add_argument("--commit", help="the commit checked (default: git rev-parse, where .git is present)")
    parser.add_argument("--steps", type=int, default=3, help="steps per implementation (the first is not timed)")
    parser.add_argument("--no-peers", action="store_true", help="Tandem alone in part 3")
    parser.add_argument("--tests-timeout", type=int, default=300)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    a = parser.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose among {', '.join(PARTS)}")
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or "unknown"
    py = sys.executable


    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEsP", "--durations=10"]  # P: passed tests' prints
    code, test_s, reports = 0, 0.0, []
    if "tests" in parts:
        code, test_s = run_logged("tests", pytest + ["-m", "gpu or vllm", f"--junitxml={out / 'tests.xml'}",
                                                     f"--ignore={VLLM_GPU_TESTS}", "tests"], out, a.tests_timeout)
        reports.append(out / "tests.xml")
    if "kernels" in parts:
        kernel_code, kernel_s = run_logged("kernel_tests", pytest + [f"--junitxml={out / 'kernel_tests.xml'}",
                                                                     *KERNEL_TESTS], out, a.tests_timeout)
        code, test_s = max(code, kernel_code), test_s + kernel_s
        reports.append(out / "kernel_tests.xml")
    for base in VLLM_BASES if "vllm" in parts else ():  # vLLM on CUDA: one engine per process, one process per base
        xml = f"--junitxml={out / f'vllm_{base}.xml'}"  # -v: a stopped run still shows how far it got
        base_code, base_s = run_logged(f"vllm_{base}", pytest + ["-v", "-k", base, xml, VLLM_GPU_TESTS], out,
                                       a.tests_timeout)
        code, test_s = max(code, base_code if base_code != 5 else 0), test_s + base_s  # 5: all skipped (no vLLM)
        reports.append(out / f"vllm_{base}.xml")
    tests = test_counts(reports)
    capped_code, capped_s = 0, 0.0
    if "capped" in parts:
        capped_code, capped_s = run_logged(
            "capped_step", [py, "benchmarks/bench_grpo.py", "--shapes", "qwen2.5-1.5b", "--impls", "tandem",
                            "--cap-gb", "16", "--tokens", "1024", "--steps", "2", "--json", str(out / "capped.json")],
            out, 300)
    peers_code, peers_s = 0, 0.0
    if "peers" in parts:
        impls = "tandem" if a.no_peers else "tandem,unsloth,trl"
        peers_code, peers_s = run_logged(
            "step_vs_peers", [py, "benchmarks/bench_grpo.py", "--shapes", "qwen2.5-1.5b", "--impls", impls,
                              "--steps", str(a.steps), "--json", str(out / "peers.json")], out, 420)

    passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
    lines = [f"GPU gate, {datetime.date.today()}, commit {commit}, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}: `python benchmarks/gpu_check.py"
             f"{'' if len(parts) == len(PARTS) else ' --parts ' + ','.join(parts)}`", "",
             "| part | result | seconds |", "|---|---|---|"]
    if reports:
        lines.append(f"| tests ({', '.join(p for p in parts if p in ('tests', 'kernels', 'vllm'))}) | {passed} passed, "
                     f"{tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped (exit {code}) "
                     f"| {test_s:.0f} |")
    for name in tests["failed"]:
        lines.append(f"| failed | {name} | |")
    for name in tests["skips"]:
        lines.append(f"| skipped | {name} | |")
    for r in bench_rows(out / "capped.json"):
        if "error" in r:
            lines.append(f"| capped step, 1.5B, 8 x 1024, 16 GiB | error: {r['error']} | {capped_s:.0f} |")
            continue
        phases = ", ".join(f"{k.split('/')[1].removesuffix('_peak_gb')} {v:.2f} GiB" for k, v in r.items()
                           if k.startswith("memory/") and k.endswith("_peak_gb"))
        plan = {k: f"{r[k]:g}" if k in r else "?" for k in ("memory/micro_batch_size", "memory/activation_policy",
                                                             "rollout/waves")}
        lines.append(f"| capped step, 1.5B, 8 x 1024, 16 GiB | {r['s_per_step']:.2f} s/step; peaks {phases}; "
                     f"micro-batch {plan['memory/micro_batch_size']}, activation policy "
                     f"{plan['memory/activation_policy']} (0 none, 1 checkpoint, 2 offload), "
                     f"{plan['rollout/waves']} wave(s) | {capped_s:.0f} |")
    if "capped" in parts and not bench_rows(out / "capped.json"):
        lines.append(f"| capped step | no result (exit {capped_code}) | {capped_s:.0f} |")
    for r in bench_rows(out / "peers.json"):
        result = (f"error: {r['error']}" if "error" in r else
                  f"{r['s_per_step']:.2f} s/step (median of steps 2..{r['steps']}), peak {r['peak_gb']:.2f} GB")
        lines.append(f"| 1.5B QLoRA step, 8 x 256, {r['impl']} | {result} | |")
    if "peers" in parts and not bench_rows(out / "peers.json"):
        lines.append(f"| step beside the peers | no result (exit {peers_code}) | {peers_s:.0f} |")
    summary = "\n".join(lines)
    (out / "gpu_check.md").write_text(summary + "\n")
    print("\n" + summary)
    benches = [bench_rows(out / f"{part}.json") for part in ("capped", "peers") if part in parts]
    ok = (code == 0 and (tests["tests"] > 0 or not reports) and all(benches)
          and all("error" not in r for rows in benches for r in rows))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
