"""Issue 23, "a newcomer's first hour": what a new user meets first, tried as they would try it.

Points 3-5 (each test failed before its fix): a `rewards.format` regex reaches the format reward as its pattern;
with vLLM installed, a model vLLM cannot run makes `rollout.engine auto` fall back to the native engine with its
reason and `rollout.engine vllm` stop with one message (exit 2); `train.max_skipped_steps 0` and
`train.num_threads -3` are refused with a message naming the key. Then a run that says how it is doing (rl/health.py
through rl/loop.py): the start-up summary, the closing lines and their resume command, and the no-learning warning
of a run whose rewards never vary; and an adapter whose config names the user's model, not a cache path.

Runs of `python -m rl.grpo` are subprocesses, as a user starts them, on the tiny random model with the native
engine and completions of a few tokens.
"""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_config

ROOT = Path(__file__).resolve().parents[1]
FNS = ROOT / "tests" / "reward_fns.py"


def grpo(tmp_path, *args, rewards=f"{FNS}:token_reward", steps=2):
    """`python -m rl.grpo` on a small config written here, with `args` as overrides."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {name: 'random:tiny'}\n"
        "lora: {r: 8}\n"
        "rollout: {engine: native, max_tokens: 4, max_prompt_tokens: 128}\n"
        "grpo: {num_generations: 2, prompts_per_step: 2}\n"
        "data: {task: arithmetic, num_examples: 8}\n"
        f"rewards: {{functions: ['{rewards}']}}\n"
        f"train: {{max_steps: {steps}, save_every: 2, num_threads: 1, output_dir: '{tmp_path / 'run'}'}}\n"
        "tracking: {progress: false}\n")
    return subprocess.run([sys.executable, "-m", "rl.grpo", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def steps_written(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ point 3: rewards.format


def test_a_format_regex_reaches_the_format_reward(tmp_path):
    """A regex in rewards.format gets past start-up (it stopped there: "unknown format") and the format reward
    scores every completion of the run by it."""
    from rl.trainer import GRPOTrainer

    pattern = "[aeiou]{2}"
    trainer = GRPOTrainer(run_config(tmp_path, rewards={"functions": ["format"], "format": pattern},
                                     train={"max_steps": 1}))
    scores = trainer.rewards(["q", "q", "q"], ["the rain", "xyz", [{"role": "assistant", "content": "a boat"}]],
                             {"completion_ids": [[], [], []]})
    assert scores[:, 0].tolist() == [1.0, 0.0, 1.0]
    trainer.train()
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        assert s["reward"] == (1.0 if re.search(pattern, s["completion"], re.DOTALL) else 0.0), s


# ------------------------------------------------------------------------------------ point 4: vLLM start-up


def _vllm_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if torch.cuda.is_available():
        return "on a GPU vLLM may run random:tiny; these tests need a model that vLLM cannot run (its CPU build)"
    from rollout.vllm_engine import unsupported_reason

    return unsupported_reason()


needs_vllm = pytest.mark.skipif(_vllm_skip_reason() is not None, reason=str(_vllm_skip_reason()))


@pytest.mark.vllm
@needs_vllm
def test_auto_falls_back_to_native_for_a_model_vllm_cannot_run(tmp_path):
    """vLLM 0.32's CPU attention has no kernels for random:tiny's head size: its start-up check fails, the
    reason is logged, the run goes on with the native engine, and nothing raises on the way out (vLLM's exit
    hook found its process group destroyed and printed a traceback)."""
    result = grpo(tmp_path, "--rollout.engine", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = re.search(r"^rollout engine: native \((.+)\)$", result.stderr, re.MULTILINE)
    assert chosen and "vLLM" in chosen.group(1), result.stderr[-3000:]
    assert f"engine   native ({chosen.group(1)})" in result.stderr  # the summary says it again
    assert "Traceback" not in result.stderr
    assert steps_written(tmp_path / "run") == [1, 2]


@pytest.mark.vllm
@needs_vllm
def test_vllm_requested_for_a_model_it_cannot_run_stops_with_one_message(tmp_path):
    result = grpo(tmp_path, "--rollout.engine", "vllm")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("rl.grpo: error:")]
    assert len(errors) == 1 and "rollout.engine is vllm, but" in errors[0] and "rollout.engine native" in errors[0]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ point 5: config checks


@pytest.mark.parametrize("key,value", [("train.max_skipped_steps", "0"), ("train.num_threads", "-3")])
def test_a_bad_train_setting_is_refused_by_name(tmp_path, key, value):
    result = grpo(tmp_path, f"--{key}", value)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("rl.grpo: error:")]
    assert len(errors) == 1 and f"{key} is {value}" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ a run that says how it does


def test_a_two_step_run_says_what_it_does_where_its_results_are_and_how_to_resume(tmp_path):
    result = grpo(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out, run = result.stderr, tmp_path / "run"
    summary = out.index("rl.grpo: steps 1-2")
    for part in ("model    random:tiny, float32 (not 4-bit); training LoRA r 8", "engine   native (rollout.engine "
                 "native)", "device   cpu", "memory   no GPU budget", "data     8 rows (task arithmetic)",
                 f"outputs  {run}/: metrics.jsonl"):
        assert part in out[summary:], part
    closing = out.index("rl.grpo: done, 2 steps")
    assert closing > summary
    for part in (f"adapter  {run / 'adapter'}", f"metrics  {run / 'metrics.jsonl'}",
                 f"samples  {run / 'samples.jsonl'}", f"python -m rl.plot {run}"):
        assert part in out[closing:], part
    assert "WARNING" not in out and "no learning signal" not in out  # token_reward varies

    # the resume line, run as printed, continues the run from its step-2 checkpoint to step 4
    command = re.search(r"^  resume   (python -m rl\.grpo .+?)  \(", out, re.MULTILINE).group(1)
    assert command == f"python -m rl.grpo --config {run / 'config.yaml'} --resume --train.max_steps 4"
    argv = shlex.split(command)
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rl.grpo: steps 3-4 (resumed at step 2)" in resumed.stderr
    assert steps_written(run) == [1, 2, 3, 4]


def test_a_run_whose_rewards_never_vary_says_so_within_5_steps(tmp_path):
    result = grpo(tmp_path, rewards=f"{FNS}:constant", steps=5)
    assert result.returncode == 0, result.stderr[-3000:]
    warned = re.findall(r"^step (\d+): no learning signal: (.*)$", result.stderr, re.MULTILINE)
    assert len(warned) == 1, result.stderr[-3000:]  # once, not every step
    step, message = int(warned[0][0]), warned[0][1]
    assert step <= 5
    assert "frac_reward_zero_std 1" in message and "rollout.temperature" in message
    assert "reward function constant has given every completion the same score (0.5)" in result.stderr


# ------------------------------------------------------------------------------------ the adapter's base model


@pytest.mark.parametrize("model", ["random:tiny", "smollm2-135m-instruct"])
def test_the_adapter_names_the_users_model_not_a_cache_path(tmp_path, model):
    """PEFT writes the directory the base was loaded from (smollm2: the GGUF conversion in the cache) or
    nothing (a random model built in memory); the adapter and its checkpoints name model.name instead."""
    from rl.trainer import GRPOTrainer

    GRPOTrainer(run_config(tmp_path, model={"name": model}, rollout={"max_tokens": 2},
                           grpo={"num_generations": 2, "prompts_per_step": 1},
                           train={"max_steps": 1, "save_every": 1})).train()
    run = tmp_path / "run"
    for saved in (run / "adapter", run / "checkpoints" / "step-000001"):
        config = json.loads((saved / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == model, saved
