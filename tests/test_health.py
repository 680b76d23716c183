"""rl/health.py on hand-made metric sequences: which warnings a run's metrics call for, when, and only once; the
start-up summary and the closing lines built from configs and directories made here."""

import math

import torch

from rl.config import GRPORunConfig, OfflineRunConfig, build_config
from rl.health import ENTROPY_FLOOR, HealthMonitor, closing_lines, diagnose, hints, startup_summary, value

HINTS = {"max_tokens": 64, "temperature": 0.7, "beta": 0.0}


def healthy(**changes) -> dict:
    """One GRPO step's metrics as a healthy run writes them (two reward functions), with `changes`."""
    row = {"reward": 0.4, "reward_std": 0.3, "frac_reward_zero_std": 0.25, "loss": 0.012, "grad_norm": 0.31,
           "entropy": 1.2, "completions/clipped_ratio": 0.1, "rewards/math_accuracy/mean": 0.3,
           "rewards/math_accuracy/std": 0.45, "rewards/format/mean": 0.1, "rewards/format/std": 0.3}
    row.update(changes)
    return row


def said(rows: list[dict]) -> list[tuple[int, str]]:
    """(step, warning) for every warning a monitor gives over the rows, in order."""
    monitor = HealthMonitor(HINTS)
    return [(step, w) for step, row in enumerate(rows, 1) for w in monitor.observe(step, row)]


def test_a_healthy_run_gets_no_warning():
    assert said([healthy() for _ in range(30)]) == []


def test_rewards_that_never_vary_say_no_learning_signal_once_by_step_3():
    flat = healthy(frac_reward_zero_std=1.0, reward_std=0.0, loss=0.0, grad_norm=0.0, **{
        "rewards/math_accuracy/std": 0.0, "rewards/math_accuracy/mean": 0.0, "rewards/format/std": 0.2})
    out = [(step, w) for step, w in said([flat] * 12) if "no learning signal" in w]
    assert [step for step, _ in out] == [3]
    message = out[0][1]
    assert message.startswith("step 3: ")
    for part in ("frac_reward_zero_std 1", "make the reward vary", "rollout.temperature (now 0.7)",
                 "check the reward function"):
        assert part in message.lower(), part
    # the zero loss and gradient follow from it: said once, with its cause, not twice
    assert not any("nothing is being learned" in w for _, w in said([flat] * 12))


def test_a_streak_broken_by_one_varied_step_starts_again():
    flat, varied = healthy(frac_reward_zero_std=1.0), healthy(frac_reward_zero_std=0.5)
    assert said([flat, flat, varied, flat, flat, varied]) == []
    assert [step for step, _ in said([flat, flat, varied, flat, flat, flat])] == [6]


def test_zero_loss_and_gradient_are_reported_for_any_objective():
    sft = [{"loss": 0.0, "grad_norm": 0.0, "learning_rate": 1e-5, "num_tokens": 0.0}] * 4
    out = said(sft)
    assert [step for step, _ in out] == [3]
    assert "loss and the gradient norm have been 0" in out[0][1]
    assert said([{"loss": 0.0, "grad_norm": 0.2}] * 5) == []  # a zero loss with a gradient is learning


def test_every_completion_truncated_names_rollout_max_tokens():
    out = said([healthy(**{"completions/clipped_ratio": 1.0})] * 4)
    assert [step for step, _ in out] == [3]
    assert "raise rollout.max_tokens" in out[0][1].lower() and "(now 64)" in out[0][1]
    assert said([healthy(**{"completions/clipped_ratio": 0.95})] * 4) == []


def test_a_collapsing_entropy_names_beta_and_temperature():
    rows = [healthy(entropy=e) for e in (0.8, 0.3, 0.04, 0.02, 0.01, 0.01)]
    out = said(rows)
    assert [step for step, _ in out] == [5]
    assert "grpo.beta (now 0)" in out[0][1] and "rollout.temperature (now 0.7)" in out[0][1]
    assert said([healthy(entropy=ENTROPY_FLOOR * 1.5)] * 6) == []


def test_a_reward_function_flat_since_the_start_is_named_at_step_5():
    rows = [healthy(**{"rewards/format/std": 0.0, "rewards/format/mean": 0.0}) for _ in range(8)]
    out = said(rows)
    assert [step for step, _ in out] == [5]
    assert "reward function format" in out[0][1] and "same score (0)" in out[0][1]
    assert "math_accuracy" not in out[0][1]


def test_a_reward_function_that_varied_once_is_not_flat():
    rows = [healthy(**{"rewards/format/std": 0.0}) for _ in range(8)]
    rows[1]["rewards/format/std"] = 0.1
    assert said(rows) == []


def test_a_reward_function_that_saturates_later_in_a_long_run_is_not_flat():
    """The monitor keeps only the last few rows: that the function varied at step 1 must not be forgotten."""
    rows = [healthy()] + [healthy(**{"rewards/format/std": 0.0, "rewards/format/mean": 1.0}) for _ in range(30)]
    assert said(rows) == []


def test_a_late_streak_in_a_long_run_is_reported_at_its_third_step():
    rows = [healthy() for _ in range(40)] + [healthy(**{"completions/clipped_ratio": 1.0}) for _ in range(5)]
    assert [step for step, _ in said(rows)] == [43]


def test_a_reward_function_that_never_applies_is_named():
    rows = [healthy(**{"rewards/format/std": None, "rewards/format/mean": None}) for _ in range(5)]
    assert "None (not applicable)" in said(rows)[0][1]


def test_metrics_as_the_loop_holds_them():
    """Tensors, NaN and missing keys, as the trainer's metric dicts have them before tracking cleans them."""
    assert value({"x": torch.tensor(0.5)}, "x") == 0.5
    assert value({"x": math.nan}, "x") is None and value({}, "x") is None
    rows = [{"frac_reward_zero_std": torch.tensor(1.0), "loss": torch.tensor(0.0), "grad_norm": 0.0}] * 3
    assert list(diagnose(rows)) == ["no_signal"]


def test_hints_come_from_grpo_configs_only():
    grpo = build_config(GRPORunConfig, {"rollout": {"max_tokens": 32, "temperature": 0.9}, "grpo": {"beta": 0.04}})
    assert hints(grpo) == {"max_tokens": 32, "temperature": 0.9, "beta": 0.04}
    assert hints(build_config(OfflineRunConfig, {})) == {"max_tokens": None, "temperature": None, "beta": None}


# ------------------------------------------------------------------------------------ start and end


def test_the_startup_summary_of_a_grpo_run_on_the_cpu(tmp_path):
    cfg = build_config(GRPORunConfig, {"model": {"name": "random:tiny"}, "lora": {"r": 8},
                                       "rollout": {"max_tokens": 16}, "grpo": {"prompts_per_step": 2,
                                                                               "num_generations": 4},
                                       "data": {"num_examples": 16},
                                       "train": {"max_steps": 2, "output_dir": str(tmp_path / "run")}})
    text = "\n".join(startup_summary(cfg, module="rl.grpo", start_step=0, world=1, device="cpu", dtype="float32",
                                     threads=2, engine="native (rollout.engine native)", budget_gb=None,
                                     card_gb=None, margin_gb=0.5, rows=16))
    for part in ("rl.grpo: steps 1-2", "random:tiny, float32 (not 4-bit)", "LoRA r 8", "engine   native "
                 "(rollout.engine native)", "cpu, 2 CPU threads", "no GPU budget", "16 rows (task arithmetic)",
                 "2 prompts x 4 completions of at most 16 tokens", f"{tmp_path / 'run'}/: metrics.jsonl",
                 "adapter/ at the end"):
        assert part in text, part


def test_the_startup_summary_of_a_resumed_offline_run_with_a_budget(tmp_path):
    cfg = build_config(OfflineRunConfig, {"model": {"name": "Qwen/Qwen2.5-1.5B-Instruct", "load_in_4bit": True},
                                          "train": {"max_steps": 50, "gpu_memory_gb": 15.0, "save_every": 10,
                                                    "output_dir": str(tmp_path)}})
    text = "\n".join(startup_summary(cfg, module="rl.dpo", start_step=20, world=1, device="cuda:0", dtype="bfloat16",
                                     threads=16, engine=None, budget_gb=15.0, card_gb=139.8, margin_gb=0.75,
                                     rows=256))
    for part in ("rl.dpo: steps 21-50 (resumed at step 20)", "4-bit NF4 base (QLoRA), computing in bfloat16",
                 "budget 15.0 GiB of the card's 139.8 GiB (train.gpu_memory_gb 15.0), margin 0.8 GiB",
                 "checkpoints/ every 10 steps"):
        assert part in text, part
    assert "engine" not in text and "CPU thread" not in text


def test_closing_lines_name_what_is_on_disk_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    cfg = build_config(GRPORunConfig, {"model": {"name": "smollm2-135m-instruct"},
                                       "train": {"max_steps": 3, "output_dir": str(out)}})
    for d in ("adapter", "merged", "checkpoints/step-000003"):
        (out / d).mkdir(parents=True)
    (out / "checkpoints/step-000003/COMPLETE").write_text("3")
    (out / "metrics.jsonl").write_text("{}\n")
    text = "\n".join(closing_lines(cfg, module="rl.grpo", step=3, world=1))
    for part in (f"adapter  {out / 'adapter'}  (LoRA adapter, on base model smollm2-135m-instruct)",
                 f"merged   {out / 'merged'}", f"metrics  {out / 'metrics.jsonl'}", f"python -m rl.plot {out}",
                 f"python -m rl.grpo --config {out / 'config.yaml'} --resume --train.max_steps 6"):
        assert part in text, part
    assert "samples" not in text  # not written: not named
    assert f"python -m rl.generate {out}" in text and f"python -m rl.evaluate {out} --data" in text
    assert "best " not in text  # no best checkpoint on disk
    (out / "checkpoints/best/step-000002").mkdir(parents=True)
    (out / "checkpoints/best/step-000002/COMPLETE").write_text("2")
    cfg = build_config(GRPORunConfig, {"model": {"name": "smollm2-135m-instruct"},
                                       "train": {"max_steps": 3, "output_dir": str(out)},
                                       "eval": {"every": 1, "best_metric": "eval/greedy_pass@1"}})
    text = "\n".join(closing_lines(cfg, module="rl.grpo", step=3, world=1))
    assert f"best     {out / 'checkpoints/best/step-000002'}  (the best checkpoint by eval/greedy_pass@1)" in text
    two = "\n".join(closing_lines(cfg, module="rl.grpo", step=3, world=2))
    assert "torchrun --nproc_per_node 2 -m rl.grpo --config" in two


def test_closing_lines_without_a_checkpoint_say_the_run_cannot_be_resumed(tmp_path):
    cfg = build_config(OfflineRunConfig, {"lora": {"enabled": False}, "train": {"output_dir": str(tmp_path),
                                                                               "save_every": 0}})
    (tmp_path / "model").mkdir()
    text = "\n".join(closing_lines(cfg, module="rl.sft", step=100, world=1))
    assert f"model    {tmp_path / 'model'}  (the whole trained model)" in text
    assert "not possible: no checkpoint was kept (train.save_every 0)" in text and "--resume" not in text
    assert f"python -m rl.generate {tmp_path}" in text and "rl.evaluate" not in text  # SFT has no rewards
