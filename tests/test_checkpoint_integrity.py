"""Checkpoints verified on resume: each COMPLETE marker records its files' sizes and sha256; a damaged newest
checkpoint (truncated, bytes flipped, a file missing) is reported and passed over for the intact one before
it, and the run resumed from there equals the uninterrupted run; all damaged stops with exit 2, one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rl.checkpoint import main as checkpoint_cli
from rl.checkpoint import verify
from rl.config import to_dict
from rl.trainer import GRPOTrainer
from tests.helpers import crash_at, run_config
from tests.test_trainer import lora_state, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 3, "save_every": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted 3-step run's metrics and final adapter, a run stopped after its step-2 checkpoint,
    holding step-000001 and step-000002)."""
    base = tmp_path_factory.mktemp("runs")
    whole = GRPOTrainer(run_config(base / "whole", train=TRAIN))
    whole.train()
    crash_at(GRPOTrainer(run_config(base / "crashed", train=TRAIN)), 3)  # after the checkpoint of step 2
    return read_metrics(base / "whole" / "run" / "metrics.jsonl"), lora_state(whole.model), base / "crashed" / "run"


def _copy(runs, tmp_path) -> Path:
    shutil.copytree(runs[2], tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:  # past the safetensors header: a loader would take the damaged weights silently
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": ("adapter_model.safetensors", truncate, "bytes, .* when written \\(truncated\\)"),
          "flipped": ("adapter_model.safetensors", flip, "contents changed since it was written"),
          "missing": ("optimizer.pt", Path.unlink, "optimizer.pt: missing")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(runs, tmp_path, caplog, kind):
    expected, final_lora, _ = runs
    root = _copy(runs, tmp_path)
    name, damage, says = DAMAGE[kind]
    damage(root / "step-000002" / name)
    assert verify(root / "step-000002")[0] == "damaged"
    with caplog.at_level("INFO", logger="tandem"):
        trainer = GRPOTrainer(run_config(tmp_path, train=TRAIN), resume="latest")
    assert f"step-000002 is damaged: {name}" in caplog.text
    assert any(__import__("re").search(says, r.getMessage()) for r in caplog.records), caplog.text
    assert "resuming from" in caplog.text and "step-000001, the newest intact checkpoint" in caplog.text
    assert trainer.step == 1
    trainer.train()
    got = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    for row, want in zip(got[1:], expected[1:]):
        for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length", "learning_rate"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (row["step"], key)
    for k, v in final_lora.items():
        torch.testing.assert_close(lora_state(trainer.model)[k], v, rtol=1e-5, atol=1e-7)
    assert verify(root / "step-000003")[0] == "ok"


def test_all_damaged_stops_with_one_message(runs, tmp_path):
    root = _copy(runs, tmp_path)
    truncate(root / "step-000002" / "adapter_model.safetensors")
    (root / "step-000001" / "rng.pt").unlink()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(run_config(tmp_path, train=TRAIN))))
    result = subprocess.run([sys.executable, "-m", "rl.grpo", "--config", str(config), "--resume"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "every checkpoint under" in error[0] and "step-000001: rng.pt: missing" in error[0]
    assert "step-000002: adapter_model.safetensors" in error[0]


def test_a_chosen_damaged_checkpoint_is_refused(runs, tmp_path):
    from rl.errors import ConfigError
    from rl.resume import pick_checkpoint

    root = _copy(runs, tmp_path)
    flip(root / "step-000001" / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="step-000001: the checkpoint is damaged: adapter_model.safetensors"):
        pick_checkpoint(tmp_path / "run", str(root / "step-000001"))


def test_an_old_checkpoint_without_checksums_loads_unverified(runs, tmp_path, caplog):
    from rl.resume import pick_checkpoint

    root = _copy(runs, tmp_path)
    (root / "step-000002" / "COMPLETE").write_text("2")  # the marker of older versions
    with caplog.at_level("INFO", logger="tandem"):
        assert pick_checkpoint(tmp_path / "run", "latest") == root / "step-000002"
    assert "step-000002 is unverified" in caplog.text


def test_verify_command(runs, tmp_path, capsys):
    root = _copy(runs, tmp_path)
    assert checkpoint_cli(["verify", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(": ok: " in line for line in lines), lines
    marker = json.loads((root / "step-000002" / "COMPLETE").read_text())
    assert marker["step"] == 2 and {"adapter_model.safetensors", "optimizer.pt", "rng.pt",
                                    "trainer_state.json"} <= marker["files"].keys()
    truncate(root / "step-000002" / "rng.pt")
    assert checkpoint_cli(["verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(": ok: 5 files verified") or ": ok: " in out[0]
    assert "step-000002: damaged: rng.pt:" in out[1] and "(truncated)" in out[1]
    assert checkpoint_cli(["verify", str(root / "step-000001")]) == 0  # one checkpoint
    assert checkpoint_cli(["verify", str(tmp_path / "nothing")]) == 2
