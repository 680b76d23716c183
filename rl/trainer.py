"""The GRPO loop: prompts -> rollout (G per prompt) -> rewards -> advantages -> policy update.

    trainer = GRPOTrainer(cfg, resume=None)   # resume: None, "latest", or a checkpoint path
    trainer.train()

One step:
  1. ROLLOUT   the engine generates G completions for each of `grpo.prompts_per_step` prompts, with the
               policy's live weights (LoRA on), keeping each token's sampling log-probability.
  2. REWARDS   every reward function scores every completion (concurrently); weighted sum per completion.
  3. ADVANTAGE group-relative (rl/objectives.py).
  4. TRAIN     `grpo.num_iterations` optimizer steps over the batch, each accumulating gradients over
               micro-batches of `train.micro_batch_size` sequences (auto: the most that fit the memory
               budget). old_logps are the policy's before the first update (computed only when
               num_iterations > 1; else the detached current logps, as in TRL); ref_logps come from the same
               model with adapters disabled, only when beta > 0.

With rollout.environment set, step 1 is multi-turn (rollout/environment.py): one environment per completion,
the model's turns and the environment's answers in one token sequence, the loss masked to the model's tokens.

With eval.every set, the held-out prompts (rl/evaluation.py) are answered through the same engine every
eval.every steps and after the last, and the best evaluation's checkpoint is kept (eval.best_metric, rl/best.py).

Memory (rollout/scheduler.py): the rollout runs within the budget (optimizer state moved out, waves when the
KV cache does not fit), and training picks its micro-batch and activation policy from what is left.

The run itself (set-up, loop, checkpoints, saving) is rl/loop.py's TrainerBase. Sampling is seeded per
step, so a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

import torch

from rl import distributed
from rl.best import BestCheckpoint
from rl.config import GRPORunConfig
from rl.data import PromptStream, is_chat, tokenize_all
from rl.evaluation import Evaluation, eval_datasets
from rl.errors import ConfigError
from rl.logprobs import completion_logps
from rl.loop import TrainerBase, collate, pad_rows
from rl.model import resolve_source, unwrap
from rl.objectives import grpo_loss, group_advantages, high_entropy_mask, normalize_per_function
from rewards import RewardRunner
from rewards.sandbox import Limits
from rollout import SamplingParams, make_engine
from rollout.environment import load_environment, open_conversations, run_turns
from rollout.native import eos_token_ids
from rollout.vllm_engine import unsupported_reason

log = logging.getLogger("tandem")


def micro_slices(n: int, micro_batch: int) -> list[slice]:
    return [slice(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]


def _format_option(value: str) -> dict:
    """rewards.format -> the `format` reward's keyword: a built-in format's name, or a regex as its pattern."""
    return {"format": value} if value in ("think_answer", "boxed") else {"pattern": value}


def reward_runner(cfg: GRPORunConfig) -> RewardRunner:
    """The run's reward functions with their options (also what rl.evaluate scores with)."""
    code_limits = Limits(wall_s=cfg.rewards.code_timeout_s, cpu_s=max(1, math.ceil(cfg.rewards.code_timeout_s)),
                         memory_mb=cfg.rewards.code_memory_mb)
    return RewardRunner(cfg.rewards.functions, cfg.rewards.weights, cfg.rewards.timeout_s,
                        options={"format": _format_option(cfg.rewards.format),
                                 "overlong_penalty": {"max_tokens": cfg.rollout.max_tokens},
                                 "python_tests": {"limits": code_limits, "on_error": cfg.rewards.code_on_error}})


def stop_tokens(cfg: GRPORunConfig, model, tokenizer) -> list[int] | None:
    """rollout.stop_token_ids with the model's EOS; None = the engine's default (the EOS alone)."""
    if not cfg.rollout.stop_token_ids:
        return None
    return sorted(set(cfg.rollout.stop_token_ids) | set(eos_token_ids(unwrap(model), tokenizer)))


class GRPOTrainer(TrainerBase):
    cfg: GRPORunConfig
    keeps_replica = True  # sharded full-parameter runs: the engine generates with a whole copy

    def setup(self) -> None:
        cfg = self.cfg
        self.dataset, eval_dataset = eval_datasets(cfg)  # the eval prompts are never in the training rows
        self.prompt_ids = tokenize_all(self.dataset, self.tokenizer, cfg.data, cfg.rollout.max_prompt_tokens)
        self.stream = PromptStream(len(self.dataset), cfg.train.seed, cfg.data.shuffle)
        self.rewards = reward_runner(cfg)
        self.environment = load_environment(cfg.rollout.environment) if cfg.rollout.environment else None
        if self.environment is not None:  # an environment that cannot open a conversation fails at start-up
            open_conversations([self.dataset[0]], 1, self.environment, self.tokenizer,
                               cfg.rollout.environment_timeout_s, cfg.rollout.max_prompt_tokens)
        self._preflight_rewards()
        if eval_dataset is not None:
            self.evaluation = Evaluation(cfg, eval_dataset, self.tokenizer, self.rewards,
                                         stop_tokens(cfg, self.policy.model, self.tokenizer))
            if cfg.eval.best_metric:
                self.best = BestCheckpoint(self.out / "checkpoints" / "best", cfg.eval.best_metric)
        self.engine = self._make_engine()
        self.memory.max_rows = cfg.rollout.max_rows or None

    def total_updates(self) -> int:
        return self.cfg.train.max_steps * self.cfg.grpo.num_iterations

    # ------------------------------------------------------------------------------------ set-up

    def _preflight_rewards(self) -> None:
        """Call every reward function once on the first row, so that a broken one fails at start-up."""
        row = self.dataset[0]
        completion = [{"role": "assistant", "content": ""}] if is_chat(row["prompt"]) else ""
        columns = {k: [v] for k, v in row.items() if k != "prompt"}
        if self.environment is not None:
            columns["turns"] = [[]]
        self.rewards([row["prompt"]], [completion], {**columns, "completion_ids": [[]]})

    # ------------------------------------------------------------------------------------ the loop

    def train_step(self, step: int) -> dict:
        phase_memory: dict[str, float] = {}
        t0 = time.perf_counter()
        rows = self.take(self.cfg.grpo.prompts_per_step)
        self.signal_point("rollout", step)
        batch = self.rollout(rows, step)
        self._record_peak("rollout", phase_memory)
        t1 = time.perf_counter()
        rewards, reward_metrics = self.score(batch)
        if self.cfg.grpo.dynamic_sampling:
            r0 = time.perf_counter()
            batch, rewards, resampled = self.resample(step, batch, rewards)
            # the further rounds' rollouts count as rollout time, their scoring as rewards time
            t1 += time.perf_counter() - r0 - resampled.pop("timing/resample_rewards")
            reward_metrics.update(resampled)
        # from every rank's rewards (groups never straddle ranks; scale_rewards batch needs them all)
        grpo = self.cfg.grpo
        everyone = group_advantages(distributed.gather(rewards), grpo.num_generations, grpo.scale_rewards,
                                    estimator=grpo.advantage)
        advantages = everyone[self.rank * len(rewards):(self.rank + 1) * len(rewards)]
        t2 = time.perf_counter()
        self.signal_point("train", step)
        train_metrics = self.update(batch, advantages)
        self._record_peak("train", phase_memory)
        t3 = time.perf_counter()
        generated = sum(map(sum, batch["completion_masks"])) if "completion_masks" in batch else \
            sum(len(c) for c in batch["completion_ids"])  # the model's tokens, not an environment's
        metrics = {**reward_metrics, **self._length_metrics(batch), **self._turn_metrics(batch), **train_metrics,
                   "timing/rollout": t1 - t0, "timing/rewards": t2 - t1, "timing/train": t3 - t2,
                   "timing/step": t3 - t0, "throughput/rollout_tokens_per_s": generated / max(t1 - t0, 1e-9),
                   **phase_memory, **self.memory.metrics()}
        if hasattr(self.engine, "last_sync_s"):  # vLLM: the adapter copied into its buffers before the rollout
            metrics["timing/lora_sync"] = self.engine.last_sync_s
        every = self.cfg.tracking.log_completions_every
        if every and (step % every == 0 or step == 1):
            names = [f"reward/{name}" for name in self.rewards.names]
            rows = [{"prompt": str(p), "completion": c, "reward": float(r),
                     **{name: None if v != v else float(v) for name, v in zip(names, per_fn.tolist())}}
                    for p, c, r, per_fn in zip(batch["prompts"], batch["texts"], batch["rewards"],
                                               batch["rewards_per_fn"])]
            if "turns" in batch:  # multi-turn: what the environment did, and why a conversation ended early
                for row, turns, calls, error in zip(rows, batch["num_turns"], batch["tool_calls"], batch["env_errors"]):
                    row.update(turns=int(turns), tool_calls=int(calls), environment_error=error)
            self.tracker.log_samples(step, rows[:self.cfg.grpo.num_generations])
        if self.cfg.tracking.tensorboard or self.cfg.tracking.wandb:  # the same on every rank: gather is collective
            self.tracker.log_histogram(step, "reward/histogram", distributed.gather(batch["rewards"]))
        return metrics

    def _max_model_len(self) -> int:
        """The longest sequence a rollout holds. A multi-turn rollout's native engine goes on from each
        conversation's KV cache with every row's next turn after the longest row (rollout/native.py): twice
        max_tokens leaves room for the row with the most written and the row with the most room left."""
        rc = self.cfg.rollout
        return rc.max_prompt_tokens + rc.max_tokens * (2 if rc.environment else 1)

    def _make_engine(self):
        cfg = self.cfg
        model_dir = None
        kind = cfg.rollout.engine if cfg.lora.enabled else "native"  # vLLM's engine updates LoRA adapters only
        if kind != "native" and unsupported_reason() is None:
            model_dir, _ = resolve_source(cfg.model.name, cfg.train.seed, need_dir=True)  # what vLLM loads
            self._check_vllm_share()
        model = self.replica if self.sharded else self.model
        return make_engine(kind, model, self.tokenizer, model_dir=model_dir, lora_rank=cfg.lora.r,
                           max_model_len=self._max_model_len(),
                           kv_cache_gb=cfg.rollout.vllm_kv_cache_gb,
                           gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                           share_weights=cfg.rollout.vllm_share_weights, seed=cfg.train.seed,
                           enforce_eager=cfg.rollout.vllm_enforce_eager or None,
                           decode_4bit=cfg.rollout.native_decode_4bit,
                           max_batch=cfg.grpo.num_generations * cfg.grpo.prompts_per_step)

    def _check_vllm_share(self) -> None:
        """vLLM sizes itself as a fraction of the whole card, which must leave training room in the budget."""
        cfg, budget = self.cfg, self.memory.budget
        if not self.memory.cuda or cfg.train.gpu_memory_gb is None:
            return
        card = torch.cuda.get_device_properties(self.policy.device).total_memory
        share = cfg.rollout.vllm_gpu_memory_utilization * card
        if share > budget / 2:
            raise ConfigError(
                f"rollout.vllm_gpu_memory_utilization {cfg.rollout.vllm_gpu_memory_utilization} is "
                f"{share / 2**30:.1f} GiB of this card, more than half of train.gpu_memory_gb "
                f"{cfg.train.gpu_memory_gb}: vLLM would leave training no room. Use at most "
                f"{budget / 2 / card:.3f}, or rollout.engine native (it sizes its KV cache per step)")

    def rollout(self, rows: list[int], step: int, resample_round: int = 0) -> dict:
        g, rc = self.cfg.grpo.num_generations, self.cfg.rollout
        seed = self.cfg.train.seed * 1_000_003 + step + resample_round * 1_000_000_007  # rounds of dynamic sampling
        params = SamplingParams(max_tokens=rc.max_tokens, temperature=rc.temperature, top_p=rc.top_p,
                                top_k=rc.top_k, n=g, seed=seed,
                                stop_token_ids=stop_tokens(self.cfg, self.policy.model, self.tokenizer))
        self._sync_replica()
        if self.environment is not None:
            return self._rollout_turns(rows, params)
        outs = self.memory.generate(self.engine, [self.prompt_ids[r] for r in rows], params,
                                    prompt_offset=self.rank * len(rows))
        flat = [c for group in outs for c in group]  # (P * G) completions, groups contiguous
        texts = [c.text if c.text is not None else self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                 for c in flat]
        return {
            "rows": [r for r in rows for _ in range(g)],
            "prompt_ids": [self.prompt_ids[r] for r in rows for _ in range(g)],
            "prompts": [self.dataset[r]["prompt"] for r in rows for _ in range(g)],
            "completion_ids": [c.token_ids for c in flat],
            "sampling_logps": [c.logprobs for c in flat],
            "truncated": torch.tensor([c.finish_reason == "length" for c in flat]),
            "texts": texts,
        }

    def _rollout_turns(self, rows: list[int], params: SamplingParams) -> dict:
        """A multi-turn rollout: G conversations per prompt, each with its own environment."""
        g, rc = self.cfg.grpo.num_generations, self.cfg.rollout
        envs, prompts = open_conversations([self.dataset[r] for r in rows], g, self.environment, self.tokenizer,
                                           rc.environment_timeout_s, rc.max_prompt_tokens)
        offset = self.rank * len(prompts)  # each conversation is its own prompt (n = 1)
        # the native engine goes on from each conversation's KV cache; vLLM prefills the conversation again
        with getattr(self.engine, "conversations", nullcontext)():
            convs = run_turns(lambda ids, p: self.memory.generate(self.engine, ids, p, prompt_offset=offset),
                              self.tokenizer, envs, prompts, params, rc.max_turns, rc.environment_timeout_s,
                              eos_token_ids(unwrap(self.policy.model), self.tokenizer))
        for c in convs:
            if c.error:
                log.warning("rollout: %s (that conversation ends there; samples.jsonl records it)", c.error)
        return {
            "rows": [r for r in rows for _ in range(g)],
            "prompt_ids": prompts,
            "prompts": [self.dataset[r]["prompt"] for r in rows for _ in range(g)],
            "completion_ids": [c.token_ids for c in convs],
            "completion_masks": [c.mask for c in convs],
            "sampling_logps": [c.logprobs for c in convs],
            "truncated": torch.tensor([c.finish_reason == "length" for c in convs]),
            "texts": [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in convs],
            "turns": [c.history for c in convs],
            "num_turns": torch.tensor([float(c.turns) for c in convs]),
            "tool_calls": torch.tensor([float(c.tool_calls) for c in convs]),
            "env_errors": [c.error for c in convs],
        }

    def resample(self, step: int, batch: dict, rewards: torch.Tensor) -> tuple[dict, torch.Tensor, dict]:
        """Dynamic sampling (DAPO): a group whose G rewards are all equal has zero advantages and no gradient.
        Such groups are dropped and more prompts drawn from the stream, round after round (each with its own
        sampling seed), until the step has prompts_per_step informative groups or grpo.max_resample_rounds
        extra rounds have run; then the batch is topped up with dropped groups (zero advantage) so that every
        step, and every rank, trains on prompts_per_step groups. Ranks run the same rounds, so the stream stays
        at one position everywhere and a resumed run draws what the uninterrupted one drew. The step's reward
        metrics stay those of its first round, an unbiased view of the policy."""
        g, want = self.cfg.grpo.num_generations, self.cfg.grpo.prompts_per_step
        kept, dropped, rounds, prompts, score_s = [], [], 0, want, 0.0

        def split(b: dict, r: torch.Tensor) -> None:
            flat = r.view(-1, g)
            for i, informative in enumerate((flat.std(dim=1) > 1e-6).tolist()):
                (kept if informative else dropped).append((_rows_of(b, slice(i * g, (i + 1) * g)), flat[i]))

        split(batch, rewards)
        while rounds < self.cfg.grpo.max_resample_rounds and distributed.total(float(len(kept) < want)) > 0:
            rounds += 1
            # every rank draws and generates, full or not: the stream moves alike everywhere, and a sharded
            # run's rollout gathers the weights from every rank
            more = self.rollout(self.take(want), step, resample_round=rounds)
            t = time.perf_counter()
            split(more, self.score(more)[0])
            score_s += time.perf_counter() - t
            prompts += want
        chosen = (kept + dropped)[:want] if len(kept) < want else kept[:want]
        metrics = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/prompts": prompts,
                   "dynamic_sampling/groups_dropped": len(dropped),
                   "dynamic_sampling/groups_filled": max(0, want - len(kept)), "timing/resample_rewards": score_s}
        return _concat_rows([b for b, _ in chosen]), torch.cat([r for _, r in chosen]), metrics

    def _sync_replica(self) -> None:
        """A sharded run's engine generates with a whole copy: it takes the updated weights, gathered."""
        if self.sharded:
            shards = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, mine in self.replica.named_parameters():
                    mine.copy_(distributed.full(shards[name]))

    def evaluate(self) -> dict:
        """The held-out metrics (rl/evaluation.py) through the rollout engine, within the memory budget."""
        t0 = time.perf_counter()
        self._sync_replica()
        metrics = self.evaluation.run(
            lambda ids, params, offset: self.memory.generate(self.engine, ids, params, prompt_offset=offset),
            self.rank, self.world, distributed.gather)
        metrics["timing/eval"] = time.perf_counter() - t0
        return metrics

    def score(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """-> (what the advantages are computed from, reward metrics); the weighted sum of the rewards goes into
        batch["rewards"]. With rewards.normalize per_function, the advantages come from the sum of each
        function's rewards normalized within its group; the metrics stay the raw rewards'."""
        prompts = batch["prompts"]
        completions = [[{"role": "assistant", "content": t}] if is_chat(p) else t
                       for p, t in zip(prompts, batch["texts"])]
        columns = {k: [self.dataset[r][k] for r in batch["rows"]] for k in self.dataset.column_names if k != "prompt"}
        if "turns" in batch:  # multi-turn: each model turn the environment answered
            columns["turns"] = batch["turns"]
        per_fn = self.rewards(prompts, completions, {**columns, "completion_ids": batch["completion_ids"]})
        total = self.rewards.combine(per_fn)  # (N,)
        batch["rewards"], batch["rewards_per_fn"] = total, per_fn
        g = self.cfg.grpo.num_generations
        group_std = total.view(-1, g).std(dim=1)
        metrics = {"reward": total.mean(), "reward_std": group_std.mean(),
                   "frac_reward_zero_std": (group_std < 1e-6).float().mean()}
        for i, name in enumerate(self.rewards.names):
            col = per_fn[:, i]
            metrics[f"rewards/{name}/mean"] = torch.nanmean(col)
            metrics[f"rewards/{name}/std"] = col[~col.isnan()].std() if (~col.isnan()).sum() > 1 else 0.0
        if self.cfg.rewards.normalize == "per_function":
            return self.rewards.combine(normalize_per_function(per_fn, g)), metrics
        return total, metrics

    def update(self, batch: dict, advantages: torch.Tensor) -> dict:
        cfg = self.cfg
        n = len(batch["completion_ids"])
        width = max(max(len(c) for c in batch["completion_ids"]), 1)
        mask = loss_mask(batch, width, cfg.grpo.mask_truncated_completions)  # (N, Tmax)
        sampling = pad_rows(batch["sampling_logps"], width)  # (N, Tmax)
        # the tokens of the whole step, over ranks, divided by the world: DAPO's token mean on each rank is
        # then its share of the step's x world, and the gradients' average over ranks the step's gradient
        num_items = distributed.total(float(mask.sum())) / self.world
        local_items = float(mask.sum())
        # micro-batch and activation policy from the memory budget; a CUDA OOM halves the micro-batch, once
        tokens = max(map(len, batch["prompt_ids"])) + width
        self.memory.plan_training(self.engine, tokens, n, cfg.train.fixed_micro_batch, cfg.model.activation_policy)
        run = self.memory.run_with_backoff
        old = ref = None
        if cfg.grpo.num_iterations > 1:
            old = run("old logps", lambda plan: self._logps_no_grad(batch, plan.micro_batch, width))
        if cfg.grpo.beta > 0:
            with self.model.disable_adapter():
                ref = run("reference logps", lambda plan: self._logps_no_grad(batch, plan.micro_batch, width))

        totals: dict[str, float] = {}
        self.model.train()
        discard = lambda: self.optimizer.zero_grad(set_to_none=True)  # noqa: E731 (a partial accumulation)
        for _ in range(cfg.grpo.num_iterations):
            part = run("train", lambda plan: self._accumulate(batch, plan.micro_batch, advantages, mask, sampling,
                                                              old, ref, num_items), reset=discard)
            for k, v in part.items():
                totals[k] = totals.get(k, 0.0) + v
            grad_norm = self._optimizer_step()
        self.memory.observe_training()
        denom = max(local_items * cfg.grpo.num_iterations, 1.0)
        loss = totals.pop("loss", 0.0)
        out = {k: v / denom for k, v in totals.items()}
        out["loss"] = loss / cfg.grpo.num_iterations
        out["grad_norm"] = grad_norm
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def _accumulate(self, batch: dict, micro_batch: int, advantages, mask, sampling, old, ref,
                    num_items: float) -> dict[str, float]:
        """One pass over the batch in micro-batches, gradients accumulated; -> metric sums weighted by tokens,
        and under "loss" the batch's loss (the micro-batches' losses as scaled for the accumulation, summed)."""
        cfg, device, n = self.cfg, self.policy.device, len(batch["completion_ids"])
        slices = micro_slices(n, micro_batch)
        totals: dict[str, float] = {}
        for s in slices:
            ids, attn, tc = collate(batch["prompt_ids"][s], batch["completion_ids"][s],
                                    self.tokenizer.pad_token_id, device)
            logps, entropy = completion_logps(self.model, ids, attn, tc, cfg.rollout.temperature)
            m = mask[s, :tc].to(device)
            old_s = old[s, :tc].to(device) if old is not None else logps.detach()
            is_w = None
            if cfg.rollout.importance_sampling_cap > 0:
                is_w = torch.exp(old_s - sampling[s, :tc].to(device)).clamp(max=cfg.rollout.importance_sampling_cap)
            g = cfg.grpo
            selected = high_entropy_mask(entropy.detach(), m, g.top_entropy_quantile) \
                if g.top_entropy_quantile < 1 else None
            loss, metrics = grpo_loss(
                logps, old_s, ref[s, :tc].to(device) if ref is not None else None, advantages[s].to(device), m,
                loss_type=g.loss_type, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                beta=g.beta, is_weights=is_w, num_items_in_batch=num_items,
                max_completion_length=cfg.rollout.max_tokens,
                sapo_temperatures=(g.sapo_temperature_pos, g.sapo_temperature_neg), policy_mask=selected,
                entropy=entropy if g.entropy_coef else None, entropy_coef=g.entropy_coef)
            if selected is not None:
                metrics["entropy/selected_fraction"] = (selected * m).sum() / m.sum().clamp(min=1.0)
            scale = self._accumulation_scale(s, n, len(slices))
            (loss * scale).backward()
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * scale
            tokens = float(m.sum())
            metrics["entropy"] = (entropy.detach() * m).sum() / max(tokens, 1.0)
            if is_w is not None:
                metrics["sampling/importance_sampling_ratio/mean"] = (is_w * m).sum() / max(tokens, 1.0)
                metrics["sampling/sampling_logp_difference/mean"] = (
                    (old_s - sampling[s, :tc].to(device)).abs() * m).sum() / max(tokens, 1.0)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * tokens
        return totals

    def _accumulation_scale(self, s: slice, n: int, num_slices: int) -> float:
        """Makes the sum of micro-batch losses equal the loss of the whole batch (TRL's semantics)."""
        loss_type = self.cfg.grpo.loss_type
        if loss_type in ("dapo", "cispo"):
            return 1.0  # already normalized by the whole batch's token count
        if loss_type == "bnpo":
            return 1.0 / num_slices
        return (s.stop - s.start) / n  # per-sequence means: weight by the micro-batch's share of sequences

    def _logps_no_grad(self, batch: dict, micro_batch: int, width: int) -> torch.Tensor:
        n = len(batch["completion_ids"])
        slices = micro_slices(n, micro_batch)
        out = torch.zeros((n, width))
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for s in slices:
                ids, attn, tc = collate(batch["prompt_ids"][s], batch["completion_ids"][s],
                                        self.tokenizer.pad_token_id, self.policy.device)
                out[s, :tc] = completion_logps(self.model, ids, attn, tc, self.cfg.rollout.temperature)[0].cpu()
        self.model.train(was_training)
        return out

    # ------------------------------------------------------------------------------------ metrics

    def _turn_metrics(self, batch: dict) -> dict:
        if "num_turns" not in batch:
            return {}
        return {"env/turns": batch["num_turns"].mean(), "env/tool_calls": batch["tool_calls"].mean(),
                "env/errors": float(sum(e is not None for e in batch["env_errors"]))}

    def _length_metrics(self, batch: dict) -> dict:
        lengths = torch.tensor([len(c) for c in batch["completion_ids"]], dtype=torch.float32)
        truncated = batch["truncated"]
        terminated = lengths[~truncated]
        return {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                "completions/max_length": lengths.max(), "completions/clipped_ratio": truncated.float().mean(),
                "completions/mean_terminated_length": terminated.mean() if terminated.numel() else 0.0}


def loss_mask(batch: dict, width: int, mask_truncated: bool) -> torch.Tensor:
    """(N, width) 1.0 on the tokens the loss counts: each completion's own, not its padding, nor (multi-turn)
    the environment's tokens, nor a truncated completion's when mask_truncated."""
    lengths = torch.tensor([len(c) for c in batch["completion_ids"]])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    if "completion_masks" in batch:
        mask *= pad_rows(batch["completion_masks"], width)
    if mask_truncated:
        mask[batch["truncated"]] = 0.0
    return mask


def _rows_of(batch: dict, rows: slice) -> dict:
    """Rows of a rollout batch (lists and tensors alike)."""
    return {k: v[rows] for k, v in batch.items()}


def _concat_rows(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) if isinstance(batches[0][k], torch.Tensor)
            else [x for b in batches for x in b[k]] for k in batches[0]}
