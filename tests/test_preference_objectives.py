"""DPO, ORPO, KTO and SFT objectives: hand-computed values, and each against TRL 1.15's own trainers (a
test-only dependency) on identical inputs: the same tiny model, batch (TRL's collators) and reference, loss
and gradients to 1e-5 in fp32. The log-probabilities on our side are computed plainly from the logits."""

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
    torch.testing.assert_close(cr, _t(0.5, 0.25))  # beta * (policy - reference), each side
    torch.testing.assert_close(rj, _t(-0.25, 0.25))
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


def _label_logps(model, input_ids, attention_mask, labels):
    """Per-token log p of `labels` (-100 = not scored), next-token aligned -> (logps (B, T-1), mask (B, T-1))."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logp * mask, mask


def _tiny_pair():
    from rl.model import _random_model, load_tokenizer

    torch.manual_seed(0)
    model = _random_model("tiny", 0, torch.float32, torch.device("cpu"))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    return model, reference, load_tokenizer(None, None)


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _compare_with_trl(model, theirs_fn, ours_fn):
    model.zero_grad()
    theirs = theirs_fn()
    theirs.backward()
    their_grads = _grads(model)
    model.zero_grad()
    ours = ours_fn()
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    for a, b in zip(_grads(model), their_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_orpo_matches_trl():
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, _, tokenizer = _tiny_pair()
    rows = [{"prompt": f"What is {i} + {i + 3}?", "chosen": f" It is {2 * i + 3}.",
             "rejected": f" Maybe {i * 7} or so"} for i in range(3)]
    trainer = ORPOTrainer(model=model, args=ORPOConfig(output_dir="/tmp/tandem-trl-orpo", per_device_train_batch_size=3,
                                                       beta=0.3, report_to=[], use_cpu=True, max_steps=1),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))

    def ours():
        cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value,
                                          device=torch.device("cpu"))
        ids, att = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        logps, mask = _label_logps(trainer.model, ids, att, cat["concatenated_labels"])
        mean = logps.sum(-1) / mask.sum(-1)
        n = len(rows)
        # TRL's ORPO takes the NLL of the whole chosen sequence (prompt included), averaged over its tokens
        seq_logps, seq_mask = _label_logps(trainer.model, ids[:n], att[:n], torch.where(att[:n] == 1, ids[:n], -100))
        nll = -seq_logps.sum() / seq_mask.sum()
        return orpo_loss(mean[:n], mean[n:], nll, beta=0.3)[0]

    _compare_with_trl(trainer.model, lambda: trainer.get_batch_loss_metrics(trainer.model, batch)[0], ours)


def test_kto_matches_trl():
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model, reference, tokenizer = _tiny_pair()
    rows = [{"prompt": f"What is {i} + {i + 3}?", "completion": f" It is {2 * i + 3 + i % 2}.", "label": i % 2 == 0}
            for i in range(5)]
    args = KTOConfig(output_dir="/tmp/tandem-trl-kto", per_device_train_batch_size=5, beta=0.3, desirable_weight=1.0,
                     undesirable_weight=1.5, report_to=[], use_cpu=True, max_steps=1, precompute_ref_log_probs=False)
    trainer = KTOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.calculate_KL

    def sums(m, prefix=""):
        ids, att, comp = (batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "completion_mask"))
        logps, _ = _label_logps(m, ids, att, ids.masked_fill(comp == 0, -100))
        return logps.sum(-1)

    def ours():
        with torch.no_grad():
            kl = (sums(trainer.model, "KL_") - sums(reference, "KL_")).mean()
            ref = sums(reference)
        pol = sums(trainer.model)
        good = batch["label"].bool()
        losses, _, _ = kto_loss(pol[good], pol[~good], ref[good], ref[~good], kl, beta=0.3, desirable_weight=1.0,
                                undesirable_weight=1.5)
        return losses.nanmean()

    _compare_with_trl(trainer.model, lambda: trainer.compute_loss(trainer.model, batch), ours)


def test_sft_matches_trl():
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, _, tokenizer = _tiny_pair()
    rows = [{"prompt": f"What is {i} + {i + 3}?", "completion": f" It is {2 * i + 3}."} for i in range(3)]
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="/tmp/tandem-trl-sft", per_device_train_batch_size=3,
                                                     report_to=[], use_cpu=True, max_steps=1),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # completion-only: the prompt is not scored

    def ours():
        logps, mask = _label_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return sft_loss(logps, mask)

    _compare_with_trl(trainer.model, lambda: trainer.compute_loss(trainer.model, batch), ours)
