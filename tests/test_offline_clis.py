"""`python -m rl.dpo | rl.orpo | rl.kto | rl.sft`: 3 steps each on a tiny model and a dataset made here,
with metrics under TRL's names, checkpoints, the adapter, and a resume that continues."""

import json

import pytest

from rl.cli import run_cli

ROWS = {
    "dpo": lambda i: {"prompt": f"What is {i} + 2?", "chosen": f"It is {i + 2}.", "rejected": f"It is {i + 5}."},
    "kto": lambda i: {"prompt": f"What is {i} + 2?", "completion": f"It is {i + 2 + i % 2}.", "label": i % 2 == 0},
    "sft": lambda i: {"messages": [{"role": "user", "content": f"What is {i} + 2?"},
                                   {"role": "assistant", "content": f"It is {i + 2}."}]},
}
ROWS["orpo"] = ROWS["dpo"]
KEYS = {"dpo": ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"],
        "orpo": ["rewards/margins", "nll_loss", "log_odds_ratio", "log_odds_chosen"],
        "kto": ["kl", "rewards/chosen", "rewards/rejected"],
        "sft": ["num_tokens"]}


def _run(objective, tmp_path, *extra):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(ROWS[objective](i)) + "\n" for i in range(12)))
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{name: 'random:tiny'}}\nlora: {{r: 8}}\nobjective: {{batch_size: 4}}\n"
                      f"data: {{path: {data}, max_length: 64}}\n"
                      f"train: {{max_steps: 3, micro_batch_size: 2, learning_rate: 1.0e-3, save_every: 2, "
                      f"output_dir: {tmp_path / 'run'}, num_threads: 2}}\ntracking: {{progress: false}}\n")
    module = __import__(f"rl.{objective}", fromlist=["main"])
    return run_cli(f"rl.{objective}", module.main, ["--config", str(config), *extra])


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "sft"])
def test_cli_runs_three_steps(objective, tmp_path):
    assert _run(objective, tmp_path) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ["loss", "grad_norm", "learning_rate", *KEYS[objective]]:
        assert all(key in r for r in rows), key
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_resume_continues_an_offline_run(tmp_path):
    assert _run("dpo", tmp_path) == 0
    assert _run("dpo", tmp_path, "--train.max_steps", "4", "--resume") == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_dataset_without_the_objectives_columns_is_refused(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{name: 'random:tiny'}}\ndata: {{path: {data}}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}}}\n")
    from rl import dpo

    assert run_cli("rl.dpo", dpo.main, ["--config", str(config)]) == 2
    assert "data.jsonl line 1 has no column 'chosen'; a dpo dataset needs columns prompt, chosen, rejected" in \
        capsys.readouterr().err
