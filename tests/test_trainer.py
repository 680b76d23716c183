"""The GRPO loop end to end on a tiny random model: it trains, writes metrics, checkpoints and resumes."""

import json

import pytest
import torch

from rl.trainer import GRPOTrainer
from tests.helpers import crash_at, run_config


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_steps_change_lora_and_write_metrics(tmp_path):
    cfg = run_config(tmp_path, train={"save_every": 1})
    trainer = GRPOTrainer(cfg)
    before = lora_state(trainer.model)
    trainer.train()
    after = lora_state(trainer.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)

    out = tmp_path / "run"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "rewards/token_reward/mean", "loss", "entropy", "grad_norm",
                "completions/mean_length", "clip_ratio/region_mean", "timing/rollout", "timing/train",
                "throughput/rollout_tokens_per_s", "learning_rate"):
        assert key in rows[0], key
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (out / "samples.jsonl").is_file()


def test_existing_run_is_not_overwritten(tmp_path):
    from rl.errors import ConfigError

    cfg = run_config(tmp_path, train={"max_steps": 1})
    GRPOTrainer(cfg).train()
    with pytest.raises(ConfigError, match="already holds a run"):
        GRPOTrainer(cfg)


def _optimizer_state(trainer) -> dict:
    names = {id(p): k for k, p in trainer.model.named_parameters()}
    return {(names[id(p)], key): t.detach().cpu().clone() for group in trainer.optimizer.param_groups
            for p in group["params"] for key, t in trainer.optimizer.state.get(p, {}).items() if torch.is_tensor(t)}


@pytest.mark.parametrize("loss_type,iterations,beta", [("dapo", 1, 0.0), ("grpo", 2, 0.05)])
def test_resume_gives_the_same_next_step(tmp_path, loss_type, iterations, beta):
    """Three steps straight against two, a checkpoint, and a resumed third: the same metrics, and after the
    last optimizer step the same weights, Adam moments and step counts, and learning-rate schedule (warmup
    then linear decay, so a schedule restored at the wrong position changes the update)."""
    grpo = {"loss_type": loss_type, "num_iterations": iterations, "beta": beta}
    schedule = {"lr_scheduler": "linear", "warmup_steps": 2}
    straight = run_config(tmp_path / "a", grpo=grpo, train={"max_steps": 3, **schedule})
    whole = GRPOTrainer(straight)
    whole.train()
    expected = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")

    # the same run (the schedule's length is the run's), stopped after its checkpoint at step 2
    config = run_config(tmp_path / "b", grpo=grpo, train={"max_steps": 3, "save_every": 2, **schedule})
    crash_at(GRPOTrainer(config), 3)
    trainer = GRPOTrainer(config, resume="latest")
    assert trainer.step == 2
    trainer.train()
    got = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length", "learning_rate"):
        assert got[2][key] == pytest.approx(expected[2][key], rel=1e-5, abs=1e-7), key
    if beta:
        assert got[2]["kl"] == pytest.approx(expected[2]["kl"], rel=1e-4, abs=1e-9)
    assert len({r["learning_rate"] for r in expected}) > 1  # the schedule moves (warmup 0.5, 1, then decay)
    assert trainer.scheduler.state_dict() == whole.scheduler.state_dict()
    for k, v in lora_state(whole.model).items():
        torch.testing.assert_close(lora_state(trainer.model)[k], v, rtol=1e-5, atol=1e-7)
    want, have = _optimizer_state(whole), _optimizer_state(trainer)
    assert want.keys() == have.keys() and len(want) > 0
    for k, v in want.items():
        torch.testing.assert_close(have[k], v, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path, loss_type):
    """The same step with micro-batches of 8 and of 2 sequences accumulates the same gradient (before the
    optimizer, whose first Adam step would hide a wrong scale). bnpo normalizes per micro-batch, as in TRL."""
    grads = []
    for mb in (8, 2):
        cfg = run_config(tmp_path / f"mb{mb}", grpo={"loss_type": loss_type},
                         train={"max_steps": 1, "micro_batch_size": mb})
        trainer = GRPOTrainer(cfg)
        captured = {}
        step = trainer._optimizer_step

        def capture(trainer=trainer, captured=captured, step=step):
            captured.update({k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None})
            return step()

        trainer._optimizer_step = capture
        trainer.train()
        grads.append(captured)
    assert grads[0] and grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4)


def _poison_training_forwards(model, steps_to_poison, trainer):
    """The decoder's first layer returns NaN when autograd records (the training forward) at chosen steps."""
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))

    def hook(module, args, output):
        if torch.is_grad_enabled() and trainer.step in steps_to_poison:
            hidden = output[0] if isinstance(output, tuple) else output
            poisoned = hidden * float("nan")
            return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned
        return output

    layer.register_forward_hook(hook)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    trainer = GRPOTrainer(run_config(tmp_path, train={"max_steps": 3}))
    _poison_training_forwards(trainer.model, {2}, trainer)
    states = []
    original = trainer.train_step

    def step_and_record(step):
        out = original(step)
        states.append(lora_state(trainer.model))
        return out

    trainer.train_step = step_and_record
    trainer.train()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # step 2 applied nothing
    assert not all(torch.equal(states[1][k], states[2][k]) for k in states[1])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in states[2].values())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1]


def test_too_many_non_finite_steps_stop_the_run_with_the_checkpoint_intact(tmp_path):
    from rl.errors import TrainingError

    cfg = run_config(tmp_path, train={"max_steps": 6, "save_every": 1, "max_skipped_steps": 2})
    trainer = GRPOTrainer(cfg)
    _poison_training_forwards(trainer.model, {3, 4, 5, 6}, trainer)
    with pytest.raises(TrainingError, match=r"step 4: .* not finite for 2 steps in a row.*step-000003"):
        trainer.train()
    # the checkpoints written before the failure load, and hold finite weights
    resumed = GRPOTrainer(run_config(tmp_path, train={"max_steps": 6, "save_every": 1}), resume="latest")
    assert resumed.step == 3
    assert all(torch.isfinite(v).all() for v in lora_state(resumed.model).values())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_the_reported_loss_is_the_batch_loss_whatever_the_micro_batch(tmp_path, loss_type):
    """`loss` is the whole batch's objective: the same with micro-batches of 8 and of 2 sequences. Two
    iterations: in the first the ratio is 1 and the group-centred advantages make the loss ~0."""
    losses = []
    for mb in (8, 2):
        cfg = run_config(tmp_path / f"mb{mb}", grpo={"loss_type": loss_type, "num_iterations": 2},
                         train={"max_steps": 1, "micro_batch_size": mb})
        GRPOTrainer(cfg).train()
        losses.append(read_metrics(tmp_path / f"mb{mb}" / "run" / "metrics.jsonl")[0]["loss"])
    assert abs(losses[0]) > 1e-4
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_resuming_from_an_earlier_checkpoint_drops_the_abandoned_later_ones(tmp_path, caplog):
    """--resume PATH back to step 2 of a 4-step run: steps 3 and 4's checkpoints are removed, with a log line
    naming them (they were kept, and a later --resume took the abandoned step 4 instead of the new step 3)."""
    from rl.checkpoint import list_checkpoints

    root = tmp_path / "run" / "checkpoints"
    GRPOTrainer(run_config(tmp_path, train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 3})).train()
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000003", "step-000004"]
    cfg = run_config(tmp_path, train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 3})
    with caplog.at_level("INFO", logger="tandem"):
        GRPOTrainer(cfg, resume=str(root / "step-000002")).train()
    assert "removed the later checkpoints of the run abandoned at step 2: step-000003, step-000004" in caplog.text
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000003"]
    assert not list(root.glob(".tmp-*"))  # nothing half-removed left behind
    assert GRPOTrainer(cfg, resume="latest").step == 3
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
