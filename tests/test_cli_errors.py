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


def txt(t):
    path = t / "data.txt"
    path.write_text("What is 1 + 1?\n")
    return str(path)


def previous_run(t):
    """An output directory that already holds a run: it must come out byte for byte unchanged."""
    out = t / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return []


DATA = ["--data.task", "null", "--data.path"]
CASES = {  # name: (extra arguments, made in the test's directory; the message's telling part)
    # configuration
    "unknown config key": (lambda t: ["--train.max_step", "3"],
                           "unknown config key train.max_step; did you mean 'train.max_steps'"),
    "unknown config section": (lambda t: ["--grpoo.beta", "0.1"], "unknown config section 'grpoo'; did you mean"),
    "not an integer": (lambda t: ["--train.max_steps", "abc"], "train.max_steps must be an integer, got 'abc'"),
    "not a boolean": (lambda t: ["--model.load_in_4bit", "maybe"], "model.load_in_4bit must be true or false"),
    "zero steps": (lambda t: ["--train.max_steps", "0"], "train.max_steps is 0; use a positive step count"),
    "negative learning rate": (lambda t: ["--train.learning_rate", "-1"], "use a positive value such as 1e-5"),
    "unknown loss type": (lambda t: ["--grpo.loss_type", "foo"], "grpo.loss_type is 'foo'; choose one of: grpo"),
    "temperature zero": (lambda t: ["--rollout.temperature", "0"], "GRPO needs sampling, use a temperature > 0"),
    "top_p above one": (lambda t: ["--rollout.top_p", "1.5"], "rollout.top_p is 1.5; use a value in (0, 1]"),
    "LoRA rank zero": (lambda t: ["--lora.r", "0"], "the LoRA rank must be a positive integer"),
    "one completion per prompt": (lambda t: ["--grpo.num_generations", "1"], "need at least 2 completions"),
    "unknown engine": (lambda t: ["--rollout.engine", "foo"], "rollout.engine is 'foo'; choose one of: auto"),
    "unknown dtype": (lambda t: ["--model.dtype", "float8"], "model.dtype is 'float8'; choose one of"),
    "unknown scheduler": (lambda t: ["--train.lr_scheduler", "foo"], "train.lr_scheduler is 'foo'"),
    "micro-batch zero": (lambda t: ["--train.micro_batch_size", "0"],
                         "train.micro_batch_size is 0; use auto or an integer >= 1"),
    "negative grad norm": (lambda t: ["--train.max_grad_norm", "-1"], "train.max_grad_norm is -1.0"),
    "negative IS cap": (lambda t: ["--rollout.importance_sampling_cap", "-1"], "use 0 (off) or e.g. 2.0"),
    "full-parameter 4-bit": (lambda t: ["--lora.enabled", "false", "--model.load_in_4bit", "true"],
                             "a 4-bit base cannot be trained"),
    "full-parameter KL": (lambda t: ["--lora.enabled", "false", "--grpo.beta", "0.1"],
                          "the KL term needs the reference policy"),
    "full-parameter vLLM": (lambda t: ["--lora.enabled", "false", "--rollout.engine", "vllm"],
                            "the vLLM engine updates LoRA adapters, not full weights"),
    "vLLM memory share": (lambda t: ["--rollout.vllm_gpu_memory_utilization", "1.5"], "use a fraction in (0, 1)"),
    "task and path both": (lambda t: ["--data.path", txt(t)], "add --data.task null"),
    "bad format regex": (lambda t: ["--rewards.format", "(unclosed"], "nor a valid regular expression"),
    # dataset
    "missing dataset column": (lambda t: DATA + [jsonl(t, [{"question": "1+1?", "answer": "2"}])],
                               "no column 'prompt' (its columns: question, answer); set data.prompt_column"),
    "dataset file missing": (lambda t: DATA + [str(t / "nope.jsonl")], "does not exist; check the path"),
    "unsupported file type": (lambda t: DATA + [txt(t)], "unsupported file type; use .jsonl, .json, .parquet"),
    "empty dataset": (lambda t: DATA + [jsonl(t, [])], "is an empty file; it needs one row per example"),
    "prompt not text": (lambda t: DATA + [jsonl(t, [{"prompt": 5}])], "row 0: the prompt must be text or a list"),
    "unknown task": (lambda t: ["--data.task", "foo"], "data.task is 'foo'; choose one of: arithmetic, countdown"),
    "prompt too long": (lambda t: ["--rollout.max_prompt_tokens", "8"], "more than rollout.max_prompt_tokens = 8"),
    # model
    "model path missing": (lambda t: ["--model.name", str(t / "no" / "such-model")], "does not exist"),
    "unknown random shape": (lambda t: ["--model.name", "random:giant"], "unknown random shape 'giant'"),
    "GGUF file missing": (lambda t: ["--model.name", str(t / "m.gguf")], "GGUF file not found; check the path"),
    "tokenizer path missing": (lambda t: ["--model.tokenizer", str(t / "tok")], "tok does not exist; set it to a"),
    # rewards
    "reward raises": (lambda t: ["--rewards.functions", f"{FNS}:raises"], "reward function raises raised KeyError"),
    "reward wrong count": (lambda t: ["--rewards.functions", f"{FNS}:wrong_count"],
                           "returned 2 values for 1 completions"),
    "reward NaN": (lambda t: ["--rewards.functions", f"{FNS}:returns_nan"], "rewards must be finite"),
    "unknown built-in reward": (lambda t: ["--rewards.functions", "nosuch"], "unknown reward 'nosuch'; use a built-in"),
    "reward file missing": (lambda t: ["--rewards.functions", f"{t}/x.py:fn"], "x.py does not exist; check the path"),
    "reward function missing": (lambda t: ["--rewards.functions", f"{FNS}:nosuch"], "has no function 'nosuch'"),
    "reward weights count": (lambda t: ["--rewards.weights", "[1, 2]"], "rewards.weights has 2 values for 1 functions"),
    # command line and run directory
    "resume without checkpoint": (lambda t: ["--resume"], "--resume: no complete checkpoint under"),
    "resume from a non-checkpoint": (lambda t: ["--resume", str(t)], "not a complete checkpoint directory"),
    "output dir holds a run": (previous_run, "already holds a run; pass --resume to continue it"),
}


def _snapshot(out):
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_process(tmp_path, case, capsys):
    """The same table in this process (fast): exit 2, one message, nothing written in train.output_dir."""
    from rl import grpo
    from rl.cli import run_cli

    make_args, message = CASES[case]
    args = make_args(tmp_path)
    before = _snapshot(tmp_path / "out")
    config = tmp_path / "config.yaml"
    config.write_text(BASE)
    code = run_cli("rl.grpo", grpo.main, ["--config", str(config), "--train.output_dir", str(tmp_path / "out"),
                                          *args])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("rl.grpo: error:")]
    assert code == 2 and len(error_lines) == 1 and message in error_lines[0], err[-2000:]
    assert "Traceback" not in err
    assert _snapshot(tmp_path / "out") == before  # nothing written, nothing written over


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


SUBPROCESS_CASES = ["unknown config key", "missing dataset column", "reward raises", "model path missing"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_gives_one_clear_message_and_exit_code_2(tmp_path, case):
    """A few of the table through a real `python -m rl.grpo` process."""
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
