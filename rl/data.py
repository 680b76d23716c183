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

import csv
import json
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


KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_path(cfg):
    import datasets

    path = Path(cfg.path).expanduser()
    try:
        if path.suffix in KINDS:
            if not path.is_file():
                raise DataError(f"data.path {cfg.path} does not exist; check the path")
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            if not head.strip() and path.stat().st_size <= len(head):
                raise DataError(f"data.path {cfg.path} is an empty file; it needs one row per example")
            return datasets.load_dataset(KINDS[path.suffix], data_files=str(path), split="train")
        if path.exists():
            raise DataError(f"data.path {cfg.path}: unsupported file type; use .jsonl, .json, .parquet or .csv")
        return datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files and unreachable hubs
        where = _first_problem(path) if path.is_file() else None
        if where:
            raise DataError(f"data.path {cfg.path} {where}; fix or remove that line") from None
        cause = e.__cause__ or e  # datasets wraps the parser's error in "An error occurred while generating..."
        raise DataError(f"could not load data.path {cfg.path}: {type(cause).__name__}: {cause}") from None


def _first_problem(path: Path) -> str | None:
    """"line N: what is wrong" for the first line the file's parser refuses (read again with Python's own
    parsers, which say where: datasets' say "an error occurred while generating the dataset"), or None."""
    if path.suffix == ".csv":
        return _csv_problem(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
            return None
        except UnicodeDecodeError as e:
            return f"byte {e.start}: not UTF-8 text"
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # one JSON document, broken; "Extra data": JSON lines in a .json file
                return f"line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
    if path.suffix in (".json", ".jsonl"):
        return _jsonl_problem(path)
    return None


def _jsonl_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {n}: not UTF-8 text"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n}: not a JSON object (each line must be one {{...}} row), got {type(row).__name__}"
    return None


def _csv_problem(path: Path) -> str | None:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    return f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except csv.Error as e:
        return f"line {reader.line_num}: {e}"
    return None


def row_place(cfg, i: int) -> str:
    """Where row i (0-based, in file order) of the data is, for messages: a .jsonl file's line, else the row."""
    if cfg.task is not None:
        return f"data.task {cfg.task} row {i}"
    path = Path(cfg.path).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        with open(path, "rb") as f:
            rows = (n for n, raw in enumerate(f, 1) if raw.strip())
            line = next((n for k, n in enumerate(rows) if k == i), None)
        if line is not None:
            return f"data.path {cfg.path} line {line}"
    return f"data.path {cfg.path} row {i}"


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
