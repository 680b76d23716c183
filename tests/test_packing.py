"""Packed SFT equals unpacked SFT: the same loss and gradients, examples unable to see each other."""

import pytest
import torch

from rl.objectives import sft_loss
from rl.packing import pack, pad_examples, token_logps
from tests.helpers import tiny_policy

EXAMPLES = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15]), ([16], [17]), ([18, 19, 20, 21], [22, 23, 24]),
            ([25, 26], [27, 28, 29])]


def _unpacked(model, examples, pad_id, completion_only=True):
    """Each example alone in its row, right-padded, positions from the mask: the reference."""
    rows = pad_examples(examples, pad_id, completion_only)
    return token_logps(model, rows["input_ids"], rows["position_ids"], rows["attention_mask"]), rows["loss_mask"]


@pytest.mark.parametrize("completion_only", [True, False])
def test_packed_loss_and_gradients_equal_unpacked(completion_only):
    policy = tiny_policy("tiny")
    model = policy.model
    model.train()
    packed = pack(EXAMPLES, max_length=12, pad_id=0, completion_only=completion_only)
    assert packed["input_ids"].shape[0] < len(EXAMPLES)  # really packed: several examples per row
    loss = sft_loss(token_logps(model, packed["input_ids"], packed["position_ids"]), packed["loss_mask"])
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    logps, mask = _unpacked(model, EXAMPLES, 0, completion_only)
    ref = sft_loss(logps, mask)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    assert packed["loss_mask"].sum() == mask.sum()  # the same tokens are scored
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_examples_do_not_see_each_other():
    """Changing one example's tokens leaves the log-probabilities of the others in its row unchanged."""
    policy = tiny_policy("tiny")
    a = pack(EXAMPLES, max_length=12, pad_id=0)
    changed = [([40, 41, 42], [43, 44])] + EXAMPLES[1:]  # the first example, which shares a row
    b = pack(changed, max_length=12, pad_id=0)
    with torch.no_grad():
        la = token_logps(policy.model, a["input_ids"], a["position_ids"])
        lb = token_logps(policy.model, b["input_ids"], b["position_ids"])
    first = len(EXAMPLES[0][0]) + len(EXAMPLES[0][1])  # tokens of example 0 in row 0
    torch.testing.assert_close(la[0, first:], lb[0, first:])  # the rest of the row: unaffected
    assert not torch.allclose(la[0, :first - 1], lb[0, :first - 1])


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="example 1 has 7 tokens, more than the packed length 6"):
        pack([([1], [2]), ([1, 2, 3], [4, 5, 6, 7])], max_length=6, pad_id=0)
