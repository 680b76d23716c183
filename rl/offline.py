"""DPO, ORPO, KTO and SFT: the GRPO machine with the rollout and the rewards removed.

    trainer = OfflineTrainer(cfg, "dpo", resume=None)   # cfg: rl.config.OfflineRunConfig
    trainer.train()

A step takes `objective.batch_size` examples from the dataset (seeded, resumable, as GRPO takes prompts),
computes the reference log-probabilities once for the whole batch with the adapters disabled (DPO, KTO),
then accumulates the objective's gradient over micro-batches of `train.micro_batch_size` sequences (auto:
from the memory budget, rollout/scheduler.py; a CUDA OOM halves them and retries the step once), each
micro-batch's loss scaled so that the sum is the whole batch's loss, and takes one optimizer step. Model
loading, kernels, checkpoints, resume, tracking and saving are rl/loop.py's, shared with GRPO.

Log-probabilities go through the same chunked path as GRPO's (rl/logprobs.py, rl/packing.py). Sequence
log-probabilities are sums over completion tokens; IPO and ORPO use per-token means, as TRL does. ORPO's
NLL term is the chosen completion's (the paper's), where TRL's also scores the prompt. Metrics carry TRL's
names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected,
and per objective kl (KTO), nll_loss, log_odds_ratio, log_odds_chosen (ORPO), num_tokens (SFT).
"""

from __future__ import annotations

import time

import torch

from rl import distributed
from rl.config import OBJECTIVES, OfflineRunConfig
from rl.data import PromptStream
from rl.errors import ConfigError
from rl.logprobs import completion_logps
from rl.loop import TrainerBase, collate
from rl.objectives import dpo_loss, kto_loss, orpo_loss, sft_loss
from rl.offline_data import load_examples
from rl.packing import pack, pad_examples, token_logps


class OfflineTrainer(TrainerBase):
    cfg: OfflineRunConfig

    def __init__(self, cfg: OfflineRunConfig, objective: str, resume: str | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
        if objective in ("dpo", "kto") and not cfg.lora.enabled:
            raise ConfigError(f"rl.{objective} with lora.enabled false: {objective.upper()} compares the policy with "
                              "its reference, which LoRA runs get by turning the adapters off; train LoRA "
                              "adapters, or use rl.orpo or rl.sft (no reference) for full-parameter training")
        self.objective = objective
        super().__init__(cfg, resume)

    def setup(self) -> None:
        self.examples = load_examples(self.objective, self.cfg.data, self.tokenizer, self.cfg.train.seed)
        self.stream = PromptStream(len(self.examples), self.cfg.train.seed, self.cfg.data.shuffle)

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        batch = [self.examples[r] for r in self.take(self.cfg.objective.batch_size)]  # this rank's share
        self.model.train()
        per_example = 2 if self.objective in ("dpo", "orpo") else 1
        tokens = self.cfg.data.max_length if self.objective == "sft" and self.cfg.objective.packing else max(
            len(e["prompt"]) + max(len(e.get(k, ())) for k in ("chosen", "rejected", "completion")) for e in batch)
        self.memory.plan_training(None, tokens, len(batch) * per_example, self.cfg.train.fixed_micro_batch,
                                  self.cfg.model.activation_policy)
        metrics = self.memory.run_with_backoff(
            "train", lambda plan: getattr(self, f"_{self.objective}")(batch),
            reset=lambda: self.optimizer.zero_grad(set_to_none=True))
        self.memory.observe_training()
        metrics.update(self.memory.metrics())
        metrics["grad_norm"] = self._optimizer_step()
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        self._record_peak("train", metrics)
        metrics["timing/step"] = time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------------------------------ log-probabilities

    def _chunks(self, n: int, sequences_per_example: int):
        size = max(1, self.memory.plan.micro_batch // sequences_per_example)
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def _sequence_logps(self, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sum, mean) over each completion's tokens, (B,) fp32."""
        ids, attn, tc = collate(prompts, completions, self.tokenizer.pad_token_id, self.policy.device)
        logps, _ = completion_logps(self.model, ids, attn, tc)
        mask = torch.zeros_like(logps)
        for i, c in enumerate(completions):
            mask[i, :len(c)] = 1
        total = (logps * mask).sum(-1)
        return total, total / mask.sum(-1)

    def _reference_logps(self, prompts, completions, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference policy (adapters off), once for the whole batch."""
        sums, means = [], []
        with torch.no_grad(), self.model.disable_adapter():
            for i in range(0, len(prompts), chunk):
                s, m = self._sequence_logps(prompts[i:i + chunk], completions[i:i + chunk])
                sums.append(s)
                means.append(m)
        return torch.cat(sums), torch.cat(means)

    # ------------------------------------------------------------------------------------ the objectives

    def _dpo(self, batch: list[dict]) -> dict:
        o, n = self.cfg.objective, len(batch)
        prompts = [e["prompt"] for e in batch]
        ref_sum, ref_mean = self._reference_logps(prompts * 2, [e["chosen"] for e in batch] +
                                                  [e["rejected"] for e in batch], self.memory.plan.micro_batch)
        ref = ref_mean if o.loss_type == "ipo" else ref_sum
        out = {k: [] for k in ("loss", "chosen", "rejected", "logps_c", "logps_r")}
        for rows in self._chunks(n, 2):
            micro = [batch[i] for i in rows]
            s, m = self._sequence_logps([e["prompt"] for e in micro] * 2,
                                        [e["chosen"] for e in micro] + [e["rejected"] for e in micro])
            pol = m if o.loss_type == "ipo" else s
            k = len(micro)
            losses, chosen, rejected = dpo_loss(pol[:k], pol[k:], ref[list(rows)], ref[[n + i for i in rows]],
                                                o.beta, o.loss_type, o.label_smoothing)
            (losses.sum() / n).backward()
            for key, value in zip(out, (losses.detach(), chosen, rejected, s[:k].detach(), s[k:].detach())):
                out[key].append(value)
        return _preference_metrics(out)

    def _orpo(self, batch: list[dict]) -> dict:
        o, n = self.cfg.objective, len(batch)
        chosen_tokens = sum(len(e["chosen"]) for e in batch)
        out = {k: [] for k in ("loss", "chosen", "rejected", "logps_c", "logps_r")}
        extra = {"nll_loss": 0.0, "log_odds_ratio": 0.0, "log_odds_chosen": 0.0}
        for rows in self._chunks(n, 2):
            micro = [batch[i] for i in rows]
            k = len(micro)
            s, m = self._sequence_logps([e["prompt"] for e in micro] * 2,
                                        [e["chosen"] for e in micro] + [e["rejected"] for e in micro])
            nll = -s[:k].sum() / chosen_tokens * (n / k)  # this micro-batch's share of the batch's NLL, rescaled
            loss, chosen, rejected, parts = orpo_loss(m[:k], m[k:], nll, o.beta)
            (loss * k / n).backward()
            for key, value in zip(out, (loss.detach().expand(k), chosen, rejected, s[:k].detach(), s[k:].detach())):
                out[key].append(value)
            for key in extra:
                extra[key] += float(parts[key]) * k / n
        return {**_preference_metrics(out), **extra}

    def _kto(self, batch: list[dict]) -> dict:
        o, n, chunk = self.cfg.objective, len(batch), self.memory.plan.micro_batch
        prompts, completions = [e["prompt"] for e in batch], [e["completion"] for e in batch]
        ref_sum, _ = self._reference_logps(prompts, completions, chunk)
        # the reference point: KL(policy || reference) estimated on mismatched prompt-completion pairs
        mismatched = completions[1:] + completions[:1]
        with torch.no_grad():
            kl_policy = torch.cat([self._sequence_logps(prompts[i:i + chunk], mismatched[i:i + chunk])[0]
                                   for i in range(0, n, chunk)])
        kl_ref, _ = self._reference_logps(prompts, mismatched, chunk)
        kl = (kl_policy - kl_ref).mean().clamp(min=0)
        label = torch.tensor([e["label"] for e in batch])
        losses_all, chosen_all, rejected_all = [], [], []
        for rows in self._chunks(n, 1):
            idx = list(rows)
            s, _ = self._sequence_logps([prompts[i] for i in idx], [completions[i] for i in idx])
            good = label[idx].to(s.device)
            losses, chosen, rejected = kto_loss(s[good], s[~good], ref_sum[idx][good], ref_sum[idx][~good], kl,
                                                o.beta, o.desirable_weight, o.undesirable_weight)
            (losses.sum() / n).backward()
            losses_all.append(losses.detach())
            chosen_all.append(chosen)
            rejected_all.append(rejected)
        chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
        metrics = {"loss": torch.cat(losses_all).mean(), "kl": kl}
        if chosen.numel():
            metrics["rewards/chosen"] = chosen.mean()
        if rejected.numel():
            metrics["rewards/rejected"] = rejected.mean()
        if chosen.numel() and rejected.numel():
            metrics["rewards/margins"] = chosen.mean() - rejected.mean()
        return metrics

    def _sft(self, batch: list[dict]) -> dict:
        o, pad = self.cfg.objective, self.tokenizer.pad_token_id
        pairs = [(e["prompt"], e["completion"]) for e in batch]
        if o.packing:
            rows = pack(pairs, self.cfg.data.max_length, pad, o.completion_only)
            rows["attention_mask"] = None
        else:
            rows = pad_examples(pairs, pad, o.completion_only)
        # the tokens of all ranks / the world: each rank's loss is then its share of the step's x world, and
        # the average of the ranks' gradients the step's gradient
        tokens = distributed.total(float(rows["loss_mask"].sum()))
        total = tokens / self.world
        loss_sum = 0.0
        for micro in self._chunks(rows["input_ids"].shape[0], 1):
            sl = slice(micro.start, micro.stop)
            att = rows["attention_mask"][sl].to(self.policy.device) if rows["attention_mask"] is not None else None
            logps = token_logps(self.model, rows["input_ids"][sl].to(self.policy.device),
                                rows["position_ids"][sl].to(self.policy.device), attention_mask=att)
            loss = sft_loss(logps, rows["loss_mask"][sl].to(logps.device), num_items_in_batch=total)
            loss.backward()
            loss_sum += loss.item()
        return {"loss": loss_sum, "num_tokens": tokens}


def _preference_metrics(out: dict) -> dict:
    loss, chosen, rejected = (torch.cat(out[k]) for k in ("loss", "chosen", "rejected"))
    return {"loss": loss.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": torch.cat(out["logps_c"]).mean(), "logps/rejected": torch.cat(out["logps_r"]).mean()}
