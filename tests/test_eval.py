"""Held-out evaluation (rl/evaluation.py, rl/best.py, rl/evaluate.py): pass@1 and pass@k against hand-counted
values from a scripted engine and scorer; the held-out prompts never trained on; the best checkpoint kept by
the chosen metric (scripted evaluations) through the checkpoint rotation; resume keeping the eval history and
the best; `python -m rl.evaluate` repeating a tiny run's last evaluation; bad eval config refused with one
message; rl.plot's eval panel."""

import json
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.errors import ConfigError, DataError
from rl.evaluation import Evaluation, hold_out, pass_at_k
from rewards import RewardRunner
from rollout import Completion
from tests.helpers import run_config

HERE = Path(__file__).resolve().parent
TOKEN_VALUE = f"{HERE}/reward_fns.py:token_value"  # first token 0, 1, 2 -> 0, 0.5, 1; 3 -> None


# ------------------------------------------------------------------------------------ the estimator


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 4, 1, 1.0), (4, 1, 1, 0.25),        # pass@1 is c / n
    (4, 1, 2, 0.5),                                         # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),                                       # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (5, 2, 3, 0.9),                                         # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (5, 3, 3, 1.0),                                         # n - c < k: every draw of 3 holds a correct one
    (10, 1, 4, 0.4),                                        # 1 - C(9,4)/C(10,4) = 1 - 126/210
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------ scripted evaluation

# per prompt: the greedy completion's tokens, and the first token of each of its 4 samples
GREEDY = [[2, 5, 5], [1], [3, 5]]
SAMPLES = [[2, 0, 1, 0], [2, 2, 1, 0], [0, 0, 0, 1]]


class Tokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def scripted_evaluation(**eval_keys):
    """An Evaluation of 3 text prompts; generate() answers from GREEDY and SAMPLES, recording its params."""
    import datasets

    cfg = run_config(Path("/nonexistent"), rewards={"functions": [TOKEN_VALUE]},
                     eval={"every": 1, "n": 4, "k": [1, 2, 4], **eval_keys})
    dataset = datasets.Dataset.from_list([{"prompt": f"p{i}"} for i in range(3)])
    evaluation = Evaluation(cfg, dataset, Tokenizer(), RewardRunner(cfg.rewards.functions))
    calls = []

    def generate(prompt_ids, params, offset):
        calls.append(params)
        rows = range(offset, offset + len(prompt_ids))
        assert [ids for ids in prompt_ids] == [[ord("p"), ord(str(r))] for r in rows]  # the rows asked for
        if params.temperature == 0:
            return [[Completion(GREEDY[r], [0.0] * len(GREEDY[r]), "stop")] for r in rows]
        return [[Completion([t], [0.0], "stop") for t in SAMPLES[r]] for r in rows]

    return evaluation, generate, calls


# threshold 1.0: correct = token 2. greedy: p0 yes, p1 no, p2 no (None) -> 1/3; samples c = 1, 2, 0
# threshold 0.5: correct = tokens 1, 2. greedy: yes, yes, no (None is never correct) -> 2/3; c = 2, 3, 1
HAND_COUNTED = {
    1.0: {"eval/greedy_pass@1": 1 / 3,
          "eval/pass@1": (1 / 4 + 2 / 4 + 0) / 3,
          "eval/pass@2": ((1 - 3 / 6) + (1 - 1 / 6) + 0) / 3,     # 1 - C(n-c,2)/C(4,2)
          "eval/pass@4": (1 + 1 + 0) / 3},
    0.5: {"eval/greedy_pass@1": 2 / 3,
          "eval/pass@1": (2 / 4 + 3 / 4 + 1 / 4) / 3,
          "eval/pass@2": ((1 - 1 / 6) + 1 + (1 - 3 / 6)) / 3,
          "eval/pass@4": 1.0},
}


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_pass_at_1_and_k_equal_hand_counted_values(threshold):
    evaluation, generate, calls = scripted_evaluation(threshold=threshold, temperature=0.7)
    metrics = evaluation.run(generate)
    for name, expected in HAND_COUNTED[threshold].items():
        assert metrics[name] == pytest.approx(expected, abs=1e-9), name
    assert metrics["eval/reward"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # None adds nothing to the sum
    assert metrics["eval/rewards/token_value/mean"] == pytest.approx(0.75)  # ... and is left out of the mean
    assert metrics["eval/greedy_mean_length"] == pytest.approx(2.0)
    assert metrics["eval/prompts"] == 3
    greedy, sampled = calls
    assert greedy.temperature == 0 and greedy.n == 1
    assert sampled.temperature == 0.7 and sampled.n == 4 and sampled.seed is not None


def test_correct_by_the_weighted_sum_of_the_rewards():
    """eval.correct total: two functions (the same one, weights 1 and 0.5) sum to 1.5 x token_value; 0.75 is
    then token 1 or 2 (as threshold 0.5 on one function)."""
    cfg = run_config(Path("/nonexistent"), rewards={"functions": [TOKEN_VALUE, TOKEN_VALUE], "weights": [1.0, 0.5]},
                     eval={"every": 1, "n": 4, "k": [1, 2, 4], "correct": "total", "threshold": 0.75})
    evaluation, generate, _ = scripted_evaluation()
    evaluation = Evaluation(cfg, evaluation.dataset, Tokenizer(), RewardRunner(cfg.rewards.functions,
                                                                               cfg.rewards.weights))
    metrics = evaluation.run(generate)
    for name, expected in HAND_COUNTED[0.5].items():
        assert metrics[name] == pytest.approx(expected, abs=1e-9), name


def test_ranks_share_the_prompts_and_report_the_same_metrics():
    """Two ranks: rank 0 takes p0 and p1, rank 1 p2 and a padding row; gathered, they give the one-process figures."""
    evaluation, generate, _ = scripted_evaluation()
    alone = evaluation.run(generate)
    parts = []
    evaluation.run(generate, rank=1, world=2, gather=lambda t: parts.append(t) or t)
    assert parts[0].shape[0] == 2 and parts[0][1, 0] == 0  # p2, then a padding row marked invalid
    together = evaluation.run(generate, rank=0, world=2, gather=lambda t: torch.cat([t, parts[0]]))
    assert together == pytest.approx(alone)


# ------------------------------------------------------------------------------------ held-out prompts


def test_held_out_prompts_are_never_in_the_training_rows():
    import datasets

    from rl.data import arithmetic_rows

    ds = datasets.Dataset.from_list(arithmetic_rows(300, seed=0))  # sums repeat: 441 possible, few drawn twice
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    counts = {}
    for p in ds["prompt"]:
        counts[key(p)] = counts.get(key(p), 0) + 1
    for split, want in ((0.1, 30), (12, 12)):
        train, held = hold_out(ds, split, seed=0)
        held_keys = [key(p) for p in held["prompt"]]
        assert len(held_keys) == want and len(set(held_keys)) == want  # distinct prompts
        assert not set(held_keys) & {key(p) for p in train["prompt"]}
        assert len(train) == len(ds) - sum(counts[k] for k in held_keys)  # every other row still trains
    assert hold_out(ds, 12, seed=0)[1]["prompt"] == hold_out(ds, 12, seed=0)[1]["prompt"]
    assert hold_out(ds, 12, seed=0)[1]["prompt"] != hold_out(ds, 12, seed=1)[1]["prompt"]
    with pytest.raises(DataError, match="leaving none to train on"):
        hold_out(ds.select(range(5)), 5, seed=0)


# ------------------------------------------------------------------------------------ in training


def lora_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def saved_adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


SCRIPT = {"eval/greedy_pass@1": [0.9, 0.1, 0.1, 0.1], "eval/pass@2": [0.2, 0.6, 0.4, 0.6]}


@pytest.mark.parametrize("metric, best_step", [("eval/pass@2", 2), ("eval/greedy_pass@1", 1)])
def test_the_best_checkpoint_is_kept_by_the_chosen_metric(tmp_path, monkeypatch, metric, best_step):
    """Scripted evaluations at steps 1-4: the best checkpoint is the chosen metric's first maximum (a later tie
    does not replace it), holds the adapter of that step, and survives a rotation that keeps one checkpoint."""
    from rl.trainer import GRPOTrainer

    adapters = {}

    def scripted(self):
        adapters[self.step] = lora_state(self.model)
        return {name: values[self.step - 1] for name, values in SCRIPT.items()}

    monkeypatch.setattr(GRPOTrainer, "evaluate", scripted)
    cfg = run_config(tmp_path, train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 1},
                     eval={"every": 1, "split": 2, "n": 2, "best_metric": metric})
    GRPOTrainer(cfg).train()

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r[metric] for r in rows] == SCRIPT[metric]  # each step's evaluation in its own row
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000004"]  # rotated
    kept = sorted((run / "checkpoints" / "best").iterdir())
    assert [p.name for p in kept] == [f"step-{best_step:06d}"]
    state = json.loads((kept[0] / "trainer_state.json").read_text())
    assert state["eval_best"] == {"metric": metric, "value": SCRIPT[metric][best_step - 1], "step": best_step}
    assert state["step"] == best_step
    weights = saved_adapter(kept[0])
    assert set(weights) == set(adapters[best_step])
    for name, tensor in adapters[best_step].items():
        assert torch.equal(weights[name], tensor), name
    assert any(not torch.equal(weights[k], v) for k, v in adapters[4].items())  # not the last step's


def eval_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("eval/") or k == "step"} for r in rows]


def test_resume_keeps_the_eval_history_and_the_best(tmp_path):
    """A real evaluation every step of a 4-step run; the same run stopped after step 2 and resumed to 4 has the
    same eval/ rows, steps 1-2's kept from before the resume, and the same best checkpoint."""
    from rl.trainer import GRPOTrainer

    eval_keys = {"every": 1, "split": 3, "n": 2, "correct": "token_reward", "threshold": 0.5,
                 "best_metric": "eval/reward"}
    whole = run_config(tmp_path / "whole", train={"max_steps": 4, "save_every": 2}, eval=eval_keys)
    GRPOTrainer(whole).train()
    first = run_config(tmp_path / "split", train={"max_steps": 2, "save_every": 2}, eval=eval_keys)
    trainer = GRPOTrainer(first)
    trainer.train()
    held_out = {json.dumps(p) for p in trainer.evaluation.dataset["prompt"]}
    assert len(held_out) == 3 and not held_out & {json.dumps(p) for p in trainer.dataset["prompt"]}
    before = eval_rows(tmp_path / "split" / "run")
    GRPOTrainer(run_config(tmp_path / "split", train={"max_steps": 4, "save_every": 2}, eval=eval_keys),
                resume="latest").train()

    expected = eval_rows(tmp_path / "whole" / "run")
    assert [r["step"] for r in expected] == [1, 2, 3, 4] and all("eval/pass@2" in r for r in expected)
    after = eval_rows(tmp_path / "split" / "run")
    assert after[:2] == before == expected[:2]
    assert after == expected
    best = [json.loads(next((tmp_path / d / "run" / "checkpoints" / "best").glob("*/trainer_state.json"))
                       .read_text())["eval_best"] for d in ("whole", "split")]
    assert best[0] == best[1]
    values = [r["eval/reward"] for r in expected]
    assert best[0]["value"] == pytest.approx(max(values)) and best[0]["step"] == values.index(max(values)) + 1


def test_resume_restores_the_best_and_drops_an_abandoned_one(tmp_path, monkeypatch):
    """Scripted evaluations. Resumed at step 2 after a best of 0.9 there, later lower values keep it. Going back
    (--resume PATH to step 2) past a best at step 4, the abandoned best is removed and step 3's is kept."""
    from rl.trainer import GRPOTrainer

    script = {}
    monkeypatch.setattr(GRPOTrainer, "evaluate", lambda self: {"eval/pass@2": script[self.step]})
    best = lambda d: [(p.name, json.loads((p / "trainer_state.json").read_text())["eval_best"]["value"])  # noqa: E731
                      for p in sorted((d / "run" / "checkpoints" / "best").iterdir())]
    cfg = lambda d, steps: run_config(d, train={"max_steps": steps, "save_every": 2},  # noqa: E731
                                      eval={"every": 1, "split": 2, "n": 2, "best_metric": "eval/pass@2"})
    script.update({1: 0.2, 2: 0.9, 3: 0.4, 4: 0.5})
    GRPOTrainer(cfg(tmp_path / "a", 2)).train()
    assert best(tmp_path / "a") == [("step-000002", 0.9)]
    GRPOTrainer(cfg(tmp_path / "a", 4), resume="latest").train()
    assert best(tmp_path / "a") == [("step-000002", 0.9)]  # 0.4 and 0.5 after the resume are not better

    script.update({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.9})
    GRPOTrainer(cfg(tmp_path / "b", 4)).train()
    assert best(tmp_path / "b") == [("step-000004", 0.9)]
    script.update({3: 0.5})  # the redone step 3, of the run that goes on from step 2
    GRPOTrainer(cfg(tmp_path / "b", 3), resume=str(tmp_path / "b" / "run" / "checkpoints" / "step-000002")).train()
    assert best(tmp_path / "b") == [("step-000003", 0.5)]


# ------------------------------------------------------------------------------------ python -m rl.evaluate


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from rl.trainer import GRPOTrainer

    tmp = tmp_path_factory.mktemp("evaluate")
    GRPOTrainer(run_config(tmp, train={"max_steps": 3}, eval={
        "every": 3, "split": 3, "n": 2, "correct": "token_reward", "threshold": 0.5})).train()
    return tmp / "run"


def test_rl_evaluate_repeats_the_runs_last_evaluation(finished_run, tmp_path, capsys):
    from rl.evaluate import main

    out = tmp_path / "eval.json"
    assert main([str(finished_run), "--base", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    last = {k: v for k, v in eval_rows(finished_run)[-1].items() if k != "step"}
    assert report["trained"] == pytest.approx(last)  # the final adapter on the same prompts and seed
    assert set(report["base"]) == set(last) and report["base"] != report["trained"]
    printed = capsys.readouterr().out
    assert "base" in printed and "trained" in printed and "eval/pass@2" in printed


def test_rl_evaluate_on_a_file_and_on_a_task(finished_run, tmp_path):
    from rl.evaluate import main

    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "answer": "5"}) + "\n" for p in ("What is 2 + 3?", "Hi")))
    out = tmp_path / "file.json"
    assert main([str(finished_run), "--data", str(rows), "--n", "3", "--k", "2", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["trained"]["eval/prompts"] == 2 and report["n"] == 3
    assert set(k for k in report["trained"] if "pass@" in k) == {"eval/greedy_pass@1", "eval/pass@2"}
    assert main([str(finished_run), "--data", "arithmetic", "--num-examples", "4", "--n", "0",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["trained"]["eval/prompts"] == 4 and "eval/pass@1" not in report["trained"]


@pytest.mark.parametrize("argv, message", [
    (["--eval.every", "0"], "held no prompts out"),
    (["--k", "5"], "eval.k holds 5, but pass@k needs 1 <= k <= eval.n (2)"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
])
def test_rl_evaluate_mistakes_stop_with_one_message(finished_run, capsys, argv, message):
    from rl.evaluate import main

    assert main([str(finished_run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rl.evaluate: error:") and message in err, err


def test_rl_evaluate_help(capsys):
    from rl.evaluate import parse_args

    with pytest.raises(SystemExit):
        parse_args("rl.evaluate", ["--help"])
    text = capsys.readouterr().out
    assert "--data FILE_OR_TASK" in text and "--base" in text and "--temperature" in text


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, message", [
    (["--eval.every", "-5"], "eval.every is -5; use 0 (no evaluation) or a number of steps"),
    (["--eval.every", "5", "--eval.split", "0"], "eval.split is 0.0; use a fraction of the dataset in (0, 1)"),
    (["--eval.every", "5", "--eval.split", "2.5"], "or a whole number of prompts"),
    (["--eval.every", "5", "--eval.n", "4", "--eval.k", "[1, 8]"], "eval.k holds 8, but pass@k needs 1 <= k <= "
                                                                    "eval.n (4)"),
    (["--eval.every", "5", "--eval.temperature", "0"], "eval.temperature is 0.0; pass@k needs sampling"),
    (["--eval.every", "5", "--eval.correct", "accuracy"], "eval.correct is 'accuracy', which is not one of "
                                                          "rewards.functions (math_accuracy, format)"),
    (["--eval.every", "5", "--eval.best_metric", "pass@1"], "use one of eval/greedy_pass@1, eval/pass@1, "
                                                            "eval/pass@8, eval/reward"),
    (["--eval.best_metric", "eval/pass@1"], "eval.best_metric is set but eval.every is 0"),
    (["--eval.data", "test.jsonl"], "eval.data is set but eval.every is 0"),
])
def test_bad_eval_config_says_what_and_how_to_fix(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_bad_eval_config_stops_the_command_with_one_message(capsys):
    from rl.cli import run_cli
    from rl.grpo import main

    assert run_cli("rl.grpo", main, ["--eval.every", "5", "--eval.k", "[0]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["rl.grpo: error: eval.k holds 0, but pass@k needs 1 <= k <= eval.n (8); use k "
                                "values up to eval.n, or raise eval.n"]


def test_eval_is_off_by_default_and_names_its_metrics():
    cfg = load_config(None, [])
    assert cfg.eval.every == 0
    assert load_config(None, ["--eval.every", "3", "--eval.n", "4"]).eval.metric_names == [
        "eval/greedy_pass@1", "eval/pass@1", "eval/pass@4", "eval/reward"]
    assert load_config(None, ["--eval.every", "3", "--eval.n", "0"]).eval.metric_names == [
        "eval/greedy_pass@1", "eval/reward"]


# ------------------------------------------------------------------------------------ rl.plot


def test_plot_draws_an_eval_panel_when_the_run_evaluated(tmp_path):
    from rl.plot import figure

    for name, every in (("plain", 0), ("evaluated", 5)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "reward": s * 0.1, "entropy": 1.0, "completions/mean_length": 30,
                 "throughput/rollout_tokens_per_s": 100.0} for s in range(1, 11)]
        for r in rows:
            if every and r["step"] % every == 0:
                r.update({"eval/greedy_pass@1": r["step"] / 20, "eval/pass@1": 0.3, "eval/pass@8": 0.7})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = lambda fig: {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}  # noqa: E731
    assert "held-out evaluation" not in shown(figure([tmp_path / "plain"]))
    panel = shown(figure([tmp_path / "evaluated"]))["held-out evaluation"]
    lines = {line.get_label(): line for line in panel.lines}
    assert set(lines) == {"evaluated greedy_pass@1", "evaluated pass@1", "evaluated pass@8"}
    assert list(lines["evaluated greedy_pass@1"].get_xdata()) == [5, 10]
    assert list(lines["evaluated greedy_pass@1"].get_ydata()) == [0.25, 0.5]
