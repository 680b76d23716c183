"""What sharing the policy's weights costs vLLM on CPU: generation speed and process memory, shared vs repacked.

    python benchmarks/bench_vllm_cpu.py [--prompts 8] [--tokens 64] [--mode shared|repacked|both]

vLLM on CPU normally repacks each linear weight into a oneDNN handle and frees the plain tensor; the shared
mode keeps plain weights (the policy computes with them too) and runs F.linear on them. Both modes load the
SmolLM2-135M policy in bf16 with LoRA r16 and generate greedily through the adapter. Each mode runs in a
fresh process (vLLM keeps global state), and `both` runs them one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run(mode: str, prompts: int, tokens: int) -> dict:
    import torch

    from rl.config import LoraSection, ModelSection
    from rl.model import load_policy, resolve_source
    from rollout import SamplingParams
    from rollout.vllm_engine import VLLMEngine, _rss_bytes

    policy = load_policy(ModelSection(name="smollm2-135m-instruct", dtype="bfloat16", kernels=False),
                         LoraSection(r=16), seed=0)
    model_dir, _ = resolve_source("smollm2-135m-instruct", 0, need_dir=True)
    engine = VLLMEngine(policy.model, policy.tokenizer, model_dir, lora_rank=16, max_model_len=512,
                        share_weights=mode == "shared")
    questions = [f"What is {i} + {2 * i + 1}? Explain." for i in range(prompts)]
    ids = [policy.tokenizer.encode(q) for q in questions]
    params = SamplingParams(max_tokens=tokens, temperature=0, stop_token_ids=[])
    engine.generate(ids, params)  # warm-up
    t = time.perf_counter()
    engine.generate(ids, params)
    seconds = time.perf_counter() - t
    return dict(mode=mode, prompts=prompts, tokens=tokens, seconds=seconds, tokens_per_s=prompts * tokens / seconds,
                rss_gb=_rss_bytes() / 1e9, shared_tensors=len(engine.shared), threads=torch.get_num_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mode", default="both", choices=("shared", "repacked", "both"))
    args = parser.parse_args(argv)
    if args.mode != "both":
        print(json.dumps(run(args.mode, args.prompts, args.tokens)))
        return 0
    rows = []
    for mode in ("shared", "repacked"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--prompts", str(args.prompts), "--tokens",
                              str(args.tokens)], capture_output=True, text=True, env=os.environ)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| mode | prompts x tokens | tokens/s | process RSS GB | base tensors shared |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['prompts']} x {r['tokens']} | {r['tokens_per_s']:.1f} | {r['rss_gb']:.2f} | "
              f"{r['shared_tensors']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
