"""DPO, ORPO, KTO and SFT objectives: hand-computed values, and DPO against TRL 1.15 itself (a test-only
dependency) on identical inputs: the same tiny model, batch and reference, loss and gradients to 1e-5 in fp32."""

import copy
import math

import pytest
import torch


from rl.objectives import dpo_loss, kto_loss, orpo_loss, sft_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_loss_types_by_hand():
    pc, pr, rc, rr = _t(-3.0, -2.0), _t(-5.0, -1.0), _t(-4.0, -2.5), _t(-4.5, -1.5)
    d = torch.tensor([(-3 + 4) - (-5 + 4.5), (-2 + 2.5) - (-1 + 1.5)], dtype=torch.float64)  # [1.5, 0.0]
    beta = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    torch.testing.assert_close(losses, _t(-math.log(sig(0.75)), math.log(2.0)))
    torch.testing.assert_close(cr, _t(0.5, 0.25)) and torch.testing.assert_close(rj, _t(-0.25, 0.25))
    ls = 0.1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=ls)
    torch.testing.assert_close(losses, -(1 - ls) * torch.log(torch.sigmoid(beta * d)) - ls * torch.log(
        torch.sigmoid(-beta * d)))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "robust", label_smoothing=ls)
    torch.testing.assert_close(losses, _t(*[(-(0.9) * math.log(sig(beta * x)) + 0.1 * math.log(sig(-beta * x))) / 0.8
                                            for x in d.tolist()]))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "hinge")[0], _t(0.25, 1.0))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "ipo")[0], _t(0.25, 1.0))  # (d - 1)^2
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(pc, pr, rc, rr, beta, "kto_pair")


def test_orpo_kto_sft_by_hand():
    w, lo = _t(-0.5, -2.0), _t(-1.0, -0.1)
    odds = lambda p: math.log(math.exp(p) / (1 - math.exp(p)))  # noqa: E731
    log_odds = [odds(a) - odds(b) for a, b in zip(w.tolist(), lo.tolist())]
    loss, cr, _, m = orpo_loss(w, lo, torch.tensor(1.25, dtype=torch.float64), beta=0.2)
    expected = 1.25 - 0.2 * sum(math.log(1 / (1 + math.exp(-x))) for x in log_odds) / 2
    # ORPO computes in fp32 whatever the input dtype (as TRL does): 1e-6
    assert abs(float(loss) - expected) < 1e-6 and abs(float(m["log_odds_chosen"]) - sum(log_odds) / 2) < 1e-6

    losses, cr, rj = kto_loss(_t(-1.0), _t(-2.0, -3.0), _t(-1.5), _t(-1.0, -3.5), kl=_t(0.2), beta=0.5,
                              desirable_weight=1.0, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(losses, _t(1 - sig(0.5 * (0.5 - 0.2)), 2 * (1 - sig(0.5 * (0.2 + 1.0))),
                                          2 * (1 - sig(0.5 * (0.2 - 0.5)))))
    # a negative KL estimate counts as 0 (the reference point is a divergence)
    torch.testing.assert_close(kto_loss(_t(-1.0), _t(), _t(-1.5), _t(), kl=_t(-0.3), beta=0.5)[0],
                               _t(1 - sig(0.25)))

    logps = _t(-1.0, -2.0, -3.0, -4.0).reshape(2, 2)
    mask = _t(1.0, 0.0, 1.0, 1.0).reshape(2, 2)
    assert float(sft_loss(logps, mask)) == pytest.approx(8.0 / 3)
    assert float(sft_loss(logps, mask, num_items_in_batch=4)) == pytest.approx(2.0)


def _completion_logps(model, input_ids, attention_mask, completion_mask):
    """Sum and mean over completion tokens of log p(token | prefix), in fp32, plainly."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].float()
    return (logp * mask).sum(-1), (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@pytest.fixture(scope="module")
def trl_dpo():
    """One TRL DPOTrainer over a tiny model whose policy has moved away from its reference, and one batch."""
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.15")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rl.model import _random_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(None, None)
    model = _random_model("tiny", 0, torch.float32, torch.device("cpu"))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    rows = [{"prompt": f"What is {i} + {i + 3}?", "chosen": f" It is {2 * i + 3}.",
             "rejected": f" Maybe {i * 7} or so"} for i in range(3)]
    args = DPOConfig(output_dir="/tmp/tandem-trl-dpo", per_device_train_batch_size=3, beta=0.3, report_to=[],
                     use_cpu=True, max_steps=1, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    return trainer, reference, next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                       ("robust", 0.2)])
def test_dpo_matches_trl(trl_dpo, loss_type, label_smoothing):
    trainer, reference, batch = trl_dpo
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], label_smoothing
    trainer.model.zero_grad()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = [p.grad.clone() for p in trainer.model.parameters()]

    trainer.model.zero_grad()
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    total, mean = _completion_logps(trainer.model, ids, att, comp)
    with torch.no_grad():
        ref_total, ref_mean = _completion_logps(reference, ids, att, comp)
    pol, ref = (mean, ref_mean) if loss_type == "ipo" else (total, ref_total)
    (pc, pr), (rc, rr) = pol.chunk(2), ref.chunk(2)  # TRL's batch is [chosen; rejected]
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    ours = losses.mean()
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    for a, b in zip((p.grad for p in trainer.model.parameters()), their_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert theirs.item() != pytest.approx(math.log(2) if loss_type == "sigmoid" else 0.0)  # a non-trivial point
