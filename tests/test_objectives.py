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
    # per token: only row 0's third token (ratio 1.2214 > 1.2 with A > 0) is clipped, 1 of 5 tokens; gspo's
    # sequence ratios e^0.1 and e^-0.1 are inside [0.8, 1.2], so nothing is (outside: the GSPO tests below)
    clipped = 0.0 if loss_type == "gspo" else 0.2
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(clipped)
    assert metrics["clip_ratio/low_mean"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(clipped)


# GSPO with sequence ratios outside the clip range [1 - 0.2, 1 + 0.28] on both sides and advantages of both
# signs. Per-token log ratios (logps - old) vary within a row, so only their masked MEAN gives the sequence
# ratio s; row 1's padding carries a log ratio of +2.0 that must not count (counted, its mean would be 0.47).
#   row 0: 0.5, 0.1, 0.3 -> mean  0.3, s = e^0.3  = 1.3498588, A = +1.0: above 1.28 with A > 0: clipped high
#   row 1: -0.2, -0.4    -> mean -0.3, s = e^-0.3 = 0.7408182, A = -0.5: below 0.8 with A < 0: clipped low
#   row 2: 0.3, 0.3      -> mean  0.3, s = 1.3498588,          A = -1.0: above, but A < 0: not clipped
#   row 3: -0.3 x 3      -> mean -0.3, s = 0.7408182,          A = +2.0: below, but A > 0: not clipped
GSPO_LOGPS = torch.tensor([[-0.5, -1.9, -0.7], [-1.2, -1.4, 1.0], [-0.7, -0.7, 0.0], [-1.3, -1.3, -1.3]])
GSPO_OLD = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
GSPO_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
GSPO_ADV = torch.tensor([1.0, -0.5, -1.0, 2.0])


def test_gspo_clips_whole_sequences_on_both_sides():
    # each row's token loss is -min(s A, clip(s) A), the same for all its tokens, so the row's mean is that:
    #   row 0: -min(1.3498588, 1.28)            = -1.28       (clipped: the constant 1.28, no gradient)
    #   row 1: -min(-0.3704091, 0.8 * -0.5)     =  0.4        (clipped: the constant 0.4, no gradient)
    #   row 2: -min(-1.3498588, 1.28 * -1)      =  1.3498588
    #   row 3: -min(1.4816364, 0.8 * 2)         = -1.4816364
    # gspo normalizes as grpo: the mean of the rows' means
    expected = (-1.28 + 0.4 + math.exp(0.3) - 2 * math.exp(-0.3)) / 4  # -0.2529444
    logps = GSPO_LOGPS.clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, GSPO_OLD, None, GSPO_ADV, GSPO_MASK, loss_type="gspo", epsilon=0.2,
                              epsilon_high=0.28)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # clip metrics count tokens (masked): row 0's 3 of the 10 real tokens are clipped high, row 1's 2 low
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.3)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.2)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.5)

    # the gradient: zero for the clipped rows; for the others d/dlogp_t of -s A / 4 with ds/dlogp_t = s / |y|
    # (s = exp of the mean over the row's |y| real tokens): row 2: e^0.3 / (4 * 2), row 3: -2 e^-0.3 / (4 * 3);
    # padding gets nothing
    loss.backward()
    g2, g3 = math.exp(0.3) / 8, -2 * math.exp(-0.3) / 12  # 0.1687324, -0.1234697
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [g2, g2, 0.0], [g3, g3, g3]])
    torch.testing.assert_close(logps.grad, expected_grad, atol=1e-6, rtol=0)


def test_gspo_clip_range_is_asymmetric_as_given():
    # swapped (epsilon 0.28, epsilon_high 0.2): the range is [0.72, 1.2]; row 1's s = 0.7408 is inside now, so
    # row 1 loses -s A = 0.3704091 (unclipped) and only row 0 (s = 1.3499 > 1.2, A > 0) is clipped, at 1.2
    loss, metrics = grpo_loss(GSPO_LOGPS, GSPO_OLD, None, GSPO_ADV, GSPO_MASK, loss_type="gspo", epsilon=0.28,
                              epsilon_high=0.2)
    expected = (-1.2 + 0.5 * math.exp(-0.3) + math.exp(0.3) - 2 * math.exp(-0.3)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.3)
    assert metrics["clip_ratio/low_mean"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.3)


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


# ------------------------------------------------------------------ cases that mutation testing showed uncovered


def test_group_advantages_defaults_and_tiny_batches():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # the default scale is per group (GRPO), eps 1e-4
    torch.testing.assert_close(group_advantages(rewards, 4), group_advantages(rewards, 4, "group", 1e-4))
    # batch scale over 2 rewards: std sqrt(1/2) -> +-0.5 / (0.7071068 + 1e-4)
    c = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0]), 2, "batch"), torch.tensor([c, -c]))
    # one reward: no spread to scale by; its advantage is 0, not NaN
    torch.testing.assert_close(group_advantages(torch.tensor([3.0]), 1, "batch"), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="rewards do not split into groups of 3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(rewards, 4, "GROUP")


def test_one_token_completions_are_not_divided_by_more():
    # a completion that is one token (an immediate end-of-sequence) and a sequence of one token in all:
    # per-sequence means divide by 1, DAPO's token mean by the one token
    logps, old = torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.2, 0.0]])
    mask, adv = torch.tensor([[1.0, 0.0]]), torch.tensor([1.0])
    r = math.exp(0.2)  # inside [0.8, 1.28]
    for loss_type in ("grpo", "gspo", "dapo", "bnpo"):
        loss, _ = grpo_loss(logps, old, None, adv, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
        assert float(loss) == pytest.approx(-r, rel=1e-6), loss_type
    loss, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                        num_items_in_batch=1)
    assert float(loss) == pytest.approx(-r, rel=1e-6)


def test_dr_grpo_without_a_max_length_divides_by_the_padded_width():
    # B * T of the tensors given (2 * 3), as TRL does when max_completion_length is not given
    loss, _ = grpo_loss(LOGPS, OLD, None, ADV, MASK, loss_type="dr_grpo", epsilon=0.2)
    assert float(loss) == pytest.approx((-3.3051709 + 0.9093654) / 6, rel=1e-6)


def test_clip_metrics_count_only_tokens_whose_advantage_pushes_past_the_range():
    # ratios far outside [0.8, 1.2] on both sides, with advantages +1, 0 and -1: TRL's rule counts a token
    # clipped low when r < 1 - eps and A < 0, high when r > 1 + eps and A > 0; a zero advantage is neither
    logps = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    old = torch.tensor([[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]])  # ratios e^-1 = 0.37 and e^1 = 2.72
    mask = torch.ones(3, 2)
    adv = torch.tensor([1.0, 0.0, -1.0])
    _, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", epsilon=0.2)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 6)  # row 0, token 1
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(1 / 6)  # row 2, token 0
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(2 / 6)
    # a ratio just inside the range is not clipped, one just outside is
    inside = grpo_loss(torch.tensor([[math.log(0.8001), math.log(1.1999)]]), torch.zeros(1, 2), None,
                       torch.tensor([-1.0]), torch.ones(1, 2), epsilon=0.2)[1]
    assert float(inside["clip_ratio/region_mean"]) == 0.0
