"""DPO, ORPO, KTO and SFT objectives at the inputs where a wrong constant or a swapped branch shows:
defaults, hinge against IPO at a beta where they differ, the rewards they report, ORPO's metric names and its
log(1 - p) near p = 1, SFT's single-token mean. Hand-computed, float64 unless said otherwise."""

import math

import torch

from rl.objectives import _log1mexp, dpo_loss, kto_loss, orpo_loss, sft_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def _sig(x):
    return 1 / (1 + math.exp(-x))


PC, PR, RC, RR = _t(-3.0, -2.0), _t(-5.0, -1.0), _t(-4.0, -2.5), _t(-4.5, -1.5)  # d = [1.5, 0.0]


def test_dpo_defaults_are_sigmoid_at_beta_one_tenth():
    losses, cr, rj = dpo_loss(PC, PR, RC, RR)
    torch.testing.assert_close(losses, _t(-math.log(_sig(0.15)), math.log(2.0)))
    torch.testing.assert_close(cr, _t(0.1, 0.05))
    torch.testing.assert_close(rj, _t(-0.05, 0.05))


def test_dpo_hinge_and_ipo_differ_where_they_should():
    beta = 0.25  # hinge: max(0, 1 - d/4); ipo: (d - 2)^2
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "hinge")[0], _t(0.625, 1.0))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta, "ipo")[0], _t(0.25, 4.0))


def test_orpo_defaults_rewards_and_metric_names():
    w, lo = _t(-0.5, -2.0), _t(-1.0, -0.1)
    nll = torch.tensor(1.25, dtype=torch.float64)
    loss, cr, rj, metrics = orpo_loss(w, lo, nll)
    odds = lambda p: math.log(math.exp(p) / (1 - math.exp(p)))  # noqa: E731
    log_odds = [odds(a) - odds(b) for a, b in zip(w.tolist(), lo.tolist())]
    ratio = sum(math.log(_sig(x)) for x in log_odds) / 2
    assert abs(float(loss) - (1.25 - 0.1 * ratio)) < 1e-6  # the default beta is 0.1
    torch.testing.assert_close(cr.double(), _t(-0.05, -0.2))  # beta * mean log p, each side
    torch.testing.assert_close(rj.double(), _t(-0.1, -0.01))
    assert set(metrics) == {"log_odds_ratio", "log_odds_chosen", "nll_loss"}
    assert abs(float(metrics["log_odds_ratio"]) - ratio) < 1e-6
    assert float(metrics["nll_loss"]) == 1.25


def test_log1mexp_near_zero_in_fp32():
    x = torch.tensor([-1e-8, -1e-4, -0.5, -3.0], dtype=torch.float32)
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.double().tolist()], dtype=torch.float32)
    torch.testing.assert_close(_log1mexp(x), want, rtol=1e-5, atol=0)


def test_kto_defaults_and_rewards():
    pc, pr, rc, rr, kl = _t(-1.0), _t(-2.0, -3.0), _t(-1.5), _t(-1.0, -3.5), _t(0.2)
    losses, cr, rj = kto_loss(pc, pr, rc, rr, kl=kl)  # beta 0.1, both weights 1
    torch.testing.assert_close(losses, _t(1 - _sig(0.1 * (0.5 - 0.2)), 1 - _sig(0.1 * (0.2 + 1.0)),
                                          1 - _sig(0.1 * (0.2 - 0.5))))
    torch.testing.assert_close(cr, _t(0.05))
    torch.testing.assert_close(rj, _t(-0.1, 0.05))


def test_sft_single_token_mean():
    logps, mask = _t(-3.0, -7.0).reshape(1, 2), _t(1.0, 0.0).reshape(1, 2)
    assert float(sft_loss(logps, mask)) == 3.0
