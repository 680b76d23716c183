"""Experiment tracking: metrics.jsonl always; wandb and TensorBoard when enabled; a progress bar.

Held-out evaluations (eval/... metrics) arrive in their step's row, so every tracker shows them as it shows the
rest, at the steps they were taken. metrics.jsonl keeps TRL's names (reward, kl, completions/mean_length...);
the dashboards show the same values grouped by section (dashboard_tag: reward/, rewards/<fn>/, eval/, train/,
timing/, memory/, rollout/), since TensorBoard and wandb draw one group per prefix.

    tracker = Tracker(output_dir, cfg.tracking, run_config, total_steps, start_step)
    tracker.log(step, {"reward": 0.4, ...})          # one JSON object per step, with "step"
    tracker.log_samples(step, rows)                   # sample completions: samples.jsonl, a table in both dashboards
    tracker.log_histogram(step, "reward/histogram", rewards)   # the dashboards only
    tracker.log_image("curves", path)                 # wandb only (the end of a run's curves.png)

Only rank 0 writes. On resume, metrics.jsonl is cut back to the checkpoint's step, so the file reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("tandem")

# TRL's top-level names and the prefixes that belong to another section, as the dashboards group them
_RENAMED = {"reward": "reward/mean", "reward_std": "reward/std", "frac_reward_zero_std": "reward/frac_zero_std",
            "throughput/rollout_tokens_per_s": "rollout/tokens_per_s"}
_MOVED = {"completions/": "rollout/completions/", "sampling/": "rollout/sampling/",
          "dynamic_sampling/": "rollout/dynamic_sampling/", "clip_ratio/": "train/clip_ratio/",
          "entropy/": "train/entropy/"}


def dashboard_tag(key: str) -> str:
    """The name a metric has in TensorBoard and wandb: its section, then its metrics.jsonl name."""
    if key in _RENAMED:
        return _RENAMED[key]
    for old, new in _MOVED.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key if "/" in key else f"train/{key}"  # loss, kl, entropy, grad_norm, learning_rate, nll_loss...


def wandb_mode(configured: str) -> str:
    """auto: online where wandb has credentials (WANDB_API_KEY or a login in ~/.netrc), offline otherwise."""
    if configured != "auto":
        return configured
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def _markdown_cell(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


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
            import yaml

            config = yaml.safe_dump(run_config, sort_keys=False)
            self.tensorboard.add_text("config", "".join(f"    {line}\n" for line in config.splitlines()), start_step)
        if cfg.wandb:
            import wandb

            mode = wandb_mode(cfg.wandb_mode)
            if cfg.wandb_mode == "auto" and mode == "offline":
                log.info("wandb: no credentials (WANDB_API_KEY or `wandb login`), so the run is logged offline; "
                         "`wandb sync` uploads it afterwards (the command is printed at the end)")
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, mode=mode,
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
        scalars = {dashboard_tag(k): v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for tag, v in scalars.items():
                self.tensorboard.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
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
        if not rows:
            return
        columns = list(rows[0])
        if self.tensorboard is not None:  # markdown: TensorBoard's text dashboard draws it as a table
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            table += ["| " + " | ".join(_markdown_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
            self.tensorboard.add_text("completions", "\n".join(table), step)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self.wandb.log({"completions": table}, step=step)

    def log_histogram(self, step: int, tag: str, values) -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.add_histogram(tag, values, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Histogram(values.tolist() if hasattr(values, "tolist") else values)}, step=step)

    def log_image(self, tag: str, path: Path) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))})

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            offline = self.wandb.settings.mode == "offline" if hasattr(self.wandb, "settings") else False
            run_dir = Path(self.wandb.dir).parent  # wandb/offline-run-<time>-<id>, above its files/
            self.wandb.finish()
            if offline:
                self.write(f"wandb: logged offline; upload the run with: wandb sync {run_dir}")
