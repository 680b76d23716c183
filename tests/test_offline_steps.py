"""One training step of DPO, ORPO, KTO and SFT (rl/offline.py) against a reference computed here, apart from
the trainer: each sequence through a plain HF forward of its own (no batch, no padding, the full log-softmax),
the reference policy as the model with its adapters disabled, and the objectives' formulas written out (those
of rl/objectives.py's docstrings, and rl/offline.py's for what is fed to them).

The adapters are non-zero (lora_B perturbed), so the policy is not its reference; 5 examples in micro-batches
of 4 sequences make the accumulation uneven (DPO and ORPO: pairs 2 + 2 + 1; KTO and unpacked SFT: 4 + 1), so
a wrong accumulation weight shows. The step's gradients are caught before the optimizer would use them.

Tolerances: both sides are fp32 and differ only in summation order (batched, padded and chunked against one
plain sequence at a time): measured, metrics within 2e-6 and gradients (up to 2 in size) within 7e-6. Asserted:
metrics within 1e-5, gradients within 1e-5 + 1e-4 relative (as tests/test_preference_objectives.py's TRL
comparisons); a wrong weight, term or sequence moves them by far more."""

import json

import pytest
import torch
import torch.nn.functional as F

from rl.config import OfflineRunConfig, build_config
from rl.offline import OfflineTrainer

BETA = 0.3


def _rows(objective: str) -> list[dict]:
    """5 rows of different prompt and completion lengths (left and right padding both happen)."""
    questions = ["What is 2 + 3?", "Add 17 and 25, please.", "Sum?", "What do you get from 100 + 250 + 7?",
                 "Compute 9 + 9."]
    good = ["5.", "It is 42, since 17 + 25 = 42.", "Which numbers?", "357", "The sum is 18."]
    bad = ["It is 6, I think, or maybe 7.", "41", "Zero.", "About three hundred", "99"]
    if objective in ("dpo", "orpo"):
        return [{"prompt": q, "chosen": g, "rejected": b} for q, g, b in zip(questions, good, bad)]
    if objective == "kto":  # desirable and undesirable mixed in every micro-batch
        return [{"prompt": q, "completion": g if i % 2 == 0 else b, "label": i % 2 == 0}
                for i, (q, g, b) in enumerate(zip(questions, good, bad))]
    return [{"prompt": q, "completion": g} for q, g in zip(questions, good)]


def _trainer(tmp_path, objective: str, **objective_keys) -> OfflineTrainer:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(objective)))
    cfg = build_config(OfflineRunConfig, {
        "model": {"name": "random:tiny"}, "lora": {"r": 8},
        "objective": {"batch_size": 5, "beta": BETA, **objective_keys},
        "data": {"path": str(data), "max_length": 64},
        "train": {"max_steps": 1, "micro_batch_size": 4, "learning_rate": 1e-3, "save_every": 0,
                  "output_dir": str(tmp_path / "run"), "num_threads": 2},
        "tracking": {"progress": False}})
    trainer = OfflineTrainer(cfg, objective)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter: the policy differs from its reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return trainer


def _step(trainer) -> tuple[list[dict], dict, dict]:
    """One train_step -> (its batch of examples, in the order taken; its metrics; the gradients it left for the
    optimizer). The optimizer step is skipped, so the weights stay those the reference is computed with."""
    taken, grads = [], {}
    take = trainer.take
    trainer.take = lambda count: taken.extend(take(count)) or taken
    trainer._optimizer_step = lambda: grads.update(
        {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}) or 0.0
    metrics = trainer.train_step(1)
    return [trainer.examples[r] for r in taken], metrics, grads


def _logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion token | everything before it), (len(completion),): one sequence, a plain forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _reference_logps(model, prompt, completion) -> torch.Tensor:
    with torch.no_grad(), model.disable_adapter():
        return _logps(model, prompt, completion)


def _check(trainer, metrics: dict, grads: dict, loss: torch.Tensor, expected: dict) -> None:
    """The step's metrics equal `expected` and its gradients those of `loss`, the reference."""
    for key, value in {"loss": loss, **expected}.items():
        assert float(metrics[key]) == pytest.approx(float(value.detach() if torch.is_tensor(value) else value),
                                                    abs=1e-5), key
    trainer.model.zero_grad(set_to_none=True)
    loss.backward()
    ours = {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}
    assert ours.keys() == grads.keys() and len(grads) > 0
    assert any(g.abs().max() > 1e-3 for g in ours.values())  # a gradient worth comparing
    for k in ours:
        torch.testing.assert_close(grads[k], ours[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_step(tmp_path, loss_type):
    trainer = _trainer(tmp_path, "dpo", loss_type=loss_type)
    batch, metrics, grads = _step(trainer)
    model = trainer.model
    # sequence log-probabilities: sums over the completion's tokens; IPO's are per-token means
    reduce = (lambda x: x.mean()) if loss_type == "ipo" else (lambda x: x.sum())
    pol = {k: torch.stack([reduce(_logps(model, e["prompt"], e[k])) for e in batch]) for k in ("chosen", "rejected")}
    ref = {k: torch.stack([reduce(_reference_logps(model, e["prompt"], e[k])) for e in batch])
           for k in ("chosen", "rejected")}
    chosen, rejected = pol["chosen"] - ref["chosen"], pol["rejected"] - ref["rejected"]
    d = chosen - rejected
    assert d.abs().min() > 1e-2  # the policy is not its reference: no pair sits at the trivial point d = 0
    losses = -F.logsigmoid(BETA * d) if loss_type == "sigmoid" else (d - 1 / (2 * BETA)) ** 2
    sums = [_logps(model, e["prompt"], e[k]).sum().detach() for k in ("chosen", "rejected") for e in batch]
    _check(trainer, metrics, grads, losses.mean(), {
        "rewards/chosen": BETA * chosen.mean(), "rewards/rejected": BETA * rejected.mean(),
        "rewards/margins": BETA * d.mean(), "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": torch.stack(sums[:5]).mean(), "logps/rejected": torch.stack(sums[5:]).mean()})


def test_orpo_step(tmp_path):
    trainer = _trainer(tmp_path, "orpo")
    batch, metrics, grads = _step(trainer)
    chosen = [_logps(trainer.model, e["prompt"], e["chosen"]) for e in batch]
    rejected = [_logps(trainer.model, e["prompt"], e["rejected"]) for e in batch]
    # per-token mean log-probabilities; log odds(y) = log p - log(1 - p) with p their exp
    w, lo = torch.stack([c.mean() for c in chosen]), torch.stack([r.mean() for r in rejected])
    log_odds = (w - lo) - (torch.log1p(-torch.exp(w)) - torch.log1p(-torch.exp(lo)))
    ratio = F.logsigmoid(log_odds)
    # the NLL of the chosen completions' tokens (the prompts' not: Tandem's choice, the paper's; TRL's
    # also scores the prompt), one mean over all of the batch's chosen tokens
    nll = -torch.cat(chosen).sum() / sum(len(e["chosen"]) for e in batch)
    _check(trainer, metrics, grads, nll - BETA * ratio.mean(), {
        "nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean(),
        "rewards/chosen": BETA * w.mean(), "rewards/rejected": BETA * lo.mean()})


def _raise_likelihood(trainer, step: float = 0.1) -> None:
    """One gradient-ascent step (of length `step`) of the adapters on the log-likelihood of every prompt with
    every completion: to first order the policy then gives the completions more probability than the reference
    does, whichever prompt they follow, so that KTO's KL estimate on mismatched pairs is positive (random
    adapters made it negative, and the clamp at 0 would hide the term)."""
    model, examples = trainer.model, trainer.examples
    model.zero_grad(set_to_none=True)
    sum(-_logps(model, a["prompt"], b["completion"]).sum() for a in examples for b in examples).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p.sub_(step * p.grad / norm)
    model.zero_grad(set_to_none=True)


def test_kto_step(tmp_path):
    trainer = _trainer(tmp_path, "kto", desirable_weight=1.0, undesirable_weight=1.5)
    _raise_likelihood(trainer)
    batch, metrics, grads = _step(trainer)
    model = trainer.model
    # the reference point: KL(policy || reference) on mismatched pairs, prompt i with the completion of the
    # batch's next example (the last with the first), averaged, clamped at 0 and not differentiated
    with torch.no_grad():
        shifted = [(e["prompt"], batch[(i + 1) % len(batch)]["completion"]) for i, e in enumerate(batch)]
        kl = torch.stack([_logps(model, p, c).sum() - _reference_logps(model, p, c).sum() for p, c in shifted])
        kl = kl.mean().clamp(min=0)
    assert kl > 0  # the clamp did not hide the term here
    r = torch.stack([_logps(model, e["prompt"], e["completion"]).sum()
                     - _reference_logps(model, e["prompt"], e["completion"]).sum() for e in batch])
    good = torch.tensor([e["label"] for e in batch])
    losses = torch.where(good, 1.0 * (1 - torch.sigmoid(BETA * (r - kl))), 1.5 * (1 - torch.sigmoid(BETA * (kl - r))))
    _check(trainer, metrics, grads, losses.mean(), {
        "kl": kl, "rewards/chosen": BETA * r[good].mean(), "rewards/rejected": BETA * r[~good].mean()})


@pytest.mark.parametrize("packing", [True, False])
def test_sft_step(tmp_path, packing):
    trainer = _trainer(tmp_path, "sft", packing=packing)
    batch, metrics, grads = _step(trainer)
    # completion-only NLL: one mean over all of the batch's completion tokens
    logps = torch.cat([_logps(trainer.model, e["prompt"], e["completion"]) for e in batch])
    _check(trainer, metrics, grads, -logps.sum() / logps.numel(), {"num_tokens": logps.numel()})
