"""Clipping in the GRPO loop: with grpo.num_iterations 3, the later passes over a step's batch see ratios away
from 1 (the earlier passes' updates moved the policy, by a large learning rate), tokens outside the small clip
range are clipped, their gradient is zero, and the run's clip_ratio/* metrics count them, over all passes.

Every call of grpo_loss in the run is recorded (rl/trainer.py's, wrapped) with the gradient that reaches its
logps; what happened is then recounted here from those records, apart from grpo_loss's own metrics."""

import json

import pytest
import torch

import rl.trainer
from rl.trainer import GRPOTrainer
from tests.helpers import run_config

EPS = 0.02


def _record(monkeypatch) -> list[dict]:
    calls = []
    real = rl.trainer.grpo_loss

    def recorded(logps, old_logps, ref_logps, advantages, mask, **kw):
        call = {"logps": logps.detach().clone(), "old": old_logps.detach().clone(), "adv": advantages.clone(),
                "mask": mask.clone(), "loss_type": kw["loss_type"]}
        logps.register_hook(lambda grad: call.__setitem__("grad", grad.clone()))  # d loss / d logps
        calls.append(call)
        return real(logps, old_logps, ref_logps, advantages, mask, **kw)

    monkeypatch.setattr(rl.trainer, "grpo_loss", recorded)
    return calls


def _clipped(call) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (low, high) (B, T) booleans: the tokens whose ratio is outside [1 - EPS, 1 + EPS] in the direction
    of their advantage, where the min in the loss takes the clipped term (real tokens only)."""
    log_ratio = call["logps"] - call["old"]
    if call["loss_type"] == "gspo":  # one ratio per sequence: exp of the mean over its tokens
        m = call["mask"]
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)).expand_as(log_ratio)
    ratio, adv, real = log_ratio.exp(), call["adv"][:, None], call["mask"] > 0
    return (ratio < 1 - EPS) & (adv < 0) & real, (ratio > 1 + EPS) & (adv > 0) & real


@pytest.mark.parametrize("loss_type", ["dapo", "gspo"])
def test_later_iterations_clip_and_count(tmp_path, monkeypatch, loss_type):
    calls = _record(monkeypatch)
    # 8 sequences in micro-batches of 3, 3 and 2 (metrics are weighted by tokens: an uneven split shows it)
    cfg = run_config(tmp_path, grpo={"num_iterations": 3, "loss_type": loss_type, "epsilon": EPS},
                     train={"max_steps": 1, "learning_rate": 0.05, "micro_batch_size": 3})
    GRPOTrainer(cfg).train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert len(calls) == 3 * 3  # 3 passes x 3 micro-batches
    first, later = calls[:3], calls[3:]

    # old_logps are the policy's before the first update, in every pass: the first pass's ratios are 1 (up
    # to fp32 rounding between the no-grad and the training forward), the later ones' are not
    for i, call in enumerate(later):
        torch.testing.assert_close(call["old"], first[i % 3]["old"], atol=0, rtol=0)
    assert max(((c["logps"] - c["old"]).abs() * c["mask"]).max().item() for c in first) < 1e-5
    for later_pass in (calls[3:6], calls[6:]):
        assert max(((c["logps"] - c["old"]).abs() * c["mask"]).max().item() for c in later_pass) > 10 * EPS

    counts = {"low": 0, "high": 0}
    for call in calls:
        low, high = _clipped(call)
        counts["low"] += int(low.sum())
        counts["high"] += int(high.sum())
        clipped = low | high
        # clipped tokens get no gradient at all (beta 0: no KL term); the others keep theirs
        assert (call["grad"][clipped] == 0).all()
        kept = (call["mask"] > 0) & ~clipped & (call["adv"][:, None] != 0)
        assert (call["grad"][kept] != 0).all()
    assert counts["low"] > 0 and counts["high"] > 0  # clipping happened, on both sides
    assert all(not (lo | hi).any() for lo, hi in map(_clipped, first))  # not in the first pass
    assert all(any((lo | hi).any() for lo, hi in map(_clipped, p)) for p in (calls[3:6], calls[6:]))  # in both later

    # the run's metrics: the clipped tokens' share of the real tokens of all passes
    tokens = sum(float(c["mask"].sum()) for c in calls)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(counts["low"] / tokens, abs=1e-6)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(counts["high"] / tokens, abs=1e-6)
    assert metrics["clip_ratio/region_mean"] == pytest.approx((counts["low"] + counts["high"]) / tokens, abs=1e-6)
