"""Prompt datasets: local files or hub datasets through the datasets library, and built-in offline tasks.

A row's prompt (column `data.prompt_column`) is text or a list of chat messages; chat prompts go through the
tokenizer's chat template (text prompts too, unless `data.chat_template` is false). Every other column
reaches the reward functions as a keyword argument, one value per completion.

Built-in tasks, generated from a seed so that runs are offline and reproducible:
  - arithmetic: "What is a + b? Put the final answer in \\boxed{}." with a, b in [0, 20]; column `answer`.
  - countdown: reach a target from 3 numbers with + - * /; columns `numbers`, `target`.

`PromptStream` walks the dataset in a seeded order, one permutation per epoch, and its position is part of
every checkpoint so that a resumed run sees the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from rl.errors import DataError

ARITHMETIC_INSTRUCTION = "Put the final answer in \\boxed{}."
COUNTDOWN_INSTRUCTIONS = ("Using the numbers {numbers}, create an equation that equals {target}. You can use "
                          "+, -, * and /, and each number at most once. Think in <think> </think> tags, then "
                          "give only the equation in <answer> </answer> tags.")


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        question = f"What is {a} + {b}? {ARITHMETIC_INSTRUCTION}"
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b)})
    return rows


def countdown_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        numbers = [rng.randint(1, 20) for _ in range(3)]
        a, b, c = rng.sample(numbers, 3)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        target = eval(f"({a} {op1} {b}) {op2} {c}")  # noqa: S307 - digits and operators we generated
        if 0 < target <= 200:
            content = COUNTDOWN_INSTRUCTIONS.format(numbers=numbers, target=target)
            rows.append({"prompt": [{"role": "user", "content": content}], "numbers": numbers, "target": target})
    return rows


def _load_path(cfg):
    import datasets

    path = Path(cfg.path).expanduser()
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if path.suffix in kinds:
            if not path.is_file():
                raise DataError(f"data.path {cfg.path} does not exist; check the path")
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            if not head.strip() and path.stat().st_size <= len(head):
                raise DataError(f"data.path {cfg.path} is an empty file; it needs one row per example")
            return datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
        if path.exists():
            raise DataError(f"data.path {cfg.path}: unsupported file type; use .jsonl, .json, .parquet or .csv")
        return datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files and unreachable hubs
        raise DataError(f"could not load data.path {cfg.path}: {type(e).__name__}: {e}") from None


def load_dataset(cfg, seed: int):
    """-> datasets.Dataset with the prompt column renamed to `prompt`."""
    import datasets

    if cfg.task == "arithmetic":
        ds = datasets.Dataset.from_list(arithmetic_rows(cfg.num_examples, seed))
    elif cfg.task == "countdown":
        ds = datasets.Dataset.from_list(countdown_rows(cfg.num_examples, seed))
    else:
        ds = _load_path(cfg)
    if cfg.prompt_column not in ds.column_names:
        raise DataError(f"the dataset has no column {cfg.prompt_column!r} (its columns: "
                        f"{', '.join(ds.column_names)}); set data.prompt_column to the column holding the prompts")
    if len(ds) == 0:
        raise DataError("the dataset is empty; check data.path and data.split")
    if cfg.prompt_column != "prompt":
        if "prompt" in ds.column_names:
            ds = ds.remove_columns("prompt")
        ds = ds.rename_column(cfg.prompt_column, "prompt")
    return ds


def is_chat(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def tokenize_prompt(prompt, tokenizer, system_prompt: str | None, use_template: bool) -> list[int]:
    if isinstance(prompt, str) and not (use_template and tokenizer.chat_template):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not tokenizer.chat_template:
        raise DataError("chat prompts need a tokenizer with a chat template; this one has none. Use text "
                        "prompts, or set model.tokenizer to a tokenizer that has one")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_all(ds, tokenizer, cfg, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of every prompt, checked once up front so that a bad row fails the run at start-up."""
    token_ids = []
    for i, prompt in enumerate(ds["prompt"]):
        if not isinstance(prompt, str) and not is_chat(prompt):
            raise DataError(f"row {i}: the prompt must be text or a list of {{role, content}} messages, got "
                            f"{type(prompt).__name__}")
        ids = tokenize_prompt(prompt, tokenizer, cfg.system_prompt, cfg.chat_template)
        if len(ids) > max_prompt_tokens:
            raise DataError(f"row {i}: the prompt has {len(ids)} tokens, more than rollout.max_prompt_tokens = "
                            f"{max_prompt_tokens}; raise rollout.max_prompt_tokens or filter out long prompts")
        if not ids:
            raise DataError(f"row {i}: the prompt is empty")
        token_ids.append(ids)
    return token_ids


class PromptStream:
    """Seeded, resumable walk over a dataset: a fresh permutation each epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, count: int) -> list[int]:
        rows = []
        while len(rows) < count:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            rows.append(self._order[self.index])
            self.index += 1
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()
