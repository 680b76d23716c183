"""Log-probabilities of chosen tokens (and the entropy) straight from final hidden states.

    logps, entropy = selective_logprobs(hidden, weight, targets, temperature)
    # hidden (N, H), weight (V, H) (the LM head), targets (N,) -> logps (N,), entropy (N,)
    # both under softmax(hidden @ weight.T / temperature)

The full (N, V) logits of a GRPO batch are the largest tensor of the step (8 x 1024 tokens x 152K vocab in
fp32 is 5 GB). This twin never holds more than one chunk of rows of them: the forward keeps only the
per-row log-sum-exp and entropy, and the backward recomputes each chunk's logits.

Gradient (z = hidden @ weight.T / T, p = softmax(z), lse = logsumexp(z), H = entropy):
    logp_t = z_t - lse                       d logp_t / d z_j = [j == t] - p_j
    H = lse - sum_j p_j z_j                  d H / d z_j      = -p_j (z_j - lse + H)      (= -p_j (log p_j + H))
so with upstream gradients g (for logps) and h (for entropy):
    dz_j = g ([j == t] - p_j) - h p_j (z_j - lse + H)
    d hidden = (dz / T) @ weight             d weight = (dz / T).T @ hidden
"""

import torch

_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MiB in fp32


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    z = h @ weight.T
    return z.to(torch.promote_types(z.dtype, torch.float32)) / temperature


class _SelectiveLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        n = hidden.shape[0]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        entropy = torch.empty_like(logps)
        lse = torch.empty_like(logps)
        step = _rows_per_chunk(weight.shape[0])
        for s in range(0, n, step):
            z = _logits(hidden[s:s + step], weight, temperature)  # (rows, V)
            lse_c = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse_c[:, None])
            lse[s:s + step] = lse_c
            logps[s:s + step] = z.gather(1, targets[s:s + step, None]).squeeze(1) - lse_c
            # sum of non-negative terms p * (lse - z): no cancellation, unlike lse - sum(p * z)
            entropy[s:s + step] = (p * (lse_c[:, None] - z)).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature = temperature
        return logps, entropy

    @staticmethod
    def backward(ctx, g_logps, g_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        t = ctx.temperature
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        step = _rows_per_chunk(weight.shape[0])
        for s in range(0, hidden.shape[0], step):
            h = hidden[s:s + step]
            z = _logits(h, weight, t)
            p = torch.exp(z - lse[s:s + step, None])
            dz = -p * (g_logps[s:s + step, None] + g_entropy[s:s + step, None] * (
                z - lse[s:s + step, None] + entropy[s:s + step, None]))
            dz.scatter_add_(1, targets[s:s + step, None], g_logps[s:s + step, None])
            dz = dz / t
            if d_hidden is not None:
                d_hidden[s:s + step] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if d_weight is not None:
                d_weight += dz.T @ h.to(dz.dtype)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None


def selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H), (V, H), (N,) -> logps (N,), entropy (N,), in fp32 (fp64 for fp64 inputs)."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"selective_logprobs wants hidden (N, H), weight (V, H), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    return _SelectiveLogprobs.apply(hidden, weight, targets.long(), float(temperature))
