"""Log-probabilities of chosen tokens (and the entropy) straight from final hidden states.

    logps, entropy = selective_logprobs(hidden, weight, targets, temperature)
    # hidden (N, H), weight (V, H) (the LM head), targets (N,) -> logps (N,), entropy (N,)
    # both under softmax(hidden @ weight.T / temperature), returned in fp32 (fp64 for fp64 inputs)

The full (N, V) logits of a GRPO batch are the largest tensor of the step (8 x 1024 tokens x 152K vocab in
fp32 is 5 GB). This never holds more than one chunk of rows of them: the forward keeps only each row's
log-sum-exp and entropy, and the backward recomputes each chunk's logits (one matmul) and turns them into
their gradient in place. The logits are the matmul's output in the input dtype, as an HF LM head produces
them; the statistics are computed in fp32.

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

_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 64 MiB in bf16, 128 MiB in fp32


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


def _grad_logits_torch(z, targets, lse, entropy, g, h, temperature):
    zf = z.to(lse.dtype) / temperature
    p = torch.exp(zf - lse[:, None])
    dz = -p * (g[:, None] + h[:, None] * (zf - lse[:, None] + entropy[:, None]))
    dz.scatter_add_(1, targets[:, None], g[:, None])
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
    def _grad_kernel(Z, TARGETS, LSE, ENT, G, H, stride_z, n_vocab, inv_t, BLOCK_V: tl.constexpr):
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
        dz = -p * (g + h * (z - lse + ent)) + tl.where(cols == target, g, 0.0)
        tl.store(base + cols, cast_to(dz * inv_t, Z.dtype.element_ty), mask=mask)  # in place over the logits

    def _stats_triton(z, targets, temperature):
        rows, vocab = z.shape
        lse = torch.empty(rows, dtype=torch.float32, device=z.device)
        logp, entropy = torch.empty_like(lse), torch.empty_like(lse)
        _stats_kernel[(rows,)](z, targets, lse, logp, entropy, z.stride(0), vocab, 1.0 / temperature,
                               BLOCK_V=min(4096, triton.next_power_of_2(vocab)))
        return lse, logp, entropy

    def _grad_logits_triton(z, targets, lse, entropy, g, h, temperature):
        rows, vocab = z.shape
        block = min(2048, triton.next_power_of_2(vocab))
        _grad_kernel[(rows, triton.cdiv(vocab, block))](z, targets, lse, entropy, g.contiguous().float(),
                                                        h.contiguous().float(), z.stride(0), vocab, 1.0 / temperature,
                                                        BLOCK_V=block)
        return z


# ------------------------------------------------------------------------------ the chunked autograd op


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, triton_path):
        stats = _stats_triton if triton_path else _stats_torch
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse, logps, entropy = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        step = _rows_per_chunk(weight.shape[0])
        for s in range(0, n, step):
            z = hidden[s:s + step] @ weight.T  # (rows, V) in the input dtype
            lse[s:s + step], logps[s:s + step], entropy[s:s + step] = stats(z, targets[s:s + step], temperature)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.triton_path = temperature, triton_path
        return logps, entropy

    @staticmethod
    def backward(ctx, g_logps, g_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_logits = _grad_logits_triton if ctx.triton_path else _grad_logits_torch
        g_logps = g_logps.to(lse.dtype) if g_logps is not None else torch.zeros_like(lse)
        g_entropy = g_entropy.to(lse.dtype) if g_entropy is not None else torch.zeros_like(lse)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        step = _rows_per_chunk(weight.shape[0])
        for s in range(0, hidden.shape[0], step):
            h = hidden[s:s + step]
            dz = grad_logits(h @ weight.T, targets[s:s + step], lse[s:s + step], entropy[s:s + step],
                             g_logps[s:s + step], g_entropy[s:s + step], ctx.temperature)  # (rows, V)
            if d_hidden is not None:
                d_hidden[s:s + step] = dz @ weight
            if d_weight is not None:
                d_weight += (dz.T @ h).to(d_weight.dtype)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
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
