"""`python -m rl.generate RUN_DIR`: what a trained run's policy answers, beside what its base model answers.

    python -m rl.generate runs/arithmetic                            # chat: each line typed (or piped) is a prompt
    python -m rl.generate runs/arithmetic --prompts prompts.txt      # one prompt per line
    python -m rl.generate runs/arithmetic --prompts rows.jsonl       # a `prompt` column (text or chat messages)
    echo "What is 2 + 3?" | python -m rl.generate runs/arithmetic --no-compare --temperature 0.7 --max-tokens 64

It reads the run's own config.yaml (model, LoRA shape, seed, data.system_prompt and data.chat_template, the
rollout's max_tokens and stop tokens) and its trained weights: RUN_DIR/adapter (the final LoRA adapter), or
RUN_DIR/model (a full-parameter run), or, for a run that stopped before saving them, its latest complete
checkpoint (said so). Each prompt goes through the tokenizer's chat template as the run's prompts did and is
completed by the native engine, greedily unless --temperature is above 0. With --compare (the default) the
base model's completion (adapters disabled; a full-parameter run loads model.name beside it) is printed above
the trained one. Every stdin line starts a new one-turn conversation: the base and the trained policy would
each continue a shared history differently. Any config key can be overridden as `--section.key value`
(e.g. `--model.device cpu`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from rl.cli import run_cli
from rl.errors import ConfigError, DataError

log = logging.getLogger("tandem")


# ------------------------------------------------------------------------------------ the run


def read_config(run_dir: Path, overrides: list[str]):
    """The run's config.yaml in its schema: GRPO's, or (an `objective` section) that of DPO/ORPO/KTO/SFT."""
    from rl.config import GRPORunConfig, OfflineRunConfig, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml; pass a run's train.output_dir (the directory holding "
                          "config.yaml, metrics.jsonl and adapter/)")
    schema = OfflineRunConfig if "objective" in (yaml.safe_load(path.read_text()) or {}) else GRPORunConfig
    return load_config(str(path), overrides, schema=schema)


def trained_weights(run_dir: Path) -> Path:
    """adapter/ (LoRA) or model/ (full-parameter), else the latest complete checkpoint."""
    from rl.checkpoint import list_checkpoints

    for name in ("adapter", "model"):
        if (run_dir / name).is_dir():
            return run_dir / name
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ConfigError(f"{run_dir} has neither adapter/ nor model/ nor a complete checkpoint: the run has not "
                          "saved any trained weights yet")
    log.info("%s has no final adapter (the run stopped early): using its latest checkpoint, %s", run_dir, found[-1])
    return found[-1]


class Models:
    """The trained policy and, with compare, a way to run its base: generate(prompts, params, base=...)."""

    def __init__(self, cfg, weights: Path, compare: bool):
        from rl.model import load_base_model, load_policy
        from rollout.native import NativeEngine

        self.base_engine = None
        if (weights / "adapter_model.safetensors").is_file():
            policy = load_policy(cfg.model, cfg.lora, cfg.train.seed)  # the seed makes a random: base the run's
            _load_adapter(policy.model, weights)
            model, self.tokenizer = policy.model, policy.tokenizer
        elif (weights / "config.json").is_file():  # a full-parameter run's whole model, a second model as base
            model, self.tokenizer = load_base_model(dataclasses.replace(cfg.model, name=str(weights)), cfg.train.seed)
            if compare:
                self.base_engine = NativeEngine(load_base_model(cfg.model, cfg.train.seed)[0], self.tokenizer)
        else:
            raise ConfigError(f"{weights} holds neither a LoRA adapter (adapter_model.safetensors) nor a model "
                              "(config.json)")
        self.lora = self.base_engine is None
        self.engine = NativeEngine(model, self.tokenizer)

    def generate(self, prompt_ids: list[list[int]], params, base: bool) -> list[tuple[str, bool]]:
        """-> (text, cut at max_tokens) per prompt."""
        if not base:
            outs = self.engine.generate(prompt_ids, params)
        elif self.lora:
            with self.engine.model.disable_adapter():  # the reference policy of the run: the same base weights
                outs = self.engine.generate(prompt_ids, params)
        else:
            outs = self.base_engine.generate(prompt_ids, params)
        firsts = [o[0] for o in outs]
        return [(self.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip(), c.finish_reason == "length")
                for c in firsts]


def _load_adapter(model, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(path / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"the adapter in {path} does not fit the run's config.yaml (missing {missing[:3]}...); "
                          "was config.yaml edited after the run?")


# ------------------------------------------------------------------------------------ prompts


def read_prompts(path: Path, column: str) -> list:
    """A text file: one prompt per non-empty line. A .jsonl file: one row per line, its `column` (text or a list of
    chat messages)."""
    if not path.is_file():
        raise DataError(f"--prompts {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"--prompts {path}, line {i}: not JSON ({e})") from None
        if not isinstance(row, dict) or column not in row:
            raise DataError(f"--prompts {path}, line {i}: no {column!r} key; each line needs one (text or chat "
                            "messages), or use a .txt file with one prompt per line")
        prompts.append(row[column])
    return prompts


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1].get("content", "")


def show(i: int, prompt, outputs: dict[str, tuple[str, bool]]) -> None:
    """One prompt and its completions, labelled; an empty one (whitespace or special tokens only) says so."""
    print(f"=== [{i}] {_text(prompt)}")
    for label, (text, cut) in outputs.items():
        print(f"--- {label}" + (" (cut at --max-tokens)" if cut else ""))
        print(text or "(empty)")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------ the command


def parse_args(prog: str, argv: list[str] | None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's train.output_dir")
    parser.add_argument("--prompts", type=Path, metavar="FILE", help="a file of prompts (one per line, or .jsonl "
                        "with a prompt column); without it, prompts are read from stdin, one per line")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also print the base model's completion (adapters disabled); default on")
    parser.add_argument("--max-tokens", type=int, help="completion length cap (default: the run's "
                        "rollout.max_tokens, or 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts of a file completed at once")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser.parse_known_args(argv)


def run(args, overrides: list[str]) -> None:
    from rl.data import is_chat, tokenize_prompt
    from rollout import SamplingParams

    cfg = read_config(args.run_dir, overrides)
    rollout = getattr(cfg, "rollout", None)  # runs without a rollout (DPO, ...) have no length of their own
    max_tokens = args.max_tokens or (rollout.max_tokens if rollout else 256)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                                stop_token_ids=rollout.stop_token_ids if rollout else None, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"{e}; check --max-tokens, --temperature and --top-p") from None
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size is {args.batch_size}; use >= 1")
    prompts = read_prompts(args.prompts, cfg.data.prompt_column) if args.prompts else None
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    models = Models(cfg, trained_weights(args.run_dir), args.compare)

    def complete(batch: list, first: int) -> None:
        for prompt in batch:
            if not isinstance(prompt, str) and not is_chat(prompt):
                raise DataError(f"prompt {prompt!r} is neither text nor a list of {{role, content}} messages")
        ids = [tokenize_prompt(p, models.tokenizer, cfg.data.system_prompt, cfg.data.chat_template) for p in batch]
        base = models.generate(ids, params, base=True) if args.compare else None
        trained = models.generate(ids, params, base=False)
        for i, prompt in enumerate(batch):
            show(first + i, prompt, ({"base": base[i]} if base else {}) | {"trained": trained[i]})

    if prompts is not None:
        for start in range(0, len(prompts), args.batch_size):
            complete(prompts[start:start + args.batch_size], start + 1)
        return
    if sys.stdin.isatty():
        print("Type a prompt and press Enter (Ctrl-D to end).", file=sys.stderr)
    for i, line in enumerate((line for line in sys.stdin if line.strip()), 1):
        complete([line.strip()], i)


def main(argv: list[str] | None = None) -> int:
    return run_cli("rl.generate", run, argv, parse=parse_args)


if __name__ == "__main__":
    sys.exit(main())
