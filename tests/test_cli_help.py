"""`--help` of the training commands lists every config section and key with its default and what the schema says
of it (rl/cli.py's config_help, read from rl/config.py itself), so a newcomer need not open the source."""

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rl.cli import config_help, parse_args
from rl.config import GRPORunConfig, OfflineRunConfig, _one_of, load_config

ROOT = Path(__file__).resolve().parents[1]


def keys_shown(text: str) -> dict[str, str]:
    """{section.key: the default as shown} from the help's key lines."""
    return dict(re.findall(r"^  --(\w+\.\w+) (.*)$", text, re.MULTILINE))


def help_of(prog: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse_args(prog, ["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def all_keys(schema) -> list[str]:
    defaults = schema()
    return [f"{s.name}.{k.name}" for s in dataclasses.fields(schema)
            for k in dataclasses.fields(getattr(defaults, s.name))]


def test_grpo_help_lists_every_key_with_its_default_and_comment():
    done = subprocess.run([sys.executable, "-m", "rl.grpo", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    shown = keys_shown(done.stdout)
    assert list(shown) == all_keys(GRPORunConfig)  # every key, in the schema's order, and nothing else
    assert shown["rollout.engine"] == "auto" and shown["train.max_steps"] == "100"
    assert shown["rewards.functions"] == "[math_accuracy, format]" and shown["model.tokenizer"] == "null"
    assert shown["data.task"] == "arithmetic"  # the run's default (GRPORunConfig's data), not DataSection's None
    # the comment beside a field, and the comment lines above one, wrapped under it
    assert re.search(r"--rollout.engine auto\n +auto \(vLLM when installed, else native\) \| native \| vllm\n",
                     done.stdout)
    assert re.search(r"--rollout.importance_sampling_cap 2.0\n +Truncated importance sampling: .*\n +correct for",
                     done.stdout)
    assert re.search(r"--grpo.loss_type dapo\n +grpo \| bnpo \| dr_grpo \| dapo \| gspo \| cispo \| sapo "
                     r"\(rl/objectives.py\)\n", done.stdout)


def test_every_default_shown_reads_back_as_the_default():
    """Each default as shown, given back as --section.key value, is the default: the help writes values as a user
    would type them (null, true, lists, 1e-05)."""
    text = config_help(GRPORunConfig)
    defaults = GRPORunConfig()
    for dotted, shown in keys_shown(text).items():
        if dotted == "data.path":  # any data.path given, even null, replaces the default data.task (build_config)
            continue
        section, key = dotted.split(".")
        cfg = load_config(None, [f"--{dotted}", shown])
        assert getattr(getattr(cfg, section), key) == getattr(getattr(defaults, section), key), dotted


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "sft"])
def test_offline_help_lists_their_schema(objective, capsys):
    text = help_of(f"rl.{objective}", capsys)
    shown = keys_shown(text)
    assert list(shown) == all_keys(OfflineRunConfig)
    assert "objective.loss_type" in shown and not any(k.startswith(("rollout.", "grpo.")) for k in shown)
    assert "dpo: sigmoid | ipo | hinge | robust" in text
    assert "Columns, by objective: dpo / orpo: prompt, chosen, rejected" in text  # the section's docstring


@dataclass
class _Section:
    mode: str = "a"  # how it runs
    level: int = 1

    def __post_init__(self):
        _one_of("demo", "mode", self.mode, ("a", "b", "c"))


@dataclass
class _Schema:
    demo: _Section = field(default_factory=_Section)


def test_choices_checked_in_post_init_are_listed_when_the_comment_omits_them():
    text = config_help(_Schema)
    assert re.search(r"--demo.mode a\n +how it runs; one of: a \| b \| c\n  --demo.level 1$", text)


def test_generate_help(capsys):
    from rl.generate import parse_args as generate_args

    with pytest.raises(SystemExit):
        generate_args("rl.generate", ["--help"])
    text = capsys.readouterr().out
    assert "--prompts FILE" in text and "--no-compare" in text and "--max-tokens" in text
