"""The trainer's gradient against an independent reference, on batches that can expose its bugs.

Prompts have different lengths (left padding matters), and the tiny random model ends completions early
here (rollout.stop_token_ids: one vocabulary id in seven ends a completion), so a step's completions have
different lengths and some are truncated: padding, the loss mask,
per-sequence against per-token normalization, `mask_truncated_completions` and the alignment of every
completion with its log-probabilities all matter. Micro-batches of 3 over 8 sequences leave a short last
one (3, 3, 2). The reference recomputes the step from what the rollout returned, by the formulas in the
papers and TRL's definitions: one unpadded sequence at a time through the plain HF forward (no chunked
log-prob kernel, no padding, no micro-batches), the rewards from the reward function, the advantages by hand,
the reference policy as the model with its adapters disabled. Its gradient must equal the one the trainer
accumulated before its optimizer step (fp32: rtol 1e-4, summation order only).
"""

import json

import pytest
import torch

from rl.trainer import GRPOTrainer
from tests.helpers import run_config
from tests.reward_fns import token_reward

STOP = list(range(3, 49152, 7))  # ~1 token in 7 ends a completion of the random model
MICRO_BATCH = 3


def _prompts_of_distinct_lengths(path) -> str:
    """Every prompt a different length: the step's two prompts are padded against each other."""
    rows = [{"prompt": "Say " + "yes " * k} for k in range(1, 17)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_one_step(tmp_path, grpo: dict, rollout: dict, perturb_lora: bool):
    cfg = run_config(tmp_path, grpo={"num_generations": 4, "prompts_per_step": 2, **grpo},
                     data={"task": None, "path": _prompts_of_distinct_lengths(tmp_path / "prompts.jsonl")},
                     rollout={"max_tokens": 8, "stop_token_ids": STOP, "importance_sampling_cap": 0.0, **rollout},
                     train={"max_steps": 1, "micro_batch_size": MICRO_BATCH})
    trainer = GRPOTrainer(cfg)
    if perturb_lora:  # adapters away from zero: the policy differs from the reference (adapters disabled)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    start = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    seen = {}
    update, step = trainer.update, trainer._optimizer_step

    def spy_update(batch, advantages):
        seen["batch"], seen["advantages"] = batch, advantages.clone()
        out = update(batch, advantages)
        seen["metrics"] = out
        return out

    def spy_step():
        seen["grads"] = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        return step()

    trainer.update, trainer._optimizer_step = spy_update, spy_step
    trainer.train()
    with torch.no_grad():  # back to the weights the step started from, for the reference
        for k, p in trainer.model.named_parameters():
            if k in start:
                p.copy_(start[k])
    trainer.model.zero_grad(set_to_none=True)
    return trainer, cfg, seen


def _sequence_logps(model, prompt: list[int], completion: list[int], temperature: float):
    """-> each completion token's log-probability and the policy's entropy there (T,), (T,), at `temperature`."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature  # (T, V)
    logp_all = torch.log_softmax(logits, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), entropy


def _hand_advantages(batch, g: int) -> torch.Tensor:
    rewards = torch.tensor(token_reward(None, None, batch["completion_ids"]))
    grouped = rewards.view(-1, g)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def _reference_loss(trainer, cfg, batch, advantages) -> tuple[torch.Tensor, list[torch.Tensor], float | None]:
    grpo, t = cfg.grpo, cfg.rollout.temperature
    model = trainer.model
    model.train()
    policy_terms, entropies, masks, all_logps = [], [], [], []
    for i, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
        logps, entropy = _sequence_logps(model, p, c, t)
        all_logps.append(logps.detach())
        log_ratio = logps - logps.detach()  # one iteration: old_logps are the detached current ones
        if grpo.loss_type == "gspo":
            log_ratio = log_ratio.mean().expand_as(logps)
        if grpo.loss_type == "cispo":  # the importance weight (1 here, under its cap) detached, times the log-prob
            weight = torch.exp(log_ratio).clamp(max=1 + (grpo.epsilon_high or grpo.epsilon)).detach()
            policy_terms.append(-advantages[i] * weight * logps)
        else:
            policy_terms.append(-advantages[i] * torch.exp(log_ratio))  # inside the clip range: the ratio is 1
        entropies.append(entropy)
        dropped = grpo.mask_truncated_completions and bool(batch["truncated"][i])
        masks.append(torch.zeros_like(logps) if dropped else torch.ones_like(logps))
    n = len(policy_terms)
    parts = [slice(i, min(i + MICRO_BATCH, n)) for i in range(0, n, MICRO_BATCH)]
    selected_fraction = None  # of the real tokens, those whose policy term counts
    if grpo.top_entropy_quantile < 1:  # the policy term on each micro-batch's highest-entropy real tokens only
        chosen = 0
        for part in parts:
            real = torch.cat([e.detach()[m.bool()] for e, m in zip(entropies[part], masks[part])])
            threshold = torch.quantile(real, 1 - grpo.top_entropy_quantile)
            chosen += int((real >= threshold).sum())
            for j in range(part.start, part.stop):
                policy_terms[j] = policy_terms[j] * (entropies[j].detach() >= threshold)
        selected_fraction = chosen / float(sum(m.sum() for m in masks))
    terms = []
    for i, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
        per_token = policy_terms[i] - grpo.entropy_coef * entropies[i]  # the bonus on every token
        if grpo.beta > 0:
            logps = _sequence_logps(model, p, c, t)[0]
            with torch.no_grad(), model.disable_adapter():
                ref = _sequence_logps(model, p, c, t)[0]
            per_token = per_token + grpo.beta * (torch.exp(ref - logps) - (ref - logps) - 1)
        terms.append(per_token)
    sums = torch.stack([(term * m).sum() for term, m in zip(terms, masks)])  # (N,)
    counts = torch.stack([m.sum() for m in masks])  # (N,)
    if grpo.loss_type in ("grpo", "gspo"):
        loss = (sums / counts.clamp(min=1)).mean()
    elif grpo.loss_type in ("dapo", "cispo"):
        loss = sums.sum() / counts.sum().clamp(min=1)
    elif grpo.loss_type == "dr_grpo":
        loss = sums.sum() / (n * cfg.rollout.max_tokens)
    else:  # bnpo: each micro-batch's token mean, averaged over the micro-batches (TRL's accumulation)
        loss = sum(sums[s].sum() / counts[s].sum().clamp(min=1) for s in parts) / len(parts)
    return loss, all_logps, selected_fraction


CASES = {
    "dapo": ({"loss_type": "dapo"}, {}, False),
    "grpo at temperature 0.7": ({"loss_type": "grpo"}, {"temperature": 0.7}, False),
    "dr_grpo, truncated masked": ({"loss_type": "dr_grpo", "mask_truncated_completions": True}, {}, False),
    "bnpo": ({"loss_type": "bnpo"}, {}, False),
    "gspo at temperature 1.3": ({"loss_type": "gspo"}, {"temperature": 1.3}, False),
    "grpo with a KL term": ({"loss_type": "grpo", "beta": 0.1}, {}, True),
    "cispo": ({"loss_type": "cispo"}, {}, False),
    "dapo, entropy bonus, top 20% of tokens": ({"loss_type": "dapo", "entropy_coef": 0.1,
                                                "top_entropy_quantile": 0.2}, {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_step_gradient_equals_an_independent_reference(tmp_path, case):
    grpo, rollout, perturb = CASES[case]
    trainer, cfg, seen = _run_one_step(tmp_path, grpo, rollout, perturb)
    batch = seen["batch"]
    lengths = [len(c) for c in batch["completion_ids"]]
    # the batch can expose what it is meant to: completions of several lengths, stopped and truncated ones
    assert len(set(lengths)) >= 3 and 0 < int(batch["truncated"].sum()) < len(lengths), lengths
    assert len({len(p) for p in batch["prompt_ids"]}) == 2  # the prompts are padded
    advantages = _hand_advantages(batch, cfg.grpo.num_generations)
    torch.testing.assert_close(seen["advantages"].float(), advantages, rtol=1e-5, atol=1e-6)

    loss, logps, selected_fraction = _reference_loss(trainer, cfg, batch, advantages)
    # the engine's sampling log-probabilities are the policy's under the sampling temperature, token for token
    for got, want in zip(batch["sampling_logps"], logps):
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-4)
    loss.backward()
    reference = {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}
    assert reference.keys() == seen["grads"].keys() and len(reference) > 0
    assert any(g.abs().sum() > 0 for g in reference.values())
    for k, grad in reference.items():
        torch.testing.assert_close(seen["grads"][k], grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    if cfg.grpo.beta > 0:  # the reported KL is the policy's from the adapters-disabled reference, not 0
        assert seen["metrics"]["kl"] > 1e-3
    if selected_fraction is not None:  # the reported share of tokens the policy term kept is the reference's
        assert 0 < selected_fraction < 0.5
        assert seen["metrics"]["entropy/selected_fraction"] == pytest.approx(selected_fraction, abs=1e-6)
