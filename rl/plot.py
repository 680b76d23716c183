"""`python -m rl.plot RUN_DIR [RUN_DIR ...] [-o curves.png]`: PNG curves of a run's metrics.jsonl.

Four panels. A GRPO run: reward, KL (when beta > 0; otherwise the policy entropy), completion length and
rollout throughput. A DPO, ORPO, KTO or SFT run (no rollout, no `reward`): the first four of loss, reward
margin, preference accuracy, KL (KTO), NLL (ORPO), tokens per step (SFT), gradient norm and learning rate
that the run writes (rl/offline.py's metric names). Several run directories (e.g. seeds) are drawn on the
same axes. A run with held-out evaluations (eval.every) gets a fifth panel: its eval/greedy_pass@1 and
eval/pass@k at the steps they were taken, unsmoothed (few points, each a whole evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = [("reward", "reward"), ("kl", "KL to reference"), ("completions/mean_length", "completion length (tokens)"),
          ("throughput/rollout_tokens_per_s", "rollout tokens/s")]
NO_KL = ("entropy", "policy entropy (no KL term: beta = 0)")
# candidates for runs without a rollout, most telling first: each objective writes a different subset
OFFLINE_PANELS = [("loss", "loss"), ("rewards/margins", "reward margin, chosen - rejected"),
                  ("rewards/accuracies", "preference accuracy"), ("kl", "KL to reference (KTO's estimate)"),
                  ("nll_loss", "NLL of the chosen completion (ORPO)"), ("num_tokens", "tokens per step (SFT)"),
                  ("grad_norm", "gradient norm"), ("learning_rate", "learning rate")]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"rl.plot: error: {path} does not exist; pass a run's train.output_dir")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def choose_panels(runs: dict[Path, list[dict]]) -> list[tuple[str, str]]:
    """(metric, title) of the panels to draw, from the metrics the runs wrote."""
    written = written_keys(runs)
    if "reward" in written:  # a run with a rollout: GRPO
        return [p if p[0] != "kl" or "kl" in written else NO_KL for p in PANELS]
    return [p for p in OFFLINE_PANELS if p[0] in written][:4]


def written_keys(runs: dict) -> set[str]:
    """The metrics the runs wrote a value for."""
    return {k for rows in runs.values() for r in rows for k, v in r.items() if v is not None}


def eval_keys(written: set[str]) -> list[str]:
    """The pass metrics of held-out evaluations among `written`: greedy pass@1 first, then pass@k by k."""
    sampled = sorted((k for k in written if k.startswith("eval/pass@")), key=lambda k: int(k.rsplit("@", 1)[1]))
    return [k for k in ["eval/greedy_pass@1"] if k in written] + sampled


def _eval_panel(ax, runs: dict[Path, list[dict]], keys: list[str]) -> None:
    styles = ["-", "--", ":", "-."]
    for color, (d, rows) in zip(range(len(runs)), runs.items()):
        for style, key in zip(styles * len(keys), keys):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o", color=f"C{color}",
                        label=f"{d.name} {key.removeprefix('eval/')}")
    ax.set_title("held-out evaluation")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def figure(run_dirs: list[Path], window: int = 5):
    """A matplotlib Figure with the runs' curves (a faint raw line and its moving average per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d: read_metrics(d) for d in run_dirs}
    evals = eval_keys(written_keys(runs))
    fig, axes = plt.subplots(3 if evals else 2, 2, figsize=(11, 10.5 if evals else 7))
    panels = choose_panels(runs)
    for ax in axes.flat[len(panels):]:  # a run that writes fewer than four of the metrics
        ax.set_visible(False)
    if evals:
        axes.flat[4].set_visible(True)
        _eval_panel(axes.flat[4], runs, evals)
    for ax, (key, title) in zip(axes.flat, panels):
        for d, rows in runs.items():
            steps = [r["step"] for r in rows if r.get(key) is not None]
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                continue
            line, = ax.plot(steps, values, alpha=0.3)
            ax.plot(steps, smooth(values, window), color=line.get_color(), label=d.name,
                    marker="o" if len(values) == 1 else None)  # a one-step run is a point, not a line
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if panels:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(run_dirs: list[Path], output: Path, window: int = 5) -> Path:
    fig = figure(run_dirs, window)  # (chooses the Agg backend before pyplot is imported)
    import matplotlib.pyplot as plt

    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (train.output_dir)")
    parser.add_argument("-o", "--output", type=Path, help="PNG path (default: RUN_DIR/curves.png)")
    parser.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    args = parser.parse_args(argv)
    out = plot(args.runs, args.output or args.runs[0] / "curves.png", args.window)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
