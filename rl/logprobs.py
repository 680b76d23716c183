"""Per-token log-probabilities of completions under the policy (or, adapters disabled, the reference).

The sequences are laid out as the trainer batches them: prompts left-padded to a common width, completions
right-padded after them. Position ids come from the attention mask, as in the rollout engine, so that the
trainer's log-probabilities and the engine's sampling log-probabilities describe the same computation.

The decoder runs once to its final hidden states, and `kernels.selective_logprobs` turns those of the
completion positions into log-probabilities and entropies chunk by chunk, never holding the (tokens x vocab)
logits. Models whose head is not a plain linear layer (logit soft-capping or scaling) take the logits path.
"""

from __future__ import annotations

import torch

from kernels import selective_logprobs
from rl.distributed import full, is_sharded
from rl.model import unwrap


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def final_hidden(causal_lm, **inputs) -> torch.Tensor:
    """The decoder's normed last hidden states (B, T, H). A model sharded by FSDP2 runs its root's forward
    instead (the root's hooks gather its embeddings and norm), with the norm's output caught on the way and
    the head applied to one position only."""
    if not is_sharded(causal_lm):
        return causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    caught = []
    hook = causal_lm.get_decoder().norm.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        causal_lm(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[-1]


def head_weight(causal_lm) -> torch.Tensor:
    return full(causal_lm.get_output_embeddings().weight)  # gathered whole when sharded (differentiable)


def _plain_head(causal_lm) -> bool:
    head = causal_lm.get_output_embeddings()
    cfg = causal_lm.config
    special = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    return isinstance(head, torch.nn.Linear) and head.bias is None and not special


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids/attention_mask (B, Lp + Tc) -> logps (B, Tc), entropy (B, Tc), fp32."""
    causal_lm = unwrap(model)
    positions = positions_from_mask(attention_mask)
    targets = input_ids[:, -completion_len:]  # (B, Tc)
    if _plain_head(causal_lm):
        hidden = final_hidden(causal_lm, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        hidden = hidden[:, -completion_len - 1:-1]  # (B, Tc, H): the states that predict the completion
        b, t, h = hidden.shape
        weight = head_weight(causal_lm)
        logps, entropy = selective_logprobs(hidden.reshape(b * t, h), weight, targets.reshape(-1), temperature)
        return logps.view(b, t), entropy.view(b, t)
    logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False, logits_to_keep=completion_len + 1).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, Tc, V)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), entropy
