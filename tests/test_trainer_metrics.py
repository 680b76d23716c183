"""The trainer's importance-sampling correction and the metrics it reports, against values recomputed here.

One GRPO step on the batch of tests/test_trainer_oracle.py (prompts of different lengths, completions of
different lengths, some stopped and some truncated, micro-batches of 3, 3 and 2), at temperature 0.8, with the
engine's sampling log-probabilities moved by +-0.4 per token so that the importance-sampling weights
exp(old - sampling) are 0.67 and 1.49 and the cap (1.0, the smallest that still turns the correction on)
binds on half the tokens. The gradient, the reported
loss, entropy, the two sampling/* metrics and grad_norm are recomputed one unpadded sequence at a time in fp32.
A second run, two iterations per step, checks that the old log-probabilities are taken at the sampling
temperature (the first pass's ratios are 1) and that the reported loss is the passes' mean.
"""

import json

import pytest
import torch

import rl.trainer
from rl.trainer import GRPOTrainer, _format_option
from tests.helpers import run_config
from tests.reward_fns import token_reward
from tests.test_trainer_oracle import STOP, _hand_advantages, _prompts_of_distinct_lengths

CAP, SHIFT, T = 1.0, 0.4, 0.8


def _config(tmp_path, **grpo):
    return run_config(tmp_path, grpo={"num_generations": 4, "prompts_per_step": 2, "loss_type": "grpo", **grpo},
                      data={"task": None, "path": _prompts_of_distinct_lengths(tmp_path / "prompts.jsonl")},
                      rollout={"max_tokens": 8, "stop_token_ids": STOP, "temperature": T,
                               "importance_sampling_cap": CAP},
                      train={"max_steps": 1, "micro_batch_size": 3, "max_grad_norm": 0.0, "seed": 3})


def _shifted(logps: list[float]) -> list[float]:
    return [x + (SHIFT if j % 2 == 0 else -SHIFT) for j, x in enumerate(logps)]


def test_importance_weights_entropy_and_the_reported_metrics(tmp_path):
    trainer = GRPOTrainer(_config(tmp_path))
    start = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    seen = {}
    update, step = trainer.update, trainer._optimizer_step

    def spy_update(batch, advantages):
        batch = {**batch, "sampling_logps": [_shifted(x) for x in batch["sampling_logps"]]}
        seen["batch"] = batch
        seen["metrics"] = update(batch, advantages)
        return seen["metrics"]

    def spy_step():
        seen["grads"] = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        return step()

    generate = trainer.memory.generate

    def spy_generate(engine, prompts, params, **kw):
        seen["params"] = params
        return generate(engine, prompts, params, **kw)

    trainer.update, trainer._optimizer_step, trainer.memory.generate = spy_update, spy_step, spy_generate
    trainer.train()
    with torch.no_grad():
        for k, p in trainer.model.named_parameters():
            if k in start:
                p.copy_(start[k])
    trainer.model.zero_grad(set_to_none=True)

    batch, metrics = seen["batch"], seen["metrics"]
    # the rollout: sampled as configured (seeded by run seed and step), its completions decoded, and truncated
    # exactly where a completion reached max_tokens without ending on a stop token
    params, eos = seen["params"], trainer.tokenizer.eos_token_id
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.n) == (8, T, 1.0, 0, 4)
    assert params.seed == 3 * 1_000_003 + 1 and params.stop_token_ids == sorted(set(STOP) | {eos})
    completions = batch["completion_ids"]
    assert batch["texts"] == [trainer.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    stops = set(STOP) | {eos}
    assert batch["truncated"].tolist() == [len(c) == 8 and c[-1] not in stops for c in completions]
    advantages = _hand_advantages(batch, 4)
    model = trainer.model
    model.train()
    seq_losses, entropies, weights, diffs = [], [], [], []
    for i, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / T
        logp_all = torch.log_softmax(logits, -1)
        logps = logp_all.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        entropies.append(-(logp_all.exp() * logp_all).sum(-1).detach())
        diff = logps.detach() - torch.tensor(batch["sampling_logps"][i])
        w = torch.exp(diff).clamp(max=CAP)
        weights.append(w)
        diffs.append(diff.abs())
        ratio = torch.exp(logps - logps.detach())  # one iteration: old logps are the detached current ones
        seq_losses.append((-advantages[i] * ratio * w).mean())
    loss = torch.stack(seq_losses).mean()
    loss_value = float(loss.detach())
    loss.backward()
    reference = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert reference.keys() == seen["grads"].keys()
    for k, grad in reference.items():
        torch.testing.assert_close(seen["grads"][k], grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    capped = torch.cat(weights)
    assert 0 < int((capped == CAP).sum()) < capped.numel()  # the cap binds on some tokens, not all

    def token_mean(xs):
        return float(torch.cat(xs).mean())

    close = dict(rel=1e-4, abs=1e-6)
    assert metrics["loss"] == pytest.approx(loss_value, **close)
    assert metrics["entropy"] == pytest.approx(token_mean(entropies), **close)
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(token_mean(weights), **close)
    assert metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(token_mean(diffs), abs=1e-4)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in reference.values()))
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert "kl" not in metrics  # beta 0: no reference pass, no KL metric
    assert metrics["learning_rate"] == pytest.approx(1e-2)

    # what the step wrote: its timings add up (an identity, not a bound), the throughput is the rollout's
    # tokens over the rollout's time, and step 1's samples are the first group's prompts, texts and rewards
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    parts = row["timing/rollout"] + row["timing/rewards"] + row["timing/train"]
    assert row["timing/step"] == pytest.approx(parts, rel=1e-6) and row["timing/rollout"] > 0
    generated = sum(len(c) for c in batch["completion_ids"])
    assert row["throughput/rollout_tokens_per_s"] == pytest.approx(generated / row["timing/rollout"], rel=1e-6)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"], r["completion"]) for r in samples] == [
        (1, str(p), t) for p, t in zip(batch["prompts"][:4], batch["texts"][:4])]
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    truncated = batch["truncated"]
    assert (row["completions/mean_length"], row["completions/min_length"], row["completions/max_length"]) == \
        pytest.approx((float(lengths.mean()), float(lengths.min()), float(lengths.max())))
    assert row["completions/clipped_ratio"] == pytest.approx(float(truncated.float().mean()))
    assert row["completions/mean_terminated_length"] == pytest.approx(float(lengths[~truncated].mean()))
    rewards = torch.tensor(token_reward(None, None, batch["completion_ids"]))
    assert [r["reward"] for r in samples] == pytest.approx(rewards[:4].tolist(), rel=1e-6)
    group_std = rewards.view(-1, 4).std(dim=1)
    assert row["reward"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert row["reward_std"] == pytest.approx(float(group_std.mean()), rel=1e-6)
    assert row["frac_reward_zero_std"] == float((group_std < 1e-6).float().mean())
    assert row["rewards/token_reward/mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert row["rewards/token_reward/std"] == pytest.approx(float(rewards.std()), rel=1e-6)


def test_the_reported_loss_is_the_mean_over_iterations(tmp_path, monkeypatch):
    calls, keywords = [], []
    real = rl.trainer.grpo_loss

    def recorded(logps, old_logps, *args, **kw):
        keywords.append({k: v for k, v in kw.items() if k != "is_weights"})
        loss, metrics = real(logps, old_logps, *args, **kw)
        drift = ((logps - old_logps).detach().abs() * args[2]).max()  # args: ref_logps, advantages, mask
        calls.append({"loss": float(loss.detach()), "drift": float(drift)})
        return loss, metrics

    monkeypatch.setattr(rl.trainer, "grpo_loss", recorded)
    # dapo: each micro-batch's loss scaled by 1; rewards centred in their group, not scaled
    cfg = _config(tmp_path, loss_type="dapo", num_iterations=2, scale_rewards="none", epsilon=0.15,
                  epsilon_high=0.25, beta=0.0)
    trainer = GRPOTrainer(cfg)
    out = {}
    update = trainer.update

    def spy_update(batch, advantages):
        out["batch"], out["advantages"] = batch, advantages.clone()
        out["m"] = update(batch, advantages)
        return out["m"]

    trainer.update = spy_update
    trainer.train()
    rewards = torch.tensor(token_reward(None, None, out["batch"]["completion_ids"])).view(-1, 4)
    torch.testing.assert_close(out["advantages"].float(), (rewards - rewards.mean(1, keepdim=True)).view(-1))
    assert len(calls) == 2 * 3
    tokens = float(sum(len(c) for c, t in zip(out["batch"]["completion_ids"], out["batch"]["truncated"])))
    assert all(kw == {"loss_type": "dapo", "epsilon": 0.15, "epsilon_high": 0.25, "beta": 0.0,
                      "num_items_in_batch": tokens, "max_completion_length": 8, "sapo_temperatures": (1.0, 1.05),
                      "policy_mask": None, "entropy": None, "entropy_coef": 0.0} for kw in keywords), keywords[0]
    # old logps are the policy's before the update, at the sampling temperature: the first pass's ratios are 1
    assert max(c["drift"] for c in calls[:3]) < 1e-5
    assert max(c["drift"] for c in calls[3:]) > 1e-3  # the second pass's: the first pass's update moved the policy
    losses = [c["loss"] for c in calls]
    assert abs(sum(losses[3:])) > 1e-4  # the second pass's loss is not ~0 (its ratios are not 1)
    assert out["m"]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5, abs=1e-8)


def test_format_option():
    assert _format_option("think_answer") == {"format": "think_answer"}
    assert _format_option("boxed") == {"format": "boxed"}
    assert _format_option(r"<a>.*</a>") == {"pattern": r"<a>.*</a>"}


def test_reward_runner_passes_the_run_config_to_every_reward(tmp_path):
    from rewards.sandbox import Limits
    from rl.trainer import reward_runner

    cfg = run_config(tmp_path, rewards={"functions": ["format", "overlong_penalty", "python_tests"],
                                        "weights": [0.5, 2.0, 1.5], "timeout_s": 7.0, "format": "boxed",
                                        "code_timeout_s": 2.5, "code_memory_mb": 300, "code_on_error": "none"},
                     rollout={"max_tokens": 24})
    runner = reward_runner(cfg)
    assert runner.names == ["format", "overlong_penalty", "python_tests"]
    assert runner.weights.tolist() == [0.5, 2.0, 1.5] and runner.timeout_s == 7.0
    assert runner.options == {"format": {"format": "boxed"}, "overlong_penalty": {"max_tokens": 24},
                              "python_tests": {"limits": Limits(wall_s=2.5, cpu_s=3, memory_mb=300),
                                               "on_error": "none"}}
    quick = run_config(tmp_path, rewards={"functions": ["python_tests"], "code_timeout_s": 0.2})
    assert reward_runner(quick).options["python_tests"]["limits"].cpu_s == 1  # at least one CPU second


def test_stop_tokens_add_the_model_and_tokenizer_eos():
    from types import SimpleNamespace

    from rl.trainer import stop_tokens

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=5))
    tokenizer = SimpleNamespace(eos_token_id=7)
    cfg = SimpleNamespace(rollout=SimpleNamespace(stop_token_ids=[9, 3]))
    assert stop_tokens(cfg, model, tokenizer) == [3, 5, 7, 9]
    assert stop_tokens(SimpleNamespace(rollout=SimpleNamespace(stop_token_ids=[])), model, tokenizer) is None


def test_set_up_follows_the_config(tmp_path):
    """The prompt order (seed, shuffle), the schedule's length in optimizer steps and the rollout's row cap."""
    from rl.data import PromptStream

    trainer = GRPOTrainer(run_config(tmp_path / "a", grpo={"num_iterations": 2}, train={"max_steps": 3, "seed": 3},
                                     rollout={"max_rows": 5}))
    assert trainer.total_updates() == 6 and trainer.memory.max_rows == 5
    assert trainer.stream.take(16) == PromptStream(16, 3, True).take(16) != list(range(16))
    plain = GRPOTrainer(run_config(tmp_path / "b", data={"shuffle": False}))
    assert plain.stream.take(16) == list(range(16))


def test_accumulate_weights_metrics_by_tokens_with_a_one_token_micro_batch(tmp_path):
    """_accumulate over micro-batches of one sequence, the first with a single real token: the metric sums it
    returns are token-weighted (a micro-batch's mean times its tokens), so over all tokens they are plain means."""
    from rl.loop import pad_rows

    trainer = GRPOTrainer(_config(tmp_path))
    batch = {"prompt_ids": [[5, 6, 7], [8, 9], [21, 22, 23, 24]], "completion_ids": [[11], [12, 13, 14], [15, 16]]}
    width = 3
    lengths = torch.tensor([1, 3, 2])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        logps = trainer._logps_no_grad(batch, 3, width)
    sampling = pad_rows([[x + 0.3 for x in row[:n]] for row, n in zip(logps.tolist(), [1, 3, 2])], width)
    advantages = torch.tensor([1.0, -0.5, 0.25])
    totals = trainer._accumulate(batch, 1, advantages, mask, sampling, None, None, 6.0)
    trainer.optimizer.zero_grad(set_to_none=True)

    entropies = []
    for p, c in zip(batch["prompt_ids"], batch["completion_ids"]):
        with torch.no_grad():
            logits = trainer.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / T
        logp_all = torch.log_softmax(logits, -1)
        entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    real = mask > 0
    assert totals["entropy"] / 6 == pytest.approx(float(torch.cat(entropies).mean()), rel=1e-4)
    weights = torch.exp(logps - sampling).clamp(max=CAP)[real]
    assert totals["sampling/importance_sampling_ratio/mean"] / 6 == pytest.approx(float(weights.mean()), rel=1e-4)
    assert totals["sampling/sampling_logp_difference/mean"] / 6 == pytest.approx(0.3, rel=1e-3)
