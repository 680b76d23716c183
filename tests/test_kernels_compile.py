"""Tandem's Triton kernels compile for Hopper (sm_90) at the launch shapes the engine and the trainer use,
without spilling registers, on any machine: Triton compiles ahead of time with the ptxas it ships, no GPU
needed.

The CPU suite runs these kernels through Triton's interpreter, which checks what they compute but not that
the compiler accepts them or how many registers they need; this does. A spill (local memory or stack use)
at these shapes is a performance bug: the tile sizes in the launchers were chosen from these counts.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")


def _tools():
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = [os.path.join(base, name) for name in ("ptxas", "cuobjdump")]
    return paths if all(os.path.exists(p) for p in paths) else None


# in a child process: the test suite runs Triton's interpreter, which replaces what triton.jit returns
CHILD = r'''
import json, os, re, subprocess
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
# modules by full name: the package re-exports functions named like some of them
decode_attention, logprobs, merge_lora, nf4, nf4_matmul, rms_norm, rope, swiglu = (
    importlib.import_module(f"kernels.{m}") for m in
    ("decode_attention", "logprobs", "merge_lora", "nf4", "nf4_matmul", "rms_norm", "rope", "swiglu"))

I, F = "i32", "fp32"
CASES = {
    "decode attention, head dim 128": (decode_attention._partial_kernel, dict(
        Q="*bf16", K="*bf16", V="*bf16", VALID="*u8", M_OUT="*fp32", L_OUT="*fp32", ACC="*fp32", scale=F),
        dict(GP=16, D=128, BLOCK_N=decode_attention._block_n(128), DOT_FP32=False, PRECISION="tf32"), {}),
    "decode attention, head dim 64": (decode_attention._partial_kernel, dict(
        Q="*bf16", K="*bf16", V="*bf16", VALID="*u8", M_OUT="*fp32", L_OUT="*fp32", ACC="*fp32", scale=F),
        dict(GP=16, D=64, BLOCK_N=decode_attention._block_n(64), DOT_FP32=False, PRECISION="tf32"), {}),
    "decode attention, combine": (decode_attention._combine_kernel, dict(
        M_IN="*fp32", L_IN="*fp32", ACC="*fp32", OUT="*bf16"), dict(GP=16, D=128), {}),
    "nf4 matmul, decode plan": (nf4_matmul._nf4_matmul_kernel, dict(
        X="*bf16", PACKED="*u8", ABSMAX="*fp32", CODE="*fp32", U="*bf16", LB="*bf16", BIAS="*bf16", Y="*bf16",
        PARTIAL="*fp32"), None, "decode"),
    "nf4 matmul, prefill plan": (nf4_matmul._nf4_matmul_kernel, dict(
        X="*bf16", PACKED="*u8", ABSMAX="*fp32", CODE="*fp32", U="*bf16", LB="*bf16", BIAS="*bf16", Y="*bf16",
        PARTIAL="*fp32"), None, "prefill"),
    "nf4 matmul, reduce": (nf4_matmul._nf4_reduce_kernel, dict(
        PARTIAL="*fp32", U="*bf16", LB="*bf16", BIAS="*bf16", Y="*bf16"),
        dict(R=32, HAS_LORA=True, HAS_BIAS=True, BM=16, BN=64, PRECISION="tf32", DOT_FP32=False), {}),
    "merge lora, nf4 base": (merge_lora._merge_kernel, dict(
        OUT="*bf16", W="*u8", CODE="*fp32", ABSMAX="*u8", ABSMAX2="*fp32", CODE2="*fp32", OFFSET="*fp32",
        A="*bf16", B="*bf16", scale=F),
        dict(NF4=True, NESTED=True, BLOCKSIZE=64, BLOCKSIZE2=256, BASE_DTYPE=tl.bfloat16, BN=64, BK=64, BR=16),
        dict(enable_fp_fusion=False)),
    "rope with the cache write": (rope._rotate_and_store, dict(
        Q="*bf16", K="*bf16", V="*bf16", QO="*bf16", K_CACHE="*bf16", V_CACHE="*bf16", COS="*bf16", SIN="*bf16",
        SLOT="*i64"), dict(HALF=64, BLOCK_HQ=16, BLOCK_HK=2, BLOCK_D=64), {}),
    "residual add + rms_norm": (rms_norm._add_forward, dict(
        X="*bf16", D="*bf16", W="*bf16", H="*bf16", Y="*bf16", eps=F), dict(ROWS=2, BLOCK=2048), {}),
    "swiglu, concatenated": (swiglu._forward_concatenated, dict(GU="*bf16", Y="*bf16"), dict(BLOCK=1024), {}),
    # training kernels, at 7B sizes (hidden 3,584, vocabulary 151,936)
    "rms_norm forward": (rms_norm._forward, dict(X="*bf16", W="*bf16", Y="*bf16", RSTD="*fp32", eps=F),
                         dict(ROWS=1, BLOCK=4096), {}),
    "rms_norm backward": (rms_norm._backward, dict(DY="*bf16", X="*bf16", W="*bf16", RSTD="*fp32", DX="*bf16",
                                                   DW_PART="*fp32"), dict(ROWS=1, BLOCK=4096), {}),
    "rope": (rope._rotate, dict(Q="*bf16", K="*bf16", QO="*bf16", KO="*bf16", COS="*bf16", SIN="*bf16"),
             dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=4, BLOCK_D=64, BACKWARD=False, TOKENS=1), {}),
    "swiglu forward": (swiglu._forward, dict(G="*bf16", U="*bf16", Y="*bf16"), dict(BLOCK=1024), {}),
    "swiglu backward": (swiglu._backward, dict(DY="*bf16", G="*bf16", U="*bf16", DG="*bf16", DU="*bf16"),
                        dict(BLOCK=1024), {}),
    "log-prob statistics": (logprobs._stats_kernel, dict(Z="*bf16", TARGETS="*i64", LSE="*fp32", LOGP="*fp32",
                                                         ENT="*fp32", inv_t=F), dict(BLOCK_V=4096), {}),
    "log-prob gradient": (logprobs._grad_kernel, dict(Z="*bf16", TARGETS="*i64", LSE="*fp32", ENT="*fp32",
                                                      G="*fp32", H="*fp32", inv_t=F), dict(BLOCK_V=2048), {}),
    "nf4 dequantization": (nf4._dequant_kernel, dict(PACKED="*u8", ABSMAX="*u8", CODE="*fp32", ABSMAX2="*fp32",
                                                     CODE2="*fp32", OFFSET="*fp32", OUT="*bf16"),
                           dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=True, BLOCKS=64), dict(enable_fp_fusion=False)),
}

def plan(kind):
    m = 8 if kind == "decode" else 256
    bm, bn, bk, warps, split, stages = nf4_matmul._plan(m, 2048, 1536, 64)
    return (dict(R=32, HAS_LORA=True, HAS_BIAS=True, BLOCKSIZE=64, BM=bm, BN=bn, BK=bk, SPLIT=split > 1,
                 PRECISION="tf32", DOT_FP32=False), dict(num_warps=warps, num_stages=stages))

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = {}
for name, (fn, pointers, constexprs, options) in CASES.items():
    if constexprs is None:
        constexprs, options = plan(options)
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, I) for p in fn.params}
    # as at run time, where Triton specializes 16-byte-aligned pointers (fresh allocations are): vectorized code
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if signature[p.name][0] == "*"}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                            target=GPUTarget("cuda", 90, 32), options=options or None)
    cubin = os.path.join(os.environ["TRITON_CACHE_DIR"], "check.cubin")  # a directory the test removes
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
    reg, stack, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage).groups())
    results[name] = dict(registers=reg, stack=stack, local=local)
print(json.dumps(results))
'''


def test_kernels_compile_for_hopper_without_spills():
    if _tools() is None:
        pytest.skip("this Triton has no NVIDIA backend tools (ptxas, cuobjdump)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=root,
                             timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        print(f"{name}: {r['registers']} registers")
    spilled = {name: r for name, r in results.items() if r["stack"] or r["local"]}
    assert not spilled, spilled
