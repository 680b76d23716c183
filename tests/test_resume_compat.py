"""Resume compatibility: a config that cannot continue the run it resumes (another model, LoRA shape, G,
loss, data, seed) is refused before anything loads, in one message naming each change and the old values;
the changes a run can take (its length, checkpointing, logging) are allowed and logged."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl.config import to_dict
from rl.errors import ConfigError
from rl.trainer import GRPOTrainer
from tests.helpers import run_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 1, "save_every": 1}


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A 1-step run (LoRA r 8, G 4, dapo, arithmetic, seed 0) with its checkpoint."""
    base = tmp_path_factory.mktemp("compat")
    GRPOTrainer(run_config(base, train=TRAIN)).train()
    return base / "run"


def _resume(one_step, tmp_path, **sections):
    shutil.copytree(one_step, tmp_path / "run")
    sections["train"] = {**TRAIN, **sections.get("train", {})}
    return GRPOTrainer(run_config(tmp_path, **sections), resume="latest")


REFUSED = [
    ("model.name", {"model": {"name": "random:tiny-qwen2"}}, "random:tiny -> random:tiny-qwen2", "random:tiny"),
    ("model.load_in_4bit", {"model": {"load_in_4bit": True}}, "false -> true", "false"),
    ("lora.r", {"lora": {"r": 16}}, "8 -> 16", "8"),
    ("lora.alpha", {"lora": {"alpha": 8}}, "32 -> 8", "32"),
    ("lora.target_modules", {"lora": {"target_modules": ["q_proj", "v_proj"]}}, "all-linear -> q_proj,v_proj",
     "all-linear"),
    ("grpo.num_generations", {"grpo": {"num_generations": 2}}, "4 -> 2", "4"),
    ("grpo.loss_type", {"grpo": {"loss_type": "grpo"}}, "dapo -> grpo", "dapo"),
    ("data.task", {"data": {"task": "countdown"}}, "arithmetic -> countdown", "arithmetic"),
    ("data.path", {"data": {"task": None, "path": "prompts.jsonl"}}, "null -> prompts.jsonl", "null"),
    ("data.num_examples", {"data": {"num_examples": 32}}, "16 -> 32", "16"),
    ("train.seed", {"train": {"seed": 1}}, "0 -> 1", "0"),
]


@pytest.mark.parametrize("key,sections,change,old", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_change_that_cannot_continue_the_run_is_refused(one_step, tmp_path, key, sections, change, old):
    with pytest.raises(ConfigError) as caught:
        _resume(one_step, tmp_path, **sections)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{key} {change}" in message and f"--{key} {old}" in message, message
    assert "another train.output_dir" in message


def test_every_change_is_listed_in_one_message(one_step, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.r 8 -> 16; grpo\.num_generations 4 -> 2\. Keep the old values "
                       r"\(--lora\.r 8 --grpo\.num_generations 4\)"):
        _resume(one_step, tmp_path, lora={"r": 16}, grpo={"num_generations": 2})


def test_changes_a_run_can_take_are_allowed_and_logged(one_step, tmp_path, caplog):
    with caplog.at_level("INFO", logger="tandem"):
        trainer = _resume(one_step, tmp_path, train={"max_steps": 2, "save_every": 2, "warmup_steps": 1},
                          tracking={"log_completions_every": 5}, rollout={"temperature": 0.9})
    assert trainer.step == 1
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: changed"))
    for change in ("train.max_steps 1 -> 2", "train.save_every 1 -> 2", "train.warmup_steps 0 -> 1",
                   "tracking.log_completions_every 10 -> 5", "rollout.temperature 1.0 -> 0.9"):
        assert change in line, line
    trainer.train()
    assert trainer.step == 2


def test_lora_rank_change_on_the_command_line_is_one_message(one_step, tmp_path):
    """`--lora.r 16` on a run trained with r 8: one line and exit 2, not PyTorch's size-mismatch dump."""
    shutil.copytree(one_step, tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(run_config(tmp_path, train=TRAIN))))
    result = subprocess.run([sys.executable, "-m", "rl.grpo", "--config", str(config), "--resume", "--lora.r", "16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("rl.grpo: error: --resume: these changes cannot "
                                                             "continue the same run: lora.r 8 -> 16."), result.stderr
    assert "size mismatch" not in result.stderr and "Traceback" not in result.stderr


def test_a_new_learning_rate_takes_effect_on_resume(one_step, tmp_path):
    """The restored optimizer and schedule state would otherwise keep the old rate without a word."""
    trainer = _resume(one_step, tmp_path, train={"learning_rate": 2e-3, "weight_decay": 0.1})
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.scheduler.get_last_lr()[0] == 2e-3
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.1
