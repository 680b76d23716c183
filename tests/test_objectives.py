"""grpo_loss and group advantages against values computed by hand (see the comments for the arithmetic)."""

import math

import pytest
import torch

from rl.objectives import group_advantages, grpo_loss

# Two sequences, three tokens; the last token of the second is padding.
LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
OLD = torch.tensor([[-1.1, -2.0, -0.7], [-0.3, -1.0, -2.5]])
REF = torch.tensor([[-1.0, -1.9, -0.6], [-0.2, -1.2, -2.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -0.5])
# ratios: row 0 = e^0.1, 1, e^0.2 (clipped to 1.2, A > 0); row 1 = 1, e^-0.2 (inside [0.8, 1.2])
# per-token losses: row 0 = -1.1051709, -1, -1.2 (sum -3.3051709); row 1 = 0.5, 0.4093654 (sum 0.9093654)
EXPECTED = {
    "grpo": (-3.3051709 / 3 + 0.9093654 / 2) / 2,  # -0.3235205: mean of per-sequence means
    "bnpo": (-3.3051709 + 0.9093654) / 5,  # -0.4791611: mean over the 5 real tokens
    "dapo": (-3.3051709 + 0.9093654) / 5,
    "dr_grpo": (-3.3051709 + 0.9093654) / (2 * 4),  # B * max_completion_length (4)
    # gspo: sequence ratios e^((0.1+0+0.2)/3) = e^0.1 (A=1) and e^(-0.2/2) = e^-0.1 (A=-0.5)
    "gspo": (-math.exp(0.1) + 0.5 * math.exp(-0.1)) / 2,  # -0.3263761
}


@pytest.mark.parametrize("loss_type", list(EXPECTED))
def test_loss_types_match_hand_computed_values(loss_type):
    loss, metrics = grpo_loss(LOGPS, OLD, None, ADV, MASK, loss_type=loss_type, epsilon=0.2,
                              max_completion_length=4)
    assert loss.item() == pytest.approx(EXPECTED[loss_type], abs=1e-6)
    if loss_type != "gspo":
        # only row 0's third token (ratio 1.2214 > 1.2 with A > 0) is clipped: 1 of 5 tokens
        assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.2)
        assert metrics["clip_ratio/low_mean"].item() == 0.0
        assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.2)


def test_k3_kl_term():
    # delta = ref - logps: row 0 = 0, 0.1, -0.1; row 1 = 0.1, 0; k3 = e^d - d - 1
    kl = [0.0, math.exp(0.1) - 1.1, math.exp(-0.1) - 0.9, math.exp(0.1) - 1.1, 0.0]
    loss, metrics = grpo_loss(LOGPS, OLD, REF, ADV, MASK, loss_type="dapo", beta=0.1)
    assert metrics["kl"].item() == pytest.approx(sum(kl) / 5, abs=1e-7)
    assert loss.item() == pytest.approx((-3.3051709 + 0.9093654 + 0.1 * sum(kl)) / 5, abs=1e-6)


def test_epsilon_high_widens_the_upper_clip():
    # with eps_high = 0.3 the ratio e^0.2 = 1.2214 is no longer clipped: row 0 token 3 loses -1.2214028
    loss, metrics = grpo_loss(LOGPS, OLD, None, ADV, MASK, loss_type="bnpo", epsilon=0.2, epsilon_high=0.3)
    assert loss.item() == pytest.approx((-1.1051709 - 1 - math.exp(0.2) + 0.9093654) / 5, abs=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def test_low_clip_with_negative_advantage():
    # ratio e^-0.5 = 0.6065 < 0.8 with A = -1: the clipped term -0.8 * -1 = 0.8 is larger, so loss is 0.8
    loss, metrics = grpo_loss(torch.tensor([[-1.5]]), torch.tensor([[-1.0]]), None, torch.tensor([-1.0]),
                              torch.ones(1, 1), loss_type="bnpo")
    assert loss.item() == pytest.approx(0.8)
    assert metrics["clip_ratio/low_mean"].item() == 1.0


def test_dapo_normalizes_by_the_whole_batch_token_count():
    loss, _ = grpo_loss(LOGPS, OLD, None, ADV, MASK, loss_type="dapo", num_items_in_batch=10)
    assert loss.item() == pytest.approx((-3.3051709 + 0.9093654) / 10, abs=1e-6)


def test_importance_sampling_weights_scale_each_token():
    w = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    loss, _ = grpo_loss(LOGPS, OLD, None, ADV, MASK, loss_type="bnpo", is_weights=w)
    assert loss.item() == pytest.approx((-2 * 1.1051709 - 1 - 1.2 + 0.5 + 0.5 * 0.4093654) / 5, abs=1e-6)


def test_gradient_at_ratio_one_is_minus_advantage_per_token():
    logps = OLD.clone().requires_grad_(True)
    loss, _ = grpo_loss(logps, OLD, None, ADV, MASK, loss_type="bnpo")
    loss.backward()
    expected = -ADV[:, None] * MASK / 5  # d/dlogp of -r*A at r = 1 is -A, over 5 tokens
    torch.testing.assert_close(logps.grad, expected)


def test_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(LOGPS, OLD, None, ADV, MASK, beta=0.1)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.5773503 -> +-0.5 / 0.5774503 = +-0.8658754
    a = 0.8658754
    torch.testing.assert_close(group_advantages(rewards, 4, "group"),
                               torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, 4, "none"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    # batch: the std of all 8 rewards is 0.8864053 -> 0.5 / 0.8865053 = 0.5640124
    b = 0.5640124
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"),
                               torch.tensor([b, -b, -b, b, 0.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)
