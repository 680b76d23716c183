"""`python -m rl.evaluate RUN_DIR`: the held-out evaluation of training (rl/evaluation.py), on a finished run.

    python -m rl.evaluate runs/arithmetic --data held-out           # the prompts the run held out (eval.every set)
    python -m rl.evaluate runs/arithmetic --data test.jsonl --base  # a file, the base model beside the trained one
    python -m rl.evaluate runs/arithmetic --data countdown --n 16 --temperature 0.7

It reads the run's config.yaml (model, LoRA, rewards, eval) and its trained weights as rl.generate does (adapter/,
model/, or the latest checkpoint; --weights for another, e.g. checkpoints/best/step-000050), answers each
prompt greedily and with --n samples at --temperature through the native engine, scores them with the run's
reward functions (a completion is correct where eval.correct's score reaches eval.threshold), and prints
greedy pass@1, pass@k and the mean rewards; with --base the base model's (adapters disabled) beside them. The
figures go to a JSON file (--output, default RUN_DIR/eval.json).

--data: `held-out` (the default where the run had eval.every set: the same prompts, the same seed, so the
trained column repeats the run's last evaluation); a .jsonl/.json/.parquet/.csv file with the run's prompt column
and the columns its rewards read; or a built-in task (arithmetic, countdown): --num-examples fresh rows, which may
repeat prompts the run trained on (arithmetic has 441 distinct sums), unlike held-out ones. --n, --k,
--temperature and --max-tokens stand for eval.n, eval.k, eval.temperature and eval.max_tokens; any config key
can be overridden as `--section.key value` (e.g. `--eval.correct total --eval.threshold 1.5`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rl.cli import run_cli
from rl.errors import ConfigError

TASKS = ("arithmetic", "countdown")


def parse_args(prog: str, argv: list[str] | None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a GRPO run's train.output_dir")
    parser.add_argument("--data", metavar="FILE_OR_TASK", help="held-out (default where the run had eval.every), "
                        "a prompt file, or a built-in task: arithmetic | countdown")
    parser.add_argument("--n", type=int, help="samples per prompt for pass@k (default: the run's eval.n, 8)")
    parser.add_argument("--k", type=int, nargs="+", help="the k of each pass@k (default: 1 and --n)")
    parser.add_argument("--temperature", type=float, help="of the samples (default: the run's eval.temperature)")
    parser.add_argument("--max-tokens", type=int, help="completion length cap (default: eval.max_tokens, or "
                        "rollout.max_tokens)")
    parser.add_argument("--num-examples", type=int, default=200, help="rows of a built-in task (default 200)")
    parser.add_argument("--seed", type=int, help="the samples' seed, and a task's rows' (default: train.seed)")
    parser.add_argument("--base", action="store_true", help="also evaluate the base model (adapters disabled)")
    parser.add_argument("--weights", type=Path, metavar="PATH", help="a checkpoint directory to evaluate instead "
                        "of the run's final weights")
    parser.add_argument("--output", type=Path, metavar="FILE", help="JSON file (default: RUN_DIR/eval.json)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args, overrides = parser.parse_known_args(argv)
    for flag, key in (("n", "n"), ("k", "k"), ("temperature", "temperature"), ("max_tokens", "max_tokens")):
        value = getattr(args, flag)
        if value is not None:  # checked by the config's own validation, as eval.<key>
            overrides += [f"--eval.{key}", json.dumps(value)]
    return args, overrides


def eval_config(args, overrides: list[str]):
    """The run's config with the command's eval settings; eval.every set, so that its checks apply."""
    from rl.config import GRPORunConfig
    from rl.generate import read_config

    cfg = read_config(args.run_dir, overrides)
    if not isinstance(cfg, GRPORunConfig):
        raise ConfigError(f"{args.run_dir} is a run without rewards (DPO, ORPO, KTO or SFT); rl.evaluate scores "
                          "with a GRPO run's reward functions")
    held_out = cfg.eval.every > 0
    if args.data is None and not held_out:
        raise ConfigError(f"{args.run_dir} held no prompts out (its eval.every is 0): pass --data with a prompt "
                          f"file or a built-in task ({', '.join(TASKS)})")
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=max(cfg.eval.every, 1))), held_out


def eval_dataset(cfg, data: str | None, num_examples: int, seed: int, held_out: bool):
    from rl.data import load_dataset
    from rl.evaluation import eval_datasets

    if data in (None, "held-out"):
        if not held_out:
            raise ConfigError("--data held-out: the run held no prompts out (its eval.every is 0); pass a prompt "
                              f"file or a built-in task ({', '.join(TASKS)})")
        return eval_datasets(cfg)[1]  # eval.data, or the rows held out of the training data, as in the run
    if data in TASKS:
        if num_examples < 1:
            raise ConfigError(f"--num-examples is {num_examples}; use >= 1")
        return load_dataset(dataclasses.replace(cfg.data, task=data, path=None, num_examples=num_examples), seed)
    if Path(data).suffix in (".jsonl", ".json", ".parquet", ".csv") and not Path(data).is_file():
        raise ConfigError(f"--data {data}: no such file; give a prompt file, held-out, or a built-in task "
                          f"({', '.join(TASKS)})")
    return load_dataset(dataclasses.replace(cfg.data, task=None, path=data), seed)


def table(results: dict[str, dict]) -> str:
    """Metric rows, one column per model (base, trained)."""
    names = list(next(iter(results.values())))
    width = max(map(len, names))
    lines = [f"{'':<{width}}  " + "  ".join(f"{label:>9}" for label in results)]
    for name in names:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r[name]:>9.4g}" if r[name] is not None else f"{'-':>9}"
                                                     for r in results.values()))
    return "\n".join(lines)


def run(args, overrides: list[str]) -> None:
    import torch

    from rl.evaluation import Evaluation
    from rl.generate import Models, trained_weights
    from rl.model import resolve_device
    from rl.trainer import reward_runner, stop_tokens
    from rollout.scheduler import MemoryScheduler

    # the run's eval section, with the command's settings, and its data: the held-out prompts need the run's
    cfg, held_out = eval_config(args, overrides)
    seed = cfg.train.seed if args.seed is None else args.seed
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    dataset = eval_dataset(cfg, args.data, args.num_examples, seed, held_out)
    weights = args.weights or trained_weights(args.run_dir)
    models = Models(cfg, weights, compare=args.base)
    memory = MemoryScheduler(resolve_device(cfg.model.device), cfg.train.gpu_memory_gb, cfg.train.memory_margin_gb)
    memory.attach(models.engine.model, None)
    evaluation = Evaluation(cfg, dataset, models.tokenizer, reward_runner(cfg),
                            stop_tokens(cfg, models.engine.model, models.tokenizer), seed=seed)

    results = {}
    if args.base:
        if models.lora:  # the run's reference policy: the same base weights, adapters off
            with models.engine.model.disable_adapter():
                results["base"] = evaluation.run(lambda ids, p, o: memory.generate(models.engine, ids, p, o))
        else:
            results["base"] = evaluation.run(lambda ids, p, o: memory.generate(models.base_engine, ids, p, o))
    results["trained"] = evaluation.run(lambda ids, p, o: memory.generate(models.engine, ids, p, o))

    print(f"{args.run_dir} ({weights}) on {args.data or 'held-out'}: {len(dataset)} prompts, greedy and "
          f"{cfg.eval.n} samples at temperature {cfg.eval.temperature:g}")
    print(table(results))
    output = args.output or args.run_dir / "eval.json"
    output.write_text(json.dumps({
        "run_dir": str(args.run_dir), "weights": str(weights), "data": args.data or "held-out", "n": cfg.eval.n,
        "k": cfg.eval.ks, "temperature": cfg.eval.temperature, "seed": seed, "correct": cfg.eval.correct,
        "threshold": cfg.eval.threshold, **results}, indent=1) + "\n")
    print(f"written to {output}")


def main(argv: list[str] | None = None) -> int:
    return run_cli("rl.evaluate", run, argv, parse=parse_args)


if __name__ == "__main__":
    sys.exit(main())
