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
    cispo   l = -sg(min(r, 1 + eps_high)) * A * logp: the importance weight clipped and detached, so that
            clipped tokens still pass a gradient through their log-probability (MiniMax-M1); dapo's
            normalization. TRL 1.15 writes the cap as epsilon_high itself (its 5.0 is our 4.0).
    sapo    l = -(4 / tau) sigmoid(tau (r - 1)) * A: a soft gate in place of the hard clip, tau_pos for
            A > 0 and tau_neg otherwise (SAPO paper; TRL's defaults 1.0 and 1.05); grpo's normalization.

The k3 estimator: KL = exp(ref - logps) - (ref - logps) - 1, unbiased and always >= 0. `is_weights`, when
given, multiplies each token's loss: the truncated importance-sampling correction for the rollout engine's
sampling distribution differing from the trainer's (computed by the caller, detached). `policy_mask` (the
80/20 rule's high-entropy tokens) keeps the policy term on some tokens only; the KL term and the entropy bonus
still act on every token, and every normalization still counts every token, as in TRL. The entropy bonus
subtracts `entropy_coef * H` from each token's loss before the normalization, so that it is the loss type's own
mean of the entropy.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo")
ESTIMATORS = ("group", "rloo", "reinforce_pp")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     eps: float = 1e-4, estimator: str = "group") -> torch.Tensor:
    """(B,) rewards, consecutive groups of G completions of one prompt -> (B,) advantages.

    group:  A = r - mean(group); divided by the group's std ("group", GRPO), the whole batch's std ("batch", as
            Dr. GRPO's discussion suggests), or not at all ("none", Dr. GRPO).
    rloo:   A = r - mean of the group's other G - 1 rewards (the leave-one-out baseline: G / (G - 1) times the
            group's deviation, unbiased), then `scale` as above; RLOO is usually run with "none".
    reinforce_pp: A = r - mean(group), then normalized over the whole batch, (A - mean A) / std A
            (REINFORCE++ with a group baseline); `scale` does not apply.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    grouped = rewards.view(-1, num_generations)  # (P, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if estimator == "rloo":
        advantages = advantages * (num_generations / (num_generations - 1))
    elif estimator == "reinforce_pp":
        if advantages.numel() < 2:
            return torch.zeros_like(advantages)
        return (advantages - advantages.mean()) / (advantages.std() + eps)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return advantages / (std + eps)


def normalize_per_function(per_function: torch.Tensor, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """(N, F) rewards of F functions, consecutive groups of G rows -> each function's rewards centred on their
    group's mean and divided by its std (GDPO), so that every function weighs alike whatever its range. NaN
    (a function that returned None) stays NaN and is left out of its group's statistics; a group with fewer
    than two values of a function gets 0 for it."""
    grouped = per_function.view(-1, num_generations, per_function.shape[1])  # (P, G, F)
    present = ~grouped.isnan()
    count = present.sum(dim=1, keepdim=True)
    mean = torch.nansum(grouped, dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(present, grouped - mean, 0.0)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    out = torch.where(count > 1, centred / (std + eps), 0.0)
    return torch.where(present, out, torch.nan).view_as(per_function)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """(B, T) token entropies and 0/1 mask -> (B, T) 0/1: the real tokens whose entropy is at or above the
    (1 - quantile) quantile of the real tokens' entropies, linearly interpolated (TRL's rule): 0.2 keeps the
    top 20% (the 80/20 rule), 0 the largest alone. The caller passes a micro-batch's tensors."""
    real = entropy[mask.bool()].float()
    if real.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(real, 1 - quantile)
    return ((entropy >= threshold) & mask.bool()).to(mask.dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, *, is_weights: torch.Tensor | None = None,
              num_items_in_batch: float | None = None, max_completion_length: int | None = None,
              sapo_temperatures: tuple[float, float] = (1.0, 1.05), policy_mask: torch.Tensor | None = None,
              entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (scalar loss, metrics). Shapes: logps/old_logps/ref_logps/mask/is_weights/policy_mask/entropy (B, T),
    advantages (B,). sapo_temperatures: (tau_pos, tau_neg)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (log-probabilities under the reference policy)")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef needs entropy (each token's entropy under the policy, differentiable)")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages[:, None].to(logps.dtype)  # (B, 1)
    log_ratio = logps - old_logps  # (B, T)
    if loss_type == "gspo":
        seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        log_ratio = seq_log_ratio[:, None].expand_as(logps)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1 + eps_high).detach() * adv * logps
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1]).to(logps.dtype)  # (B, 1)
        per_token = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    if policy_mask is not None:
        per_token = per_token * policy_mask.to(logps.dtype)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics: dict[str, torch.Tensor] = {}
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if beta > 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # (B, T), k3 estimator
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, mask).detach()

    if loss_type in ("grpo", "gspo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type in ("dapo", "cispo"):
        denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * mask).sum() / max(float(denominator), 1.0)
    else:  # dr_grpo
        length = max_completion_length if max_completion_length is not None else logps.shape[1]
        loss = (per_token * mask).sum() / (logps.shape[0] * length)

    with torch.no_grad():  # cispo: the tokens whose weight was capped; sapo clips nothing
        low = (ratio < 1 - eps_low) & (adv < 0) & (loss_type not in ("cispo", "sapo"))
        high = (ratio > 1 + eps_high) & (adv > 0) & (loss_type != "sapo")
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
