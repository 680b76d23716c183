"""Log-probabilities of chosen tokens (and the entropy) straight from final hidden states.

    logps, entropy = selective_logprobs(hidden, weight, targets, temperature)
    # hidden (N, H), weight (V, H) (the LM head), targets (N,) -> logps (N,), entropy (N,)
    # both under softmax(hidden @ weight.T / temperature), returned in fp32 (fp64 for fp64 inputs)

The full (N, V) logits of a GRPO batch are the largest tensor of the step (8 x 1024 tokens x 152K vocab in
fp32 is 5 GB). This never holds more than one chunk of them (`_CHUNK_ELEMENTS`): the forward walks chunks of
rows and keeps each row's log-sum-exp and entropy; the backward, when it has to recompute logits, walks
chunks of the vocabulary, so that each row of d weight is written once instead of accumulated per chunk.
The logits are the matmul's output in the input dtype, as an HF LM head produces them; the statistics are
computed in fp32.

Gradient (z = hidden @ weight.T / T, p = softmax(z), lse = logsumexp(z), H = entropy):
    logp_t = z_t - lse                       d logp_t / d z_j = [j == t] - p_j
    H = sum_j p_j (lse - z_j)                d H / d z_j      = -p_j (z_j - lse + H)      (= -p_j (log p_j + H))
so with upstream gradients g (for logps) and h (for entropy):
    dz_j = g ([j == t] - p_j) - h p_j (z_j - lse + H)
    d hidden = (dz / T) @ weight             d weight = (dz / T).T @ hidden

Triton (per row, one pass over the vocabulary in blocks, with a running maximum m): s = sum e^(z - m) and
b = sum e^(z - m) (m - z), both sums of non-negative terms, rescaled when m grows:
    s' = e^(m - m') s + ...,   b' = e^(m - m') (b + (m' - m) s) + ...
then lse = m + log s and H = b / s + log s, with no cancellation between large numbers.
"""

from __future__ import annotations

import torch

from kernels.backend import HAVE_TRITON, use_triton

_CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 256 MiB in bf16; 883 rows of a 152K vocabulary, big matmuls


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


# ------------------------------------------------------------------------------ the pure-torch twin


def _stats_torch(z: torch.Tensor, targets: torch.Tensor, temperature: float):
    zf = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(zf, dim=-1)
    p = torch.exp(zf - lse[:, None])
    logp = zf.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = (p * (lse[:, None] - zf)).sum(-1)  # sum of non-negative terms: no cancellation
    return lse, logp, entropy


def _grad_logits_torch(z, targets, lse, entropy, g, h, temperature, col0):
    """dz for logits z = columns col0 .. col0 + z.shape[1] of the full rows."""
    zf = z.to(lse.dtype) / temperature
    p = torch.exp(zf - lse[:, None])
    dz = -p * (g[:, None] + h[:, None] * (zf - lse[:, None] + entropy[:, None]))
    local = targets - col0
    inside = (local >= 0) & (local < z.shape[1])
    dz[inside, local[inside]] += g[inside]
    return (dz / temperature).to(z.dtype)


# ------------------------------------------------------------------------------ Triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_cast import cast_to

    @triton.jit
    def _stats_kernel(Z, TARGETS, LSE, LOGP, ENT, stride_z, n_vocab, inv_t, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = Z + row.to(tl.int64) * stride_z
        m = -3.0e38  # finite, so that the first rescale multiplies 0 by a finite gap (inf * 0 would be NaN)
        s = 0.0
        b = 0.0
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < n_vocab, other=-float("inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(z, axis=0))
            e = tl.where(cols < n_vocab, tl.exp(z - m_new), 0.0)
            scale = tl.exp(m - m_new)
            b = scale * (b + (m_new - m) * s) + tl.sum(e * tl.where(cols < n_vocab, m_new - z, 0.0), axis=0)
            s = scale * s + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        lse = m + log_s
        target = tl.load(TARGETS + row)
        z_t = tl.load(base + target).to(tl.float32) * inv_t
        tl.store(LSE + row, lse)
        tl.store(LOGP + row, z_t - lse)
        tl.store(ENT + row, b / s + log_s)

    @triton.jit
    def _grad_kernel(Z, TARGETS, LSE, ENT, G, H, stride_z, n_vocab, col0, inv_t, BLOCK_V: tl.constexpr):
        # grid (rows, vocabulary blocks): every block of every row in parallel, each read and written once
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        base = Z + row.to(tl.int64) * stride_z
        lse = tl.load(LSE + row)
        ent = tl.load(ENT + row)
        g = tl.load(G + row)
        h = tl.load(H + row)
        target = tl.load(TARGETS + row)
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        dz = -p * (g + h * (z - lse + ent)) + tl.where(cols + col0 == target, g, 0.0)
        tl.store(base + cols, cast_to(dz * inv_t, Z.dtype.element_ty), mask=mask)  # in place over the logits

    def _stats_triton(z, targets, temperature):
        rows, vocab = z.shape
        lse = torch.empty(rows, dtype=torch.float32, device=z.device)
        logp, entropy = torch.empty_like(lse), torch.empty_like(lse)
        _stats_kernel[(rows,)](z, targets, lse, logp, entropy, z.stride(0), vocab, 1.0 / temperature,
                               BLOCK_V=min(4096, triton.next_power_of_2(vocab)))
        return lse, logp, entropy

    def _grad_logits_triton(z, targets, lse, entropy, g, h, temperature, col0):
        rows, vocab = z.shape
        block = min(2048, triton.next_power_of_2(vocab))
        _grad_kernel[(rows, triton.cdiv(vocab, block))](z, targets, lse, entropy, g, h, z.stride(0), vocab, col0,
                                                        1.0 / temperature, BLOCK_V=block)
        return z


# ------------------------------------------------------------------------------ the chunked autograd op


def _recompute_backward(hidden, weight, targets, lse, entropy, g, h, temperature, grad_logits, need_dh, need_dw):
    """Chunks over the vocabulary: each chunk's logits for all rows, turned into dz in place, give the
    chunk's rows of d weight once (no accumulation of a (V, H) buffer) and add into d hidden (N, H)."""
    n, v = hidden.shape[0], weight.shape[0]
    d_hidden = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if need_dh else None
    d_weight = torch.empty_like(weight) if need_dw else None
    step = max(1, _CHUNK_ELEMENTS // 2 // max(n, 1))  # half a chunk: d hidden's fp32 accumulator is held too
    for s in range(0, v, step):
        w = weight[s:s + step]
        dz = grad_logits(hidden @ w.T, targets, lse, entropy, g, h, temperature, s)  # (N, chunk of V)
        if d_hidden is not None:
            d_hidden += dz @ w
        if d_weight is not None:
            torch.mm(dz.T, hidden, out=d_weight[s:s + step])
        del dz  # before the next chunk is allocated: one chunk of logits alive at a time, not two
    return (d_hidden.to(hidden.dtype) if d_hidden is not None else None), d_weight


class _SelectiveLogprobs(torch.autograd.Function):
    """Forward in chunks of rows. When only `hidden` needs a gradient (a frozen LM head, as under LoRA) and
    the entropy is not differentiated, d logp_t / d hidden = (weight_t - p @ weight) / T does not depend on
    the upstream gradient, so the forward computes it from the chunk of logits it already holds (one more
    matmul) and the backward is a scale: 4NHV FLOPs in all, as for materialized logits. Otherwise the
    backward recomputes the logits in chunks of the vocabulary (8NHV with the head's gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, triton_path):
        stats = _stats_triton if triton_path else _stats_torch
        grad_logits = _grad_logits_triton if triton_path else _grad_logits_torch
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse, logps, entropy = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        eager_grad = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        d_logp = torch.empty_like(hidden) if eager_grad else None  # d logp / d hidden, row by row
        if eager_grad:
            ones, zeros = torch.ones_like(lse), torch.zeros_like(lse)
        step = _rows_per_chunk(weight.shape[0])
        for s in range(0, n, step):
            rows = slice(s, s + step)
            z = hidden[rows] @ weight.T  # (rows, V) in the input dtype
            lse[rows], logps[rows], entropy[rows] = stats(z, targets[rows], temperature)
            if eager_grad:
                dz = grad_logits(z, targets[rows], lse[rows], entropy[rows], ones[rows], zeros[rows], temperature, 0)
                torch.mm(dz, weight, out=d_logp[rows])
                del dz
            del z  # before the next chunk is allocated: one chunk of logits alive at a time, not two
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, d_logp)
        ctx.temperature, ctx.triton_path = temperature, triton_path
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return logps, entropy

    @staticmethod
    def backward(ctx, g_logps, g_entropy):
        hidden, weight, targets, lse, entropy, d_logp = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        if g_logps is None and g_entropy is None:
            return None, None, None, None, None
        if d_logp is not None and g_entropy is None:
            d_hidden = torch.empty_like(d_logp)
            step = _rows_per_chunk(weight.shape[0])  # in chunks: no (N, H) fp32 temporaries
            for s in range(0, d_logp.shape[0], step):
                rows = slice(s, s + step)
                d_hidden[rows] = d_logp[rows].to(lse.dtype) * g_logps[rows].to(lse.dtype)[:, None]
            return d_hidden, None, None, None, None
        zeros = torch.zeros_like(lse)
        g = g_logps.to(lse.dtype).contiguous() if g_logps is not None else zeros
        h = g_entropy.to(lse.dtype).contiguous() if g_entropy is not None else zeros
        grad_logits = _grad_logits_triton if ctx.triton_path else _grad_logits_torch
        d_hidden, d_weight = _recompute_backward(hidden, weight, targets, lse, entropy, g, h, ctx.temperature,
                                                 grad_logits, need_dh, need_dw)
        return d_hidden, d_weight, None, None, None


def selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H), (V, H), (N,) -> logps (N,), entropy (N,)."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"selective_logprobs wants hidden (N, H), weight (V, H), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    triton_path = use_triton(hidden) and hidden.dtype != torch.float64
    return _SelectiveLogprobs.apply(hidden, weight, targets.long().contiguous(), float(temperature), triton_path)


def selective_logprobs_torch(hidden, weight, targets, temperature: float = 1.0):
    """The twin, whatever the backend setting (for tests and benchmarks)."""
    return _SelectiveLogprobs.apply(hidden, weight, targets.long().contiguous(), float(temperature), False)
