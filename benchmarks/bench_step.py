"""Time the phases of a GRPO step (rollout, rewards, train) for any config.

    python benchmarks/bench_step.py [--config examples/arithmetic.yaml] [--steps 4] [--section.key value ...]

Runs `--steps` real training steps in a temporary output directory and prints the median of each phase over
the steps after the first (which pays one-time costs), with rollout throughput and peak memory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/arithmetic.yaml")
    parser.add_argument("--steps", type=int, default=4)
    args, overrides = parser.parse_known_args(argv)

    from rl.config import load_config
    from rl.trainer import GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [*overrides, "--train.max_steps", str(args.steps), "--train.output_dir", out,
                                        "--train.save_every", "0", "--tracking.progress", "false"])
        t0 = time.perf_counter()
        trainer = GRPOTrainer(cfg)
        load_s = time.perf_counter() - t0
        rows = []
        for step in range(1, args.steps + 1):
            trainer.step = step
            rows.append(trainer.train_step(step))
    timed = rows[1:] or rows
    med = {k: statistics.median(float(r[k]) for r in timed) for k in timed[0] if isinstance(timed[0][k], (int, float))
           or hasattr(timed[0][k], "item")}
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"config {args.config} {' '.join(overrides)}; device {device}; torch {torch.__version__}")
    print(f"model load + set-up: {load_s:.1f} s; median of steps 2..{args.steps}:")
    print("| phase | seconds |\n|---|---|")
    for k in ("timing/rollout", "timing/rewards", "timing/train", "timing/step"):
        print(f"| {k.split('/')[1]} | {med[k]:.2f} |")
    print(f"rollout throughput {med['throughput/rollout_tokens_per_s']:.0f} tokens/s, "
          f"mean completion {med['completions/mean_length']:.0f} tokens")
    for k in med:
        if k.startswith("memory/"):
            print(f"{k}: {med[k]:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
