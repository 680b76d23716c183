"""Experiment tracking: metrics.jsonl always; wandb and TensorBoard when enabled; a progress bar.

Held-out evaluations (eval/... metrics) arrive in their step's row, so every tracker shows them as it shows the
rest, at the steps they were taken.

    tracker = Tracker(output_dir, cfg.tracking, run_config, total_steps, start_step)
    tracker.log(step, {"reward": 0.4, ...})          # one JSON object per step, with "step"
    tracker.log_samples(step, rows)                   # sample completions, to samples.jsonl (and wandb)

Only rank 0 writes. On resume, metrics.jsonl is cut back to the checkpoint's step, so the file reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm


def _clean(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class Tracker:
    def __init__(self, output_dir: Path, cfg, run_config: dict, total_steps: int, start_step: int = 0,
                 rank: int = 0):
        self.enabled = rank == 0
        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.samples_path = output_dir / "samples.jsonl"
        self.wandb = self.tensorboard = self.bar = None
        if not self.enabled:
            return
        truncate_metrics(self.metrics_path, start_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, mode=cfg.wandb_mode,
                                    dir=str(output_dir), config=run_config, resume="allow")
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **_clean(metrics)}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(self._postfix(row), refresh=True)

    @staticmethod
    def _postfix(row: dict) -> str:
        shown = [("reward", "reward", "{:.3f}"), ("kl", "kl", "{:.4f}"),
                 ("tok/s", "throughput/rollout_tokens_per_s", "{:.0f}"), ("len", "completions/mean_length", "{:.0f}"),
                 ("mem", "memory/train_peak_gb", "{:.1f}GB"),
                 ("rss", "memory/peak_rss_gb", "{:.1f}GB"), ("s/step", "timing/step", "{:.1f}"),
                 ("eval", "eval/greedy_pass@1", "{:.3f}")]  # held out (rl/evaluation.py): at its steps only
        return " ".join(f"{name}={fmt.format(row[key])}" for name, key, fmt in shown if row.get(key) is not None)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self.wandb is not None:
            import wandb

            columns = list(rows[0])
            self.wandb.log({"completions": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                           step=step)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
