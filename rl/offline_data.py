"""Examples for the objectives without a rollout, tokenized and checked once at start-up.

    examples = load_examples("dpo", cfg.data, tokenizer, seed)
    # dpo / orpo: [{"prompt": ids, "chosen": ids, "rejected": ids}, ...]
    # kto:        [{"prompt": ids, "completion": ids, "label": bool}, ...]
    # sft:        [{"prompt": ids, "completion": ids}, ...]

Prompts go through rl/data.py's prompt tokenization (chat template, system prompt); a completion is its text's
tokens followed by the end-of-sequence token, so that the policy learns to stop. An SFT row may instead carry
`messages`, a chat whose last message is the assistant's answer (the completion) and the rest the prompt.

The built-in `arithmetic` task makes every kind offline from rl/data.py's arithmetic questions: a chosen
(desirable) answer states the right sum in \\boxed{}, a rejected (undesirable) one a wrong sum. The `calculator`
task (SFT) answers the same questions through the calculator of rollout/tools.py, as a multi-turn rollout with
`rollout.environment: rollout.tools:Calculator` sees it: half the rows teach the first turn (the call), half
the second (reading the tool's answer into \\boxed{}). A small model told about a tool seldom calls it, and GRPO
only reinforces what it samples: this is the warm start (examples/calculator_sft.yaml).
"""

from __future__ import annotations

import random
import re

from rl.data import _load_path, arithmetic_rows, is_chat, row_place, tokenize_prompt
from rl.errors import DataError

COLUMNS = {"dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected"),
           "kto": ("prompt", "completion", "label"), "sft": ("prompt", "completion")}


def arithmetic_examples(objective: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    rows = []
    for i, row in enumerate(arithmetic_rows(n, seed)):
        right = int(row["answer"])
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 3])
        good, bad = f"The answer is \\boxed{{{right}}}.", f"The answer is \\boxed{{{wrong}}}."
        if objective in ("dpo", "orpo"):
            rows.append({"prompt": row["prompt"], "chosen": good, "rejected": bad})
        elif objective == "kto":
            rows.append({"prompt": row["prompt"], "completion": good if i % 2 == 0 else bad, "label": i % 2 == 0})
        else:
            rows.append({"prompt": row["prompt"], "completion": good})
    return rows


def calculator_examples(n: int, seed: int) -> list[dict]:
    from rollout.tools import CALCULATOR_SYSTEM, calculate

    rows = []
    for i, row in enumerate(arithmetic_rows(n, seed)):
        question = row["prompt"][-1]["content"]
        expression = re.match(r"What is (.+?)\?", question).group(1)
        value = calculate(expression)
        call = f"<calculator>{expression}</calculator>"
        messages = [{"role": "system", "content": CALCULATOR_SYSTEM}, {"role": "user", "content": question},
                    {"role": "assistant", "content": call}]
        if i % 2:
            answer = f"{expression} = {value}, so the answer is \\boxed{{{value}}}."
            messages += [{"role": "tool", "content": value}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def load_examples(objective: str, cfg, tokenizer, seed: int) -> list[dict]:
    if cfg.task == "calculator" and objective != "sft":
        raise DataError(f"data.task calculator makes SFT examples (the calculator's call and its reading), not "
                        f"{objective} ones; use data.task arithmetic or data.path")
    if cfg.task == "arithmetic":
        rows = arithmetic_examples(objective, cfg.num_examples, seed)
    elif cfg.task == "calculator":
        rows = calculator_examples(cfg.num_examples, seed)
    else:
        ds = _load_path(cfg)
        if cfg.prompt_column != "prompt" and cfg.prompt_column in ds.column_names:
            ds = ds.rename_column(cfg.prompt_column, "prompt")
        rows = ds.to_list()
    if not rows:
        raise DataError("the dataset is empty; check data.path and data.split")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token; set model.tokenizer to one that has")

    def completion(text, i, column):
        if not isinstance(text, str) or not text:
            raise DataError(f"{row_place(cfg, i)}: column {column!r} must be non-empty text, got {text!r:.60}")
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    examples = []
    for i, row in enumerate(rows):
        if objective == "sft" and "messages" in row and "prompt" not in row:
            row = _split_messages(row["messages"], row_place(cfg, i))
        missing = [c for c in COLUMNS[objective] if c not in row]
        if missing:
            raise DataError(f"{row_place(cfg, i)} has no column {missing[0]!r}; a {objective} dataset needs columns "
                            f"{', '.join(COLUMNS[objective])}" + (" (or messages)" if objective == "sft" else ""))
        if not isinstance(row["prompt"], str) and not is_chat(row["prompt"]):
            raise DataError(f"{row_place(cfg, i)}: the prompt must be text or a list of {{role, content}} messages")
        ex = {"prompt": tokenize_prompt(row["prompt"], tokenizer, cfg.system_prompt, cfg.chat_template)}
        for column in COLUMNS[objective][1:]:
            if column == "label":
                if not isinstance(row["label"], bool):
                    raise DataError(f"{row_place(cfg, i)}: label must be true (desirable) or false (undesirable), got "
                                    f"{row['label']!r}")
                ex["label"] = row["label"]
            else:
                ex[column] = completion(row[column], i, column)
        longest = max(len(ex["prompt"]) + len(v) for k, v in ex.items() if k not in ("prompt", "label"))
        if longest > cfg.max_length:
            raise DataError(f"{row_place(cfg, i)} has {longest} tokens (prompt + completion), more than "
                            f"data.max_length = {cfg.max_length}; raise data.max_length or filter out long rows")
        examples.append(ex)
    if objective == "kto" and len({e["label"] for e in examples}) < 2:
        raise DataError("a kto dataset needs both desirable (label true) and undesirable (label false) rows")
    return examples


def _split_messages(messages, where: str) -> dict:
    if not is_chat(messages) or len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: messages must be a chat of at least two messages ending with the "
                        "assistant's answer")
    return {"prompt": messages[:-1], "completion": messages[-1]["content"]}
