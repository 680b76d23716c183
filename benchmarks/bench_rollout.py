"""Rollout benchmark: the native engine against HF generate (eager and static cache), on one CUDA GPU.

    python benchmarks/bench_rollout.py [--shapes qwen2.5-1.5b,qwen2.5-7b] [--quant bf16,nf4]
        [--batches 8x256,64x1024,256x1024] [--impls native,native-modules,hf-eager,hf-static] [--json out.json]

Random-init models of real shapes (vocabulary cut to the tokenizer's 49,152) with LoRA r16 on all projections,
as in GRPO. Every row generates exactly its token budget (no stop tokens), sampling at temperature 1. `native`
decodes through merged working weights (base + LoRA, one matmul per projection group), `native-4bit` for an
NF4 base at batches up to 16 through its 4-bit codes with the adapters fused (rollout/packed4.py),
`native-modules` through the policy's LoRA-wrapped modules. Per run: generated tokens/s, and for the native
engine the mean decode step against the bandwidth floor of that step, (weight bytes + KV bytes attended) /
device-to-device copy bandwidth measured in the same run. The first call of each (shape, batch) is a warm-up
that pays capture and compile costs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PROMPT_TOKENS = 32


def copy_bandwidth_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t) / 1e9


def load(shape: str, quant: str):
    from rl.config import LoraSection, ModelSection
    from rl.model import load_policy

    policy = load_policy(ModelSection(name=f"random:{shape}", load_in_4bit=quant == "nf4", kernels=True),
                         LoraSection(r=16, alpha=32), seed=0)
    return policy.model, policy.tokenizer


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_weight_bytes(engine, model, batch: int) -> int:
    """Bytes of weights a decode step of `batch` rows reads: every parameter once, the projections as the
    engine reads them (4-bit codes and scales plus the adapters, a merged working copy, or the policy's
    modules: the base (4-bit when quantized) plus the adapters)."""
    from rollout.merged import MergedWeights

    dec = engine.decoder
    working = dec.working_weights(batch)
    if working is None:
        return weight_bytes(model)
    projections = {id(p) for layer in dec.layers for group in MergedWeights.groups(layer) for m in group
                   for p in m.parameters()}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in projections)
    if dec.packed is not None and working is dec.packed.layers:
        return rest + dec.packed.nbytes()
    return rest + MergedWeights.nbytes(dec)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, vocab, (batch, PROMPT_TOKENS), generator=g).tolist()


def run_native(model, tokenizer, batch: int, tokens: int, impl: str) -> dict:
    from rollout import NativeEngine, SamplingParams

    engine = NativeEngine(model, tokenizer, merge_lora=impl != "native-modules", read_4bit=impl == "native-4bit")
    ps = prompts(batch, len(tokenizer))
    params = SamplingParams(max_tokens=tokens, temperature=1.0, stop_token_ids=[], seed=0)
    engine.generate(ps, params)  # warm-up: cache allocation and graph capture
    total = timed(lambda: engine.generate(ps, params))
    prefill = timed(lambda: engine.generate(ps, SamplingParams(max_tokens=1, stop_token_ids=[], seed=0)))
    step = (total - prefill) / max(tokens - 1, 1)
    # the bytes one decode step must read: every weight once, and the K and V of the slots it attends to
    # (the engine attends to a multiple of its length bucket; the mean over the steps is taken here)
    buckets = [min(PROMPT_TOKENS + tokens, -(-(PROMPT_TOKENS + t + 1) // engine.length_bucket) * engine.length_bucket)
               for t in range(tokens - 1)]
    kv = batch * engine.decoder.kv_bytes_per_token() * sum(buckets) / len(buckets)
    out = dict(seconds=total, tokens_per_s=batch * tokens / total, step_ms=step * 1e3, prefill_ms=prefill * 1e3,
               kv_bytes=kv, weight_bytes=decode_weight_bytes(engine, model, batch),
               captured_graphs=len(engine._graphs))
    engine.release()
    return out


def run_hf(model, tokenizer, batch: int, tokens: int, static: bool) -> dict:
    ps = prompts(batch, len(tokenizer))
    ids = torch.tensor(ps, device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                  max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id)
    if static:
        kwargs["cache_implementation"] = "static"
    model.eval()
    with torch.no_grad():
        # warm-up at the timed length: a static cache is compiled for its length, and a shorter warm-up left
        # the timed call to compile again (past 150 s at 64 x 1024 on an H200)
        model.generate(**kwargs)
        seconds = timed(lambda: model.generate(**kwargs))
    return dict(seconds=seconds, tokens_per_s=batch * tokens / seconds, step_ms=seconds / tokens * 1e3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b")
    parser.add_argument("--quant", default="bf16,nf4")
    parser.add_argument("--batches", default="8x256,16x256,64x1024,256x1024")
    parser.add_argument("--impls", default="native,native-modules,hf-eager,hf-static")
    parser.add_argument("--json", help="write all rows here (after every row)")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for shape in args.shapes.split(","):
        for quant in args.quant.split(","):
            model, tokenizer = load(shape, quant)
            wbytes = weight_bytes(model)
            for spec in args.batches.split(","):
                batch, tokens = map(int, spec.split("x"))
                for impl in args.impls.split(","):
                    row = dict(shape=shape, quant=quant, batch=batch, tokens=tokens, impl=impl, weight_bytes=wbytes)
                    try:
                        if impl.startswith("native"):
                            row.update(run_native(model, tokenizer, batch, tokens, impl))
                            floor_ms = (row["weight_bytes"] + row["kv_bytes"]) / bandwidth / 1e6
                            row.update(floor_ms=floor_ms, step_over_floor=row["step_ms"] / floor_ms)
                        else:
                            row.update(run_hf(model, tokenizer, batch, tokens, static=impl == "hf-static"))
                    except Exception as e:  # reported, not fatal: the other rows still run
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": bandwidth, "rows": rows},
                                      f, indent=1)
                    torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    print("| shape | weights | batch x tokens | impl | tokens/s | step ms | floor ms | step / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['quant']} | {r['batch']}x{r['tokens']} | {r['impl']} | error: {r['error']} |||")
            continue
        floor = f"{r['floor_ms']:.2f} | {r['step_over_floor']:.2f}" if "floor_ms" in r else " | "
        print(f"| {r['shape']} | {r['quant']} | {r['batch']}x{r['tokens']} | {r['impl']} | {r['tokens_per_s']:.0f} | "
              f"{r['step_ms']:.2f} | {floor} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
