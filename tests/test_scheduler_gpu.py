"""On a CUDA GPU: the memory scheduler against the real allocator.

  - OOM back-off: a micro-batch that does not fit under a cap on the caching allocator (set from the measured
    cost of one sequence, so the test does not depend on the GPU's size) raises a real CUDA OOM; the
    scheduler frees, halves the micro-batch and the retry completes with gradients equal to an uncapped run.
  - Rollout under a budget: waves planned from free memory give the same greedy output (fp32) as one batch,
    and the optimizer state waits in pinned host memory during the rollout, back on the GPU for the step.
"""

import pytest
import torch

from rl.logprobs import completion_logps
from rollout import NativeEngine, SamplingParams
from rollout.scheduler import MemoryScheduler, TrainPlan
from tests.helpers import tiny_policy

pytestmark = pytest.mark.gpu


def _accumulate(model, ids, mask, completion):
    """A loss over all sequences in micro-batches of plan.micro_batch, gradients accumulated."""
    def run(plan):
        for i in range(0, ids.shape[0], plan.micro_batch):
            logps, _ = completion_logps(model, ids[i:i + plan.micro_batch], mask[i:i + plan.micro_batch], completion)
            (-logps.sum() / ids.shape[0]).backward()
        return plan.micro_batch
    return run


def test_a_real_oom_halves_the_micro_batch_and_the_step_completes():
    policy = tiny_policy("qwen2.5-0.5b", dtype="bfloat16")
    model, device = policy.model, policy.device
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (8, 768), generator=g).to(device)
    mask = torch.ones_like(ids)
    memory = MemoryScheduler(device)
    params = [p for p in model.parameters() if p.requires_grad]
    memory.attach(model, torch.optim.AdamW(params))
    run = _accumulate(model, ids, mask, 512)
    zero = lambda: model.zero_grad(set_to_none=True)  # noqa: E731

    # reference gradients, and the cost of one sequence
    memory._apply(TrainPlan(8, "none", 768, True))
    run(memory.plan)
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    zero()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(TrainPlan(1, "none", 768, True))
    per_sequence = torch.cuda.max_memory_reserved(device) - base
    zero()
    torch.cuda.empty_cache()

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(device) + 6 * per_sequence) / total, device)
    try:
        memory.plan = TrainPlan(8, "none", 768, True)  # 8 sequences need ~8 units; the cap leaves 6
        assert memory.run_with_backoff("train", run, reset=zero) == 4
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert memory.backoffs == 1 and memory.plan.micro_batch == 4
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=2e-2, atol=1e-3)


def test_rollout_in_waves_under_a_budget_with_the_optimizer_state_on_the_host():
    policy = tiny_policy("qwen2.5-0.5b")  # fp32: one batch and waves must agree token for token
    model, device = policy.model, policy.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 1000, (2, 32), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if t.dim() > 0)

    engine = NativeEngine(policy.model, policy.tokenizer, merge_lora=False)
    prompts = [list(range(100, 120)), list(range(300, 310)), list(range(500, 530))]
    params_ = SamplingParams(max_tokens=32, temperature=0, n=4, stop_token_ids=[])
    whole = engine.generate(prompts, params_)
    engine.release()
    torch.cuda.empty_cache()

    memory = MemoryScheduler(device, margin_gb=0)
    memory.attach(model, optimizer)
    row = engine.bytes_per_row(engine.rollout_length(30, 32))
    # room for 4 rows of KV once the optimizer state is gone: 12 rows need 3 waves, and the move is needed
    memory.budget = torch.cuda.memory_allocated(device) - state_bytes + 4 * row + row // 2
    got = memory.generate(engine, prompts, params_)
    assert memory.last_waves == 3
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in whole]
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k == "exp_avg"]
    assert moments and all(t.device.type == "cpu" and t.is_pinned() for t in moments)
    memory.before_optimizer_step()
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k == "exp_avg"]
    assert all(t.device == device for t in moments)
