"""The recipes in examples/ run end to end as a user runs them, with a tiny random model of the same family in
place of the real one (the hub is out of reach here) and a small file in the dataset's own format."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gsm8k_recipe_runs_end_to_end(tmp_path):
    """examples/gsm8k.yaml as written (QLoRA, the three reward functions and their weights, the think/answer
    format, held-out evaluation, the best checkpoint, a 16 GiB budget where there is a GPU), on a random
    Qwen2-family model and 20 GSM8K-format rows (tests/data/gsm8k_sample.jsonl: questions, worked answers
    ending in "#### N"); only the model, the data file, the sizes and the output directory are overridden."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl.grpo", "--config", "examples/gsm8k.yaml",
           "--model.name", "random:tiny-qwen2", "--data.path", "tests/data/gsm8k_sample.jsonl", "--data.name", "null",
           "--eval.split", "4", "--eval.every", "1", "--eval.n", "2", "--rollout.max_tokens", "12",
           "--rollout.engine", "native", "--grpo.num_generations", "2", "--grpo.prompts_per_step", "2",
           "--train.max_steps", "2", "--train.save_every", "1", "--train.num_threads", "2",
           "--tracking.tensorboard", "false", "--tracking.progress", "false", "--train.output_dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4-bit NF4 base (QLoRA)" in done.stderr and "data     16 rows" in done.stderr  # 20 rows, 4 held out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    names = ("math_accuracy", "format", "answer_is_a_number")
    assert all(f"rewards/{n}/mean" in r for r in train for n in names)
    evals = [r for r in rows if "eval/greedy_pass@1" in r]
    assert len(evals) >= 2 and all(0 <= r["eval/greedy_pass@1"] <= 1 and "eval/pass@2" in r for r in evals)
    assert (out / "adapter").is_dir() and (out / "checkpoints" / "best").is_dir()


def test_the_calculator_recipe_runs_end_to_end(tmp_path):
    """examples/calculator.yaml as written (the calculator environment, three turns), on a random Llama-family
    model: multi-turn rollouts, their metrics and samples. Only the model, the sizes and the output change."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl.grpo", "--config", "examples/calculator.yaml", "--model.name", "random:tiny",
           "--rollout.max_tokens", "16", "--grpo.num_generations", "2", "--train.max_steps", "2",
           "--train.save_every", "0", "--train.num_threads", "2", "--tracking.log_completions_every", "1",
           "--tracking.progress", "false", "--tracking.report", "false", "--train.output_dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "multi-turn with rollout.tools:Calculator (up to 3 model turns" in done.stderr  # the start-up summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["env/turns"] >= 1 and "env/tool_calls" in r for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all("turns" in s and "tool_calls" in s for s in samples)


def test_the_calculator_warm_start_then_grpo_with_the_tool(tmp_path):
    """examples/calculator_sft.yaml as written (data.task calculator, merged at the end), on a random Llama-family
    model, then examples/calculator.yaml from the merged model, as the recipe's two commands say."""
    sft = tmp_path / "sft"
    cmd = [sys.executable, "-m", "rl.sft", "--config", "examples/calculator_sft.yaml", "--model.name", "random:tiny",
           "--data.num_examples", "8", "--train.max_steps", "2", "--train.num_threads", "2",
           "--tracking.progress", "false", "--tracking.report", "false", "--train.output_dir", str(sft)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sft / "merged" / "config.json").is_file()
    out = tmp_path / "grpo"
    cmd = [sys.executable, "-m", "rl.grpo", "--config", "examples/calculator.yaml", "--model.name", str(sft / "merged"),
           "--rollout.max_tokens", "16", "--grpo.num_generations", "2", "--train.max_steps", "1",
           "--train.save_every", "0", "--train.num_threads", "2", "--tracking.progress", "false",
           "--tracking.report", "false", "--train.output_dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "env/tool_calls" in rows[0]
