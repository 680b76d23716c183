"""`python -m rl.grpo --config x.yaml [--section.key value ...] [--resume [PATH]]`: GRPO training.

The config schema is rl/config.py's GRPORunConfig; examples/arithmetic.yaml is the offline demo.
"""

from __future__ import annotations

import sys

from rl.cli import run_cli
from rl.config import load_config


def main(args, overrides) -> None:
    from rl.trainer import GRPOTrainer

    cfg = load_config(args.config, overrides)
    GRPOTrainer(cfg, resume=args.resume).train()


if __name__ == "__main__":
    sys.exit(run_cli("rl.grpo", main))
