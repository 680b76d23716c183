"""SFT packing: examples laid end to end in rows of a fixed length, with no attention across their borders.

    packed = pack([(prompt_ids, completion_ids), ...], max_length=1024, pad_id=0)
    logps = token_logps(model, packed["input_ids"], packed["position_ids"])     # (R, L - 1)
    loss = sft_loss(logps, packed["loss_mask"])

Position ids restart at 0 for every example (and for the padding at the end of a row, which forms a block of
its own). With no attention mask given, HF's attention reads those restarts as borders and builds the
block-diagonal mask, so each example attends to itself only and the packed loss equals the unpacked one
(tests/test_packing.py) while no compute is spent on padding. `loss_mask` is aligned with the predicted
tokens (input_ids[:, 1:]): 1 where that token belongs to a completion (or to the whole example when
`completion_only` is off), never for the first token of an example, which nothing before it predicts.
"""

from __future__ import annotations

import torch

from kernels import selective_logprobs
from rl.logprobs import final_hidden, head_weight, positions_from_mask
from rl.model import unwrap


def pack(examples: list[tuple[list[int], list[int]]], max_length: int, pad_id: int,
         completion_only: bool = True) -> dict[str, torch.Tensor]:
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for i, (prompt, completion) in enumerate(examples):
        n = len(prompt) + len(completion)
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than the packed length {max_length}; raise "
                             "data.max_length or shorten the example")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append((prompt, completion))
        used += n
    ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), max_length), dtype=torch.long)
    scored = torch.zeros((len(rows), max_length), dtype=torch.bool)  # token is a target of the loss
    for r, row in enumerate(rows):
        at = 0
        for prompt, completion in row:
            seq = prompt + completion
            ids[r, at:at + len(seq)] = torch.tensor(seq)
            pos[r, at:at + len(seq)] = torch.arange(len(seq))
            first_scored = len(prompt) if completion_only else 1
            scored[r, at + max(first_scored, 1):at + len(seq)] = True
            at += len(seq)
        pos[r, at:] = torch.arange(max_length - at)  # the padding: a block of its own, never scored
    return {"input_ids": ids, "position_ids": pos, "loss_mask": scored[:, 1:].float()}


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int,
                 completion_only: bool = True) -> dict[str, torch.Tensor]:
    """Unpacked: one example per row, right-padded, with an attention mask (the same keys as `pack`)."""
    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    scored = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(examples):
        n = len(prompt) + len(completion)
        ids[i, :n] = torch.tensor(prompt + completion)
        att[i, :n] = 1
        scored[i, max(len(prompt) if completion_only else 1, 1):n] = True
    return {"input_ids": ids, "position_ids": positions_from_mask(att), "attention_mask": att,
            "loss_mask": scored[:, 1:].float()}


def token_logps(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                temperature: float = 1.0) -> torch.Tensor:
    """log p(input_ids[:, t + 1] | its example's tokens up to t) -> (R, L - 1), fp32, through the chunked
    log-probabilities (no (tokens x vocab) logits held)."""
    causal_lm = unwrap(model)
    hidden = final_hidden(causal_lm, input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids)[:, :-1]
    b, t, h = hidden.shape
    weight = head_weight(causal_lm)
    logps, _ = selective_logprobs(hidden.reshape(b * t, h), weight, input_ids[:, 1:].reshape(-1), temperature)
    return logps.view(b, t)
