"""`cast_to(x, dtype)` inside Triton kernels: round-to-nearest-even narrowing, the same on GPU and CPU.

Compiled kernels round fp32 -> bf16 to nearest even; Triton's CPU interpreter (which the test suite uses)
truncates instead, which would make every bf16 result of a kernel differ by an ulp between the two. Doing the
rounding with integer operations (4 per element; nothing next to the memory traffic of these kernels) gives
bit-identical results in both, for every finite value. Other dtypes use Triton's own conversion.
"""

import triton
import triton.language as tl


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # add half an ulp, plus one when the kept lsb is odd (ties to even)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
