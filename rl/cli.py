"""Shared command-line handling for `python -m rl.grpo | rl.dpo | rl.orpo | rl.kto | rl.sft`.

    python -m rl.grpo --config examples/arithmetic.yaml [--section.key value ...] [--resume [PATH]] [--debug]

User errors (TandemError) print one message and exit with code 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from rl.errors import TandemError


def parse_args(prog: str, argv: list[str] | None):
    parser = argparse.ArgumentParser(prog=prog, description="Train with Tandem. Any config key can be "
                                     "overridden as --section.key value (e.g. --train.max_steps 10).")
    parser.add_argument("--config", help="YAML config file (see examples/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint in train.output_dir, or from PATH")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def run_cli(prog: str, main, argv: list[str] | None = None) -> int:
    """Runs main(args, overrides); maps TandemError to exit code 2 with a single clear message."""
    args, overrides = parse_args(prog, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(args, overrides)
    except TandemError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def offline_main(objective: str):
    """main(args, overrides) for `python -m rl.<objective>` (DPO, ORPO, KTO, SFT): one schema, one trainer."""

    def main(args, overrides) -> None:
        from rl.config import OfflineRunConfig, load_config
        from rl.offline import OfflineTrainer

        cfg = load_config(args.config, overrides, schema=OfflineRunConfig)
        OfflineTrainer(cfg, objective, resume=args.resume).train()

    return main
