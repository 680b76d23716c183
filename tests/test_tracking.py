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


def test_dashboards_group_every_metric_by_section():
    from rl.tracking import dashboard_tag

    assert [dashboard_tag(k) for k in ("reward", "reward_std", "frac_reward_zero_std", "rewards/format/mean", "kl",
                                       "loss", "entropy", "grad_norm", "learning_rate", "eval/greedy_pass@1",
                                       "timing/rollout", "memory/train_peak_gb", "completions/mean_length",
                                       "throughput/rollout_tokens_per_s", "clip_ratio/low_mean",
                                       "sampling/importance_sampling_ratio/mean", "train/skipped_steps")] == [
        "reward/mean", "reward/std", "reward/frac_zero_std", "rewards/format/mean", "train/kl", "train/loss",
        "train/entropy", "train/grad_norm", "train/learning_rate", "eval/greedy_pass@1", "timing/rollout",
        "memory/train_peak_gb", "rollout/completions/mean_length", "rollout/tokens_per_s",
        "train/clip_ratio/low_mean", "rollout/sampling/importance_sampling_ratio/mean", "train/skipped_steps"]


def test_wandb_without_credentials_logs_offline_and_says_how_to_sync(tmp_path, monkeypatch, capsys):
    from rl.tracking import wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert wandb_mode("auto") == "offline" and wandb_mode("online") == "online"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.delenv("WANDB_API_KEY")

    tracker = Tracker(tmp_path, TrackingSection(wandb=True, progress=False), {"train": {"seed": 0}}, total_steps=1)
    tracker.log(1, {"reward": 0.5})
    tracker.log_samples(1, [{"prompt": "p", "completion": "c", "reward": 1.0, "reward/format": 1.0}])
    tracker.log_histogram(1, "reward/histogram", [0.0, 1.0, 1.0])
    (tmp_path / "curves.png").write_bytes(_png())
    tracker.log_image("curves", tmp_path / "curves.png")
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert f"wandb sync {runs[0]}" in capsys.readouterr().out


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buffer, format="PNG")
    return buffer.getvalue()
