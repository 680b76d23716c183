"""Built-in rewards on a table of cases (malformed answers included), the loader, and the runner's checks."""

import math

import pytest
import torch

from rewards import RewardRunner, load_reward
from rewards.builtin import countdown, format, math_accuracy, overlong_penalty
from rl.errors import RewardError

HERE = __file__.rsplit("/", 1)[0]

MATH_CASES = [
    # (completion, gold, expected)
    ("The answer is \\boxed{19}.", "19", 1.0),
    ("7 + 12 = 19", "19", 1.0),  # plain number at the end
    ("\\boxed{19.0}", "19", 1.0),
    ("\\boxed{20}", "19", 0.0),
    ("I think 20, no wait, 19", "19", 1.0),  # the last answer counts
    ("\\boxed{1/2}", "0.5", 1.0),
    ("The result is \\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("Natalia sold 72 clips in all.", "She sold 48/2 = 24 in May.\n#### 72", 1.0),  # GSM8K gold
    ("The total is 1,234.", "#### 1,234", 1.0),
    ("banana", "19", 0.0),  # no number at all
    ("", "19", 0.0),
    ("\\boxed{", "19", 0.0),  # malformed LaTeX
    ("\\boxed{}", "19", 0.0),
    ("}}}{{{ \\frac{", "19", 0.0),
    ("\\boxed{19}", "", None),  # no gold answer: not applicable
]


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_accuracy(completion, gold, expected):
    assert math_accuracy(None, [completion], answer=[gold]) == [expected]


def test_math_accuracy_reads_chat_completions_and_solution_column():
    chat = [[{"role": "assistant", "content": "so \\boxed{4}"}]]
    assert math_accuracy(None, chat, solution=["4"]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        math_accuracy(None, ["4"])


FORMAT_CASES = [
    ("<think>add them</think> <answer>19</answer>", "think_answer", 1.0),
    ("<think>add them</think>\n<answer>19</answer>\n", "think_answer", 1.0),
    ("<answer>19</answer>", "think_answer", 0.0),
    ("<think>unclosed <answer>19</answer>", "think_answer", 0.0),
    ("<think>a</think> <answer>19</answer> trailing", "think_answer", 0.0),
    ("so it is \\boxed{19}.", "boxed", 1.0),
    ("\\boxed{}", "boxed", 0.0),
    ("19", "boxed", 0.0),
]


@pytest.mark.parametrize("completion,kind,expected", FORMAT_CASES)
def test_format(completion, kind, expected):
    assert format(None, [completion], format=kind) == [expected]


def test_format_with_a_custom_regex():
    assert format(None, ["Answer: 19", "19"], pattern=r"^Answer: \d+$") == [1.0, 0.0]


def test_overlong_penalty():
    ids = [[0] * n for n in (10, 192, 224, 256)]
    assert overlong_penalty(None, [""] * 4, completion_ids=ids, max_tokens=256, buffer=64) == [0.0, 0.0, -0.5, -1.0]


COUNTDOWN_CASES = [
    ("<think>..</think><answer>(3 + 5) * 2</answer>", 1.0),
    ("<answer>3 * 2 + 5 = 11</answer>", 0.0),  # = 11, not 16
    ("<answer>(3 + 5) * 2 * 2</answer>", 0.0),  # 2 used twice
    ("<answer>__import__('os')</answer>", 0.0),  # not arithmetic: refused, never evaluated
    ("<answer>(3 + 5) / (2 - 2)</answer>", 0.0),  # division by zero
    ("(3 + 5) * 2", 0.0),  # no answer tags
    ("<answer>(3 + 5 * 2</answer>", 0.0),  # syntax error
]


@pytest.mark.parametrize("completion,expected", COUNTDOWN_CASES)
def test_countdown(completion, expected):
    assert countdown(None, [completion], numbers=[[3, 5, 2]], target=[16]) == [expected]


def test_loader_forms():
    assert load_reward("math_accuracy") is math_accuracy
    assert load_reward("rewards.builtin:countdown") is countdown
    assert load_reward(f"{HERE}/reward_fns.py:token_reward").__name__ == "token_reward"
    with pytest.raises(RewardError, match="did you mean 'math_accuracy'"):
        load_reward("math_acuracy")
    with pytest.raises(RewardError, match="does not exist"):
        load_reward("no/such/file.py:fn")
    with pytest.raises(RewardError, match="has no function 'nope'"):
        load_reward(f"{HERE}/reward_fns.py:nope")
    with pytest.raises(RewardError, match="cannot import module"):
        load_reward("no_such_module_xyz:fn")


def test_runner_combines_weighted_rewards_and_skips_none():
    runner = RewardRunner(["math_accuracy", "format"], weights=[1.0, 0.5], options={"format": {"format": "boxed"}})
    per_fn = runner(["q"] * 3, ["\\boxed{4}", "4", "x"], {"answer": ["4", "4", ""]})
    assert per_fn.shape == (3, 2)
    assert math.isnan(per_fn[2, 0])  # no gold answer -> None -> NaN
    torch.testing.assert_close(runner.combine(per_fn), torch.tensor([1.5, 1.0, 0.0]))


@pytest.mark.parametrize("fn,message", [
    ("raises", "raised KeyError"),
    ("wrong_count", "returned 4 values for 3 completions"),
    ("returns_nan", "must be finite"),
])
def test_runner_rejects_misbehaving_functions(fn, message):
    runner = RewardRunner([f"{HERE}/reward_fns.py:{fn}"])
    with pytest.raises(RewardError, match=message):
        runner(["q"] * 3, ["a", "b", "c"], {})


def test_runner_timeout():
    """The message names the function, the limit and the fix (it said "raise the limit" without naming the key's
    override)."""
    runner = RewardRunner([f"{HERE}/reward_fns.py:sleeps"], timeout_s=0.5)
    with pytest.raises(RewardError, match=r"reward function sleeps did not return within rewards.timeout_s = 0.5 s "
                       r".*the run stops.*--rewards.timeout_s 1\b"):
        runner(["q"], ["a"], {})


def test_a_reward_that_hangs_stops_the_run_at_once(tmp_path):
    """`python -m rl.grpo` with a reward that does not return: one message and exit 2, and the process does not
    wait for the hung call (a pool's worker thread kept the stopped process alive until the function returned:
    here it would have written its marker file; forever for a function that never returns)."""
    import subprocess
    import sys
    from pathlib import Path

    marker = tmp_path / "returned"
    (tmp_path / "hangs.py").write_text(
        "import time\n\n"
        "def hangs(prompts, completions, **kwargs):\n"
        "    time.sleep(60)\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    return [0.0 for _ in completions]\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {name: 'random:tiny'}\n"
        "rollout: {engine: native, max_tokens: 4}\n"
        "grpo: {num_generations: 2, prompts_per_step: 1}\n"
        "data: {task: arithmetic, num_examples: 4}\n"
        f"rewards: {{functions: ['{tmp_path / 'hangs.py'}:hangs'], timeout_s: 0.5}}\n"
        f"train: {{max_steps: 1, num_threads: 1, output_dir: '{tmp_path / 'run'}'}}\n"
        "tracking: {progress: false}\n")
    done = subprocess.run([sys.executable, "-m", "rl.grpo", "--config", str(config)], capture_output=True, text=True,
                          cwd=Path(HERE).parent, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "rl.grpo: error: reward function hangs did not return within rewards.timeout_s = 0.5 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()  # the process ended without waiting for the call


def test_runner_passes_only_accepted_columns():
    def strict(prompts, completions, answer):
        return [float(a == c) for a, c in zip(answer, completions)]

    runner = RewardRunner(["math_accuracy"])
    runner.fns, runner.names = [strict], ["strict"]
    out = runner(["q", "q"], ["1", "2"], {"answer": ["1", "1"], "other": [0, 0]})
    assert out[:, 0].tolist() == [1.0, 0.0]
