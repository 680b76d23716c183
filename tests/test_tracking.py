"""Tracking back-ends: metrics.jsonl always; TensorBoard and wandb (offline) when enabled."""

import json

from rl.config import TrackingSection
from rl.tracking import Tracker, truncate_metrics


def test_jsonl_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrackingSection(wandb=True, wandb_mode="offline", tensorboard=True, progress=True, run_name="t")
    tracker = Tracker(tmp_path, cfg, {"train": {"seed": 0}}, total_steps=2)
    tracker.log(1, {"reward": 0.5, "kl": float("nan")})
    tracker.log(2, {"reward": 0.75})
    tracker.log_samples(2, [{"prompt": "p", "completion": "c", "reward": 1.0}])
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "reward": 0.5, "kl": None}, {"step": 2, "reward": 0.75}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
