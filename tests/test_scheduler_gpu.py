"""On a CUDA GPU: the memory scheduler against the real allocator.

  - OOM back-off: a micro-batch that does not fit under a cap on the caching allocator (set from the measured
    cost of one sequence, so the test does not depend on the GPU's size) raises a real CUDA OOM; the
    scheduler frees, halves the micro-batch and the retry completes with the batch's gradient (fp32 and bf16,
    within the bound stated above the test).
  - A run with train.gpu_memory_gb on CUDA (`python -m rl.grpo`, its own process: the cap is per process) plans
    within the budget and stays under it; the scheduler takes `torch.device("cuda")` without an index.
  - Rollout under a budget: waves planned from free memory give the same greedy output (fp32) as one batch,
    and the optimizer state waits in pinned host memory during the rollout, back on the GPU for the step.
"""

import json
import subprocess
import sys
from pathlib import Path

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


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# What "the same gradient" means for a backed-off step: the micro-batches of 4 that the retry runs round
# differently from one micro-batch of 8 (other matmul shapes pick other kernels; in bf16 that moves each
# activation by up to a rounding unit), but no more than a clean run with micro-batches of 4 does. So the
# back-off's distance from the one-micro-batch gradient is bounded by the clean run's, plus the dtype's unit
# roundoff for the attention backward's run-to-run noise. A micro-batch of the failed attempt left in .grad,
# or a division by the wrong count, moves a gradient by half its norm or more.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -9}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_real_oom_halves_the_micro_batch_and_the_step_completes(dtype):
    policy = tiny_policy("qwen2.5-0.5b", dtype=dtype)
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

    # reference gradients (one micro-batch of 8; two clean ones of 4), and the cost of one sequence
    memory._apply(TrainPlan(8, "none", 768, True))
    run(memory.plan)
    whole = _grads(model)
    zero()
    run(TrainPlan(4, "none", 768, True))
    halves = _grads(model)
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
    backed_off = _grads(model)
    assert backed_off.keys() == whole.keys() and len(whole) > 100
    error = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))  # noqa: E731
    worst = max(whole, key=lambda n: error(backed_off[n], whole[n]) - error(halves[n], whole[n]))
    print(f"{dtype}: the back-off's gradient is {error(backed_off[worst], whole[worst]):.2e} from one micro-batch's "
          f"(relative, worst tensor), a clean run with micro-batches of 4 {error(halves[worst], whole[worst]):.2e}")
    for name, grad in whole.items():
        assert error(backed_off[name], grad) <= 1.5 * error(halves[name], grad) + UNIT_ROUNDOFF[dtype], name


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


def test_the_budget_takes_a_device_without_an_index():
    memory = MemoryScheduler(torch.device("cuda"), budget_gb=1)  # as resolve_device("auto") makes it
    try:
        assert memory.device.index == torch.cuda.current_device() and memory.budget == 2**30
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2**30, dtype=torch.uint8, device="cuda")  # the whole budget: over it with anything else
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, memory.device)


def test_a_grpo_run_under_a_gpu_memory_budget(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "rl.grpo", "--config", str(root / "examples" / "arithmetic.yaml"),
         "--model.name", "random:qwen2.5-0.5b", "--model.load_in_4bit", "true", "--train.gpu_memory_gb", "4",
         "--train.max_steps", "2", "--train.save_every", "0", "--rollout.max_tokens", "64",
         "--train.output_dir", str(tmp_path / "run"), "--tracking.progress", "false"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["memory/budget_gb"] == 4
        assert 0 < r["memory/rollout_peak_gb"] < 4 and 0 < r["memory/train_peak_gb"] < 4, r
