"""Held-out evaluation: greedy pass@1 and pass@k of the policy on prompts it never trains on.

    train_ds, eval_ds = eval_datasets(cfg)                          # the eval prompts held out of the training data
    evaluation = Evaluation(cfg, eval_ds, tokenizer, rewards)       # rewards: the run's RewardRunner
    metrics = evaluation.run(generate)                              # {"eval/greedy_pass@1": ..., "eval/pass@8": ...}

`generate(prompt_ids, params, offset)` is the run's rollout engine (through the memory scheduler in training,
rl/trainer.py; the same in `python -m rl.evaluate`), so an evaluation costs two rollouts, not a second model.
Each prompt gets one greedy completion and `eval.n` samples at `eval.temperature`. A completion is correct when
the reward function named by `eval.correct` (default: the first of rewards.functions) scores it at least
`eval.threshold` (default 1.0: math_accuracy's and countdown's "right"); a score of None (the function does not
apply to the row) is not correct. Reported:
  eval/greedy_pass@1      the fraction of prompts whose greedy completion is correct
  eval/pass@k             for each k of eval.k (default 1 and n): the unbiased estimator of Chen et al. (2021),
                          1 - C(n-c, k) / C(n, k) for a prompt with c correct of n samples, averaged over prompts
  eval/reward, eval/rewards/<fn>/mean, eval/greedy_mean_length, eval/prompts   of the greedy completions
The samples' seed is the same at every evaluation (common random numbers: the curve moves with the policy,
not with the draw) and is the train.seed's, so `rl.evaluate` on the final adapter repeats the last evaluation.

Under torchrun each rank evaluates its contiguous share of the prompts and the per-prompt counts are gathered,
so every rank reports the same metrics.

Held out, by default, are `eval.split` of the training rows (a fraction, or a count), chosen by a seeded
permutation of its own; training rows whose prompt equals a held-out prompt leave the training set too (the
built-in arithmetic task repeats its 441 sums over 2000 rows: held-out rows alone would still be trained on).
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from rl.data import is_chat, load_dataset, tokenize_all
from rl.errors import DataError
from rollout import SamplingParams

EVAL_SEED = 1_000_033  # added to train.seed: the samples' seed, apart from every rollout's


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, of which c are correct,
    is correct: 1 - C(n-c, k) / C(n, k) (unbiased for the pass@k of the policy)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ------------------------------------------------------------------------------------ the prompts


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def hold_out(ds, split: float, seed: int):
    """(training rows, held-out rows) of a datasets.Dataset: `split` distinct prompts (a fraction < 1 of the rows,
    or a count) held out, and every row with a held-out prompt removed from training."""
    want = max(1, round(split * len(ds))) if split < 1 else int(split)
    prompts = [_key(p) for p in ds["prompt"]]
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + EVAL_SEED)).tolist()
    held, seen = [], set()
    for i in order:
        if len(held) == want:
            break
        if prompts[i] not in seen:
            seen.add(prompts[i])
            held.append(i)
    train = [i for i, p in enumerate(prompts) if p not in seen]
    if not train:
        raise DataError(f"eval.split {split:g} holds out all {len(seen)} distinct prompts of the dataset, leaving "
                        "none to train on; lower eval.split, or give a separate eval.data")
    return ds.select(train), ds.select(held)


def eval_datasets(cfg):
    """(training dataset, eval dataset or None) of a GRPO run: eval.data, or eval.split held out of data."""
    train = load_dataset(cfg.data, cfg.train.seed)
    ev = cfg.eval
    if not ev.every:
        return train, None
    if ev.data is not None:
        source = dataclasses.replace(cfg.data, task=None, path=ev.data, split=ev.data_split)
        return train, load_dataset(source, cfg.train.seed)
    return hold_out(train, ev.split, cfg.train.seed)


# ------------------------------------------------------------------------------------ the evaluation


class Evaluation:
    """The eval prompts of a run, tokenized once, and how to score completions of them."""

    def __init__(self, cfg, dataset, tokenizer, rewards, stop_token_ids: list[int] | None = None,
                 seed: int | None = None):
        self.ev, self.dataset, self.tokenizer, self.rewards = cfg.eval, dataset, tokenizer, rewards
        self.prompt_ids = tokenize_all(dataset, tokenizer, cfg.data, cfg.rollout.max_prompt_tokens)
        self.scorer = cfg.eval.scorer(cfg.rewards.functions)  # a column of the rewards, or None: their sum
        max_tokens = cfg.eval.max_tokens or cfg.rollout.max_tokens
        self.greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, n=1, stop_token_ids=stop_token_ids)
        self.sampled = SamplingParams(max_tokens=max_tokens, temperature=cfg.eval.temperature, n=max(cfg.eval.n, 1),
                                      stop_token_ids=stop_token_ids,
                                      seed=(cfg.train.seed if seed is None else seed) + EVAL_SEED)

    def due(self, step: int, last: int) -> bool:
        return bool(self.ev.every) and (step % self.ev.every == 0 or step == last)

    def run(self, generate, rank: int = 0, world: int = 1, gather=lambda t: t) -> dict[str, float]:
        """generate(prompt_ids, params, offset) -> completions per prompt (the engine's); gather: the per-prompt
        rows of every rank (rl/distributed.py's gather under torchrun)."""
        size = len(self.prompt_ids)
        share = math.ceil(size / world)
        rows = list(range(rank * share, min(size, (rank + 1) * share)))
        # (share, [valid, greedy ok, c, length, rewards...]); float64: the means are exact fractions of counts
        stats = torch.zeros((share, 4 + len(self.rewards.names)), dtype=torch.float64)
        if rows:
            stats[:len(rows)] = self._stats(rows, generate)
        return self.summarize(gather(stats))

    def _stats(self, rows: list[int], generate) -> torch.Tensor:
        """Per prompt of `rows`: 1, greedy correct (0/1), correct samples c, greedy length, greedy rewards."""
        ids = [self.prompt_ids[r] for r in rows]
        greedy = [g[0] for g in generate(ids, self.greedy, rows[0])]
        n = self.ev.n
        sampled = [c for group in generate(ids, self.sampled, rows[0]) for c in group] if n else []
        per_fn = self.score(rows + [r for r in rows for _ in range(n)], greedy + sampled)  # (P + P*n, F)
        ok = self.correct(per_fn)
        p = len(rows)
        greedy_ok, samples_ok = ok[:p].float(), ok[p:].view(p, n).sum(dim=1).float() if n else torch.zeros(p)
        lengths = torch.tensor([len(c.token_ids) for c in greedy], dtype=torch.float32)
        return torch.cat([torch.stack([torch.ones(p), greedy_ok, samples_ok, lengths], dim=1), per_fn[:p]],
                         dim=1).double()

    def score(self, rows: list[int], completions: list) -> torch.Tensor:
        """The run's reward functions on completions of the eval rows, as in training -> (N, F), NaN = None."""
        texts = [c.text if c.text is not None else self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                 for c in completions]
        prompts = [self.dataset[r]["prompt"] for r in rows]
        wrapped = [[{"role": "assistant", "content": t}] if is_chat(p) else t for p, t in zip(prompts, texts)]
        columns = {k: [self.dataset[r][k] for r in rows] for k in self.dataset.column_names if k != "prompt"}
        return self.rewards(prompts, wrapped, {**columns, "completion_ids": [c.token_ids for c in completions]})

    def correct(self, per_fn: torch.Tensor) -> torch.Tensor:
        """(N, F) rewards -> (N,) bool: the chosen function's score (or the weighted sum) >= eval.threshold.
        NaN (the function does not apply) compares False: not correct."""
        score = self.rewards.combine(per_fn) if self.scorer is None else per_fn[:, self.scorer]
        return score >= self.ev.threshold

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        """The metrics from every prompt's row of _stats (padding rows, valid 0, left out)."""
        stats = stats[stats[:, 0] > 0]
        n = self.ev.n
        out = {"eval/greedy_pass@1": float(stats[:, 1].mean())}
        for k in self.ev.ks:
            out[f"eval/pass@{k}"] = sum(pass_at_k(n, int(c), k) for c in stats[:, 2].tolist()) / len(stats)
        per_fn = stats[:, 4:]
        out["eval/reward"] = float(torch.nansum(per_fn * self.rewards.weights.double(), dim=1).mean())
        for i, name in enumerate(self.rewards.names):
            out[f"eval/rewards/{name}/mean"] = float(torch.nanmean(per_fn[:, i]))
        out["eval/greedy_mean_length"] = float(stats[:, 3].mean())
        out["eval/prompts"] = len(stats)
        return out
