"""Objectives on per-token tensors: GRPO and its variants, group-relative advantages, and the degenerate
objectives without a rollout (DPO, ORPO, KTO, SFT; see the second half of this file).

All tensors are (B, T) over completion tokens with a 0/1 `mask`; `advantages` is (B,). Loss types follow TRL's
definitions so that results can be compared with it:

    ratio   r = exp(logps - old_logps)                     (gspo: one ratio per sequence, exp(mean log r))
    token   l = -min(r * A, clip(r, 1 - eps, 1 + eps_high) * A) + beta * KL_k3(ref || policy)
    grpo    mean over sequences of (sum_t l * mask / sum_t mask)           (the DeepSeekMath paper)
    bnpo    sum l * mask / sum mask            (tokens of this micro-batch)
    dapo    sum l * mask / num_items_in_batch  (tokens of the whole generation batch; DAPO's token-level mean)
    dr_grpo sum l * mask / (B * max_completion_length)                     (Dr. GRPO: no length bias)
    gspo    sequence-level ratio and clipping, then the grpo normalization (GSPO paper)

The k3 estimator: KL = exp(ref - logps) - (ref - logps) - 1, unbiased and always >= 0. `is_weights`, when
given, multiplies each token's loss: the truncated importance-sampling correction for the rollout engine's
sampling distribution differing from the trainer's (computed by the caller, detached).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(B,) rewards, consecutive groups of G completions of one prompt -> (B,) advantages.

    A = r - mean(group); divided by the group's std ("group", GRPO), the whole batch's std ("batch", as
    REINFORCE++ and Dr. GRPO's discussion suggest), or not at all ("none", Dr. GRPO).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)  # (P, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return advantages / (std + eps)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, *, is_weights: torch.Tensor | None = None,
              num_items_in_batch: float | None = None, max_completion_length: int | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (scalar loss, metrics). Shapes: logps/old_logps/ref_logps/mask/is_weights (B, T), advantages (B,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (log-probabilities under the reference policy)")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages[:, None].to(logps.dtype)  # (B, 1)
    log_ratio = logps - old_logps  # (B, T)
    if loss_type == "gspo":
        seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        log_ratio = seq_log_ratio[:, None].expand_as(logps)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics: dict[str, torch.Tensor] = {}
    if beta > 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # (B, T), k3 estimator
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, mask).detach()

    if loss_type in ("grpo", "gspo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dapo":
        denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * mask).sum() / max(float(denominator), 1.0)
    else:  # dr_grpo
        length = max_completion_length if max_completion_length is not None else logps.shape[1]
        loss = (per_token * mask).sum() / (logps.shape[0] * length)

    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics["clip_ratio/low_mean"] = _masked_mean(low.to(mask.dtype), mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high.to(mask.dtype), mask)
        metrics["clip_ratio/region_mean"] = _masked_mean((low | high).to(mask.dtype), mask)
    return loss, metrics


# ------------------------------------------------------------------ the degenerate objectives (no rollout)
#
# Sequence log-probabilities below are (B,) sums over completion tokens unless said otherwise; the forms and
# the names of the loss types are TRL 1.15's, so that its results and ours can be compared.

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """-> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    With d = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
        sigmoid  -(1 - ls) log sigma(beta d) - ls log sigma(-beta d)      (DPO; ls > 0: conservative DPO)
        robust   (-(1 - ls) log sigma(beta d) + ls log sigma(-beta d)) / (1 - 2 ls)   (unbiased under label noise)
        hinge    max(0, 1 - beta d)                                        (SLiC)
        ipo      (d - 1 / (2 beta))^2, on per-token MEAN log-probabilities (IPO; pass means, as TRL averages)
    Rewards are beta times each side's log-ratio, detached (for the rewards/* metrics)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {', '.join(DPO_LOSS_TYPES)}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    d = chosen - rejected
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * logsig(beta * d) - label_smoothing * logsig(-beta * d)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * logsig(beta * d) + label_smoothing * logsig(-beta * d)) \
            / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    else:
        losses = (d - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float = 0.1):
    """ORPO on per-token MEAN log-probabilities (B,) and the chosen completions' NLL (scalar):
        log odds(y) = log p - log(1 - p),   loss = nll - beta * mean log sigma(log odds(y_w) - log odds(y_l))
    -> (loss, chosen_rewards, rejected_rewards, metrics). No reference model."""
    w, lo = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (w - lo) - (_log1mexp(w) - _log1mexp(lo))
    ratio = torch.nn.functional.logsigmoid(log_odds)
    loss = chosen_nll - beta * ratio.mean()
    metrics = {"log_odds_ratio": ratio.mean().detach(), "log_odds_chosen": log_odds.mean().detach(),
               "nll_loss": chosen_nll.detach()}
    return loss, beta * w.detach(), beta * lo.detach(), metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO on unpaired examples: desirable (chosen) and undesirable (rejected) ones, any counts, and the
    reference point `kl` (a detached estimate of KL(policy || ref), clamped at 0):
        desirable    1 - sigma(beta (log pi/ref - kl))
        undesirable  1 - sigma(beta (kl - log pi/ref))
    -> (losses (n_chosen + n_rejected,), chosen_rewards, rejected_rewards)."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    kl = kl.detach().clamp(min=0)
    losses = torch.cat((desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_items_in_batch: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the tokens where mask is 1 (the completion, by default): per-token logps
    (B, T) -> the mean over those tokens, or their sum / num_items_in_batch across gradient accumulation."""
    total = -(logps * mask).sum()
    return total / (num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0))
