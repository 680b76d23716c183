"""`python -m rl.plot RUN_DIR [RUN_DIR ...] [-o curves.png]`: PNG curves of a run's metrics.jsonl.

Four panels: reward, KL (when beta > 0; otherwise the policy entropy), completion length and rollout
throughput. Several run directories (e.g. seeds) are drawn on the same axes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = [("reward", "reward"), ("kl", "KL to reference"), ("completions/mean_length", "completion length (tokens)"),
          ("throughput/rollout_tokens_per_s", "rollout tokens/s")]


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


def plot(run_dirs: list[Path], output: Path, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d: read_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        shown_key = key
        if key == "kl" and not any("kl" in r for rows in runs.values() for r in rows):
            shown_key, title = "entropy", "policy entropy (no KL term: beta = 0)"
        for d, rows in runs.items():
            steps = [r["step"] for r in rows if r.get(shown_key) is not None]
            values = [r[shown_key] for r in rows if r.get(shown_key) is not None]
            if not values:
                continue
            line, = ax.plot(steps, values, alpha=0.3)
            ax.plot(steps, smooth(values, window), color=line.get_color(), label=d.name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
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
