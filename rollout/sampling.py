"""Token sampling on the device: temperature, top-k, top-p, and the log-probability of each sampled token
under the distribution it was sampled from (vLLM's "processed" logprobs).

Sampling is Gumbel-max in its exponential form, argmax p / E with E ~ Exp(1): it needs no host
synchronization, and with the noise drawn outside (`sample_with_noise`) it can run inside a CUDA graph.
"""

from __future__ import annotations

import torch

from rollout.engine import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to (rows, V) logits; filtered entries become -inf (fp32)."""
    z = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # drop a token when the mass of the tokens before it already reaches top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """-> (tokens (rows,), logprobs (rows,)) under the distribution sampled from. Greedy when temperature=0."""
    noise = None
    if params.temperature > 0:
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=generator)
    return sample_with_noise(logits, params, noise)


def sample_with_noise(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None):
    """sample_tokens with its Exp(1) noise (rows, V) given (None when greedy): no random state, no host sync."""
    if params.temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.argmax(logits, dim=-1)
    else:
        logp = torch.log_softmax(filter_logits(logits, params), dim=-1)
        tokens = torch.argmax(logp.exp() / noise, dim=-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
