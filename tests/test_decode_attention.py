"""Split-K decode attention (kernels/decode_attention.py) against scaled_dot_product_attention over the same
slots, at awkward shapes: 1 row, groups of 1, 6 and 7 query heads per KV head, head dims 64 and 80 (not a
power of two), lengths that do not fill a key block, masked slots (left padding, holes of finished rows,
a sliding window), and slices that hold no valid key at all.

Tolerances: fp32 1e-5 (the same sums in another order, the softmax normalized once at the end); bf16 2e-2
(the kernel rounds the probabilities to bf16 before the second dot, as flash attention does).
"""

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n_kv,group,d,length,splits", [(1, 1, 1, 64, 1, None), (3, 2, 6, 64, 67, None),
                                                          (2, 2, 7, 80, 200, 3), (5, 1, 4, 64, 130, 1)])
def test_decode_attention_equals_sdpa(monkeypatch, b, n_kv, group, d, length, splits, dtype):
    monkeypatch.setenv("TANDEM_KERNELS", "triton")
    g = torch.Generator().manual_seed(b * length)
    rows, slots = b + 2, length + 9  # the caches are larger than what is attended, as in the engine
    q = torch.randn(b, n_kv, group, d, generator=g).to(dtype).to(DEVICE)
    k_cache = torch.randn(rows, n_kv, slots, d, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(rows, n_kv, slots, d, generator=g).to(dtype).to(DEVICE)
    valid_full = torch.rand(rows, slots, generator=g) < 0.7
    valid_full[:, length - 1] = True  # the slot being written is always valid
    if length > 70:
        valid_full[0, :64] = False  # a whole key block (and with splits, a slice) without a valid key
    valid = valid_full.to(DEVICE)[:b, :length]
    ours = decode_attention(q, k_cache, v_cache, valid, 0.125, splits=splits)
    reference = decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), valid, 0.125)
    assert ours.shape == q.shape and ours.dtype == dtype
    torch.testing.assert_close(ours.float(), reference, **TOL[dtype])
