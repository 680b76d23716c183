"""Bad input through the real command line: one clear message, exit code 2, no traceback unless --debug."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FNS = ROOT / "tests" / "reward_fns.py"

BASE = """
model: {name: "random:tiny"}
rollout: {engine: native, max_tokens: 4, max_prompt_tokens: 256}
grpo: {num_generations: 2, prompts_per_step: 1}
data: {task: arithmetic, num_examples: 4}
rewards: {functions: [math_accuracy]}
train: {max_steps: 1, save_every: 0}
tracking: {progress: false}
"""


def run(tmp_path, *args):
    config = tmp_path / "config.yaml"
    config.write_text(BASE)
    cmd = [sys.executable, "-m", "rl.grpo", "--config", str(config), "--train.output_dir", str(tmp_path / "out"),
           *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def jsonl(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CASES = {
    "unknown config key": (lambda t: ["--train.max_step", "3"],
                           "unknown config key train.max_step; did you mean 'train.max_steps'"),
    "missing dataset column": (lambda t: ["--data.task", "null",
                                          "--data.path", jsonl(t, [{"question": "1+1?", "answer": "2"}])],
                               "no column 'prompt' (its columns: question, answer); set data.prompt_column"),
    "reward raises": (lambda t: ["--rewards.functions", f"{FNS}:raises"], "reward function raises raised KeyError"),
    "reward wrong count": (lambda t: ["--rewards.functions", f"{FNS}:wrong_count"],
                           "returned 2 values for 1 completions"),
    "reward NaN": (lambda t: ["--rewards.functions", f"{FNS}:returns_nan"], "rewards must be finite"),
    "model path missing": (lambda t: ["--model.name", str(t / "no" / "such-model")], "does not exist"),
    "prompt too long": (lambda t: ["--rollout.max_prompt_tokens", "8"], "more than rollout.max_prompt_tokens = 8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message_and_exit_code_2(tmp_path, case):
    make_args, message = CASES[case]
    result = run(tmp_path, *make_args(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("rl.grpo: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run(tmp_path, "--rewards.functions", f"{FNS}:raises", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr and "KeyError" in result.stderr
