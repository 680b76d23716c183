"""The memory scheduler (rollout/scheduler.py) on the CPU: wave plans, the optimizer state's round trip, where
the KV cache goes, the micro-batch plan and the OOM back-off. Its GPU half is tests/test_scheduler_gpu.py."""

import pytest
import torch

from rl.errors import TrainingError
from rl.model import random_config
from rl.trainer import GRPOTrainer
from rollout import NativeEngine, SamplingParams
from rollout.scheduler import ACTIVATIONS, MemoryScheduler, TrainPlan, activation_bytes_per_token, plan_waves
from tests.helpers import run_config, tiny_policy


def _rows(waves):
    return [count * n for _, count, n in waves]


@pytest.mark.parametrize("prompts,n,max_rows", [(3, 2, 2), (5, 4, 8), (2, 8, 4), (3, 8, 3), (4, 2, 64), (1, 1, 1)])
def test_waves_cover_every_sample_once_within_the_cap(prompts, n, max_rows):
    waves = plan_waves(prompts, n, max_rows)
    assert all(r <= max_rows for r in _rows(waves))
    samples = [0] * prompts
    for first, count, k in waves:
        for p in range(first, first + count):
            samples[p] += k
    assert samples == [n] * prompts
    if n <= max_rows:  # whole groups: no prompt's samples are split
        assert all(k == n for _, _, k in waves)
        assert len(waves) == -(-prompts // (max_rows // n))
    else:
        assert len(waves) == prompts * -(-n // max_rows)


def test_waves_refuse_a_zero_cap():
    with pytest.raises(ValueError, match="max_rows"):
        plan_waves(2, 2, 0)


def test_activation_estimate_orders_the_policies():
    cfg = random_config("llama-3.1-8b")
    none, ckpt, off = (activation_bytes_per_token(cfg, m, 2) for m in ACTIVATIONS)
    assert none > ckpt > off > 0
    # checkpointing keeps one hidden state per layer and token beyond the offloaded plan
    assert ckpt - off == cfg.num_hidden_layers * cfg.hidden_size * 2


# ------------------------------------------------------------------------------------ rollout in waves


def test_waves_give_the_single_batch_greedy_output():
    policy = tiny_policy()
    engine = NativeEngine(policy.model, policy.tokenizer, cuda_graphs=False)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = SamplingParams(max_tokens=6, temperature=0.0, n=2)
    whole = engine.generate(prompts, params)
    for cap, waves in ((2, 3), (1, 6)):
        memory = MemoryScheduler(torch.device("cpu"), max_rows=cap)
        got = memory.generate(engine, prompts, params)
        assert memory.last_waves == waves
        assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in whole]
        for g, w in zip(got, whole):
            for a, b in zip(g, w):
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_without_a_gpu_host_memory_bounds_the_waves(monkeypatch):
    """No budget and no max_rows on the CPU: a rollout that fits in half the available host memory runs whole
    (as before), a larger one (a held-out evaluation of hundreds of prompts x n samples) in waves that fit."""
    import rollout.scheduler as scheduler

    rows = scheduler._host_rows(1 << 20)  # MiB rows: this machine's half of its available memory, a power of 2
    assert rows >= 1 and rows & (rows - 1) == 0
    policy = tiny_policy()
    engine = NativeEngine(policy.model, policy.tokenizer, cuda_graphs=False)
    prompts, params = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], SamplingParams(max_tokens=6, temperature=0.0, n=2)
    whole = engine.generate(prompts, params)
    seen = []
    monkeypatch.setattr(scheduler, "_host_rows", lambda row_bytes: seen.append(row_bytes) or 2)
    memory = MemoryScheduler(torch.device("cpu"))
    got = memory.generate(engine, prompts, params)
    assert memory.last_waves == 3 and seen == [engine.bytes_per_row(engine.rollout_length(4, 6))]
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in whole]
    monkeypatch.setattr(scheduler, "_host_rows", lambda row_bytes: 8)  # fits: one call, as without the check
    memory.generate(engine, prompts, params)
    assert memory.last_waves == 1


def test_sampled_waves_are_reproducible_and_seeded_apart():
    policy = tiny_policy()
    engine = NativeEngine(policy.model, policy.tokenizer, cuda_graphs=False)
    params = SamplingParams(max_tokens=6, temperature=1.0, n=4, seed=3)
    memory = MemoryScheduler(torch.device("cpu"), max_rows=2)  # one prompt's 4 samples in two waves
    first = [c.token_ids for c in memory.generate(engine, [[5, 6, 7]], params)[0]]
    again = [c.token_ids for c in memory.generate(engine, [[5, 6, 7]], params)[0]]
    assert first == again and len(first) == 4
    assert first[:2] != first[2:]  # the second wave is not the first one's draws again


# ------------------------------------------------------------------------------------ optimizer state


def _train_steps(offload: bool, steps: int = 3):
    torch.manual_seed(0)
    policy = tiny_policy()
    model = policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    memory = MemoryScheduler(torch.device("cpu"), offload_optimizer=offload)
    memory.attach(model, optimizer)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    placements = []
    for _ in range(steps):
        if offload:
            memory.offload_optimizer()  # what a rollout does first
            placements.append([state["exp_avg"] is memory._host[(id(p), "exp_avg")]
                               for p, state in optimizer.state.items()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        memory.before_optimizer_step()
        if offload and optimizer.state:
            assert all(state["exp_avg"] is not memory._host[(id(p), "exp_avg")]
                       for p, state in optimizer.state.items())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, placements


def test_optimizer_state_round_trip_trains_exactly_as_without_one():
    plain, _ = _train_steps(offload=False)
    moved, placements = _train_steps(offload=True)
    assert placements[0] == []  # no state before the first step
    assert all(placements[1]) and all(placements[2]) and placements[1]  # then every moment went to the host copy
    for name in plain:
        assert torch.equal(plain[name], moved[name]), name


def test_grpo_run_with_the_optimizer_moved_every_rollout_equals_one_without(tmp_path):
    results = []
    for offload in (False, True):
        trainer = GRPOTrainer(run_config(tmp_path / str(offload), train={"max_steps": 3}))
        trainer.memory.offload_optimizer_setting = offload
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


# ------------------------------------------------------------------------------------ the training plan


def _budgeted(policy, budget_bytes, margin=0):
    memory = MemoryScheduler(torch.device("cpu"), margin_gb=margin)
    memory.budget = budget_bytes  # the arithmetic of a budget, on a machine without one (nothing is allocated)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    memory.attach(policy.model, torch.optim.AdamW(params))
    return memory


def test_training_keeps_the_kv_cache_when_it_fits_beside_and_releases_it_when_not():
    policy = tiny_policy()
    engine = NativeEngine(policy.model, policy.tokenizer, cuda_graphs=False)
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, n=4))
    held = engine.held_bytes()
    assert held > 0 and engine.state is not None
    probe = _budgeted(policy, 0)
    tokens = max(1, int(held // (4 * probe.bytes_per_token("none"))))  # one sequence: about a quarter of the KV
    per_sequence = tokens * probe.bytes_per_token("none")
    fixed = probe._fixed_bytes(tokens)

    roomy = _budgeted(policy, int(fixed + 4 * per_sequence + held + 1))
    plan = roomy.plan_training(engine, tokens, sequences=4)
    assert (plan.micro_batch, plan.activations) == (4, "none") and engine.state is not None

    tight = _budgeted(policy, int(fixed + per_sequence / 2))  # no sequence fits unless the KV cache goes
    plan = tight.plan_training(engine, tokens, sequences=4)
    assert plan.micro_batch == 4 and engine.state is None and engine.held_bytes() == 0


def test_a_fixed_micro_batch_is_kept_and_cpu_auto_is_eight():
    policy = tiny_policy()
    memory = MemoryScheduler(torch.device("cpu"))
    memory.attach(policy.model, None)
    assert memory.plan_training(None, 32, sequences=20).micro_batch == 8
    assert memory.plan_training(None, 32, sequences=3).micro_batch == 3
    assert memory.plan_training(None, 32, sequences=20, micro_batch=5).micro_batch == 5


# ------------------------------------------------------------------------------------ OOM back-off


def _with_plan(micro_batch, activations="none", fixed_activations=False):
    policy = tiny_policy()
    memory = MemoryScheduler(torch.device("cpu"))
    memory.attach(policy.model, None)
    memory.plan = TrainPlan(micro_batch, activations, 100, fixed_activations)
    return memory


def _needs_at_most(limit, calls):
    """A phase that runs out of memory above `limit` sequences per micro-batch, as the allocator would."""
    def run(plan):
        calls.append(plan)
        if plan.micro_batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return plan.micro_batch
    return run


def test_oom_halves_the_micro_batch_and_retries_once():
    memory, calls, resets = _with_plan(8), [], []
    assert memory.run_with_backoff("train", _needs_at_most(4, calls), reset=lambda: resets.append(1)) == 4
    assert [c.micro_batch for c in calls] == [8, 4] and resets == [1] and memory.backoffs == 1
    assert memory.plan.micro_batch == 4  # the rest of the step, and later steps, keep the smaller plan


def test_a_second_oom_fails_with_what_would_fit():
    memory, calls = _with_plan(8), []
    with pytest.raises(TrainingError, match=r"micro-batches of 8 \(none\) and of 4 \(none\).*No update was applied"):
        memory.run_with_backoff("train", _needs_at_most(1, calls))
    assert len(calls) == 2  # one retry, not a search


def test_at_one_sequence_the_back_off_moves_to_the_next_activation_policy():
    memory, calls = _with_plan(1), []

    def run(plan):
        calls.append(plan.activations)
        if plan.activations == "none":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return plan.activations

    assert memory.run_with_backoff("train", run) == "checkpoint"
    assert calls == ["none", "checkpoint"]
    assert memory.plan.activations == "checkpoint"
    fixed = _with_plan(1, fixed_activations=True)
    with pytest.raises(TrainingError, match="micro-batches of 1 \\(none\\), sequences of up to 100 tokens"):
        fixed.run_with_backoff("train", run)


def test_grpo_step_in_waves_and_auto_micro_batch_reports_its_plan(tmp_path):
    trainer = GRPOTrainer(run_config(tmp_path, train={"max_steps": 1, "micro_batch_size": "auto"}))
    trainer.memory.max_rows = 2  # 2 prompts x 4 samples: a group's samples split over 4 waves
    metrics = trainer.train_step(1)
    assert metrics["rollout/waves"] == 4
    assert metrics["memory/micro_batch_size"] == 8 and metrics["memory/activation_policy"] == 0
    assert metrics["memory/oom_backoffs"] == 0 and metrics["loss"] == metrics["loss"]  # a finite step ran


def test_the_activation_policies_give_the_same_gradients():
    """Checkpointing recomputes a layer's forward in its backward; it must not change what is computed."""
    from rollout.scheduler import set_activations

    policy = tiny_policy()
    model = policy.model
    model.train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ACTIVATIONS:
        set_activations(model, mode)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["none"]
    for mode in ACTIVATIONS[1:]:
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=0, atol=0)


def test_gradients_moved_out_mid_accumulation_come_back_summed():
    policy = tiny_policy()
    model = policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    memory = MemoryScheduler(torch.device("cpu"), offload_optimizer=True)
    memory.attach(model, torch.optim.AdamW(params))
    a, b = (torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    for ids in (a, b):
        model(input_ids=ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    model(input_ids=a, labels=a).loss.backward()
    memory.offload_optimizer()
    assert all(p.grad is None for p in params)  # parked on the host, off the parameters
    model(input_ids=b, labels=b).loss.backward()
    memory.before_optimizer_step()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


class _SmallCard(NativeEngine):
    """The native engine on a card that holds `limit` rows: a larger batch raises the allocator's error."""
    limit = 4

    def generate(self, prompts, params, refresh_weights=True):
        if len(prompts) * params.n > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return super().generate(prompts, params, refresh_weights)


def test_rollout_oom_halves_the_wave_and_retries_once():
    policy = tiny_policy()
    engine = _SmallCard(policy.model, policy.tokenizer, cuda_graphs=False)
    prompts, params = [[5, 6, 7], [8, 9], [10, 11, 12]], SamplingParams(max_tokens=5, temperature=0.0, n=4)
    whole = NativeEngine(policy.model, policy.tokenizer, cuda_graphs=False).generate(prompts, params)
    memory = MemoryScheduler(torch.device("cpu"), max_rows=8)  # 8-row waves: too many for this card
    got = memory.generate(engine, prompts, params)
    assert memory.backoffs == 1 and memory.last_waves == 3
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in whole]
    engine.limit = 1
    with pytest.raises(TrainingError, match="rollout: out of GPU memory with waves of 4 rows.*rollout.max_tokens"):
        MemoryScheduler(torch.device("cpu"), max_rows=8).generate(engine, prompts, params)
    # a budget with room for far more rows than the batch has (a large card, shared with other processes): the
    # retry halves the 12 rows that ran, not the thousands planned for (which would run all 12 again)
    engine.limit = 8
    roomy = MemoryScheduler(torch.device("cpu"))
    roomy.budget = 64 * 2**30  # as on a card: free() is the budget less what is allocated
    got = roomy.generate(engine, prompts, params)
    assert roomy.backoffs == 1 and roomy.last_rows == 6 and roomy.last_waves == 3
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in whole]
