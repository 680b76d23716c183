"""Built-in reward functions, with TRL's signature: fn(prompts, completions, **columns) -> list[float | None].

Completions are plain strings for text prompts and `[{"role": "assistant", "content": ...}]` for chat
prompts, as in TRL; every function here accepts both. `None` means "not applicable to this row" (e.g. no gold
answer), which the trainer leaves out of the weighted sum.

- math_accuracy: 1.0 when the completion's final answer (\\boxed{...}, else the last number or expression)
  equals the gold answer (column `answer` or `solution`; GSM8K's "... #### 42" form is understood), via
  math-verify. Departs from TRL's accuracy_reward in accepting plain numbers, not only LaTeX.
- format: 1.0 when the completion matches a regex; by default "<think>...</think> <answer>...</answer>",
  or, with `format="boxed"`, a non-empty \\boxed{...} anywhere in the completion.
- overlong_penalty: DAPO's soft length penalty: 0 up to max_tokens - buffer, then falling linearly to -1.
- countdown: 1.0 when the completion's <answer> equation uses the given numbers (each at most once) and
  evaluates to the target.
"""

from __future__ import annotations

import ast
import logging
import operator
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


class _DropTimeoutNotice:
    # math-verify warns whenever its signal-based timeout is off; Tandem runs rewards in worker threads
    # (where signals cannot be used) under its own per-call timeout, so the warning is expected noise.
    def filter(self, record) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader", "math_verify"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())

_EXTRACT = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def completion_text(completion) -> str:
    """The text of a completion, whether a string or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _gold(text) -> str | None:
    if text is None:
        return None
    text = str(text)
    if "####" in text:  # GSM8K: reasoning, then "#### 1,234"
        text = text.split("####")[-1]
    return text.strip().replace(",", "") or None


def math_accuracy(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    golds = answer if answer is not None else solution
    if golds is None:
        raise ValueError("math_accuracy needs a gold-answer column named `answer` or `solution`")
    scores: list[float | None] = []
    for completion, gold_text in zip(completions, golds):
        gold = parse(_gold(gold_text) or "", extraction_config=_EXTRACT, parsing_timeout=None)
        if not gold:
            scores.append(None)  # no usable gold answer: not applicable
            continue
        pred = parse(completion_text(completion), extraction_config=_EXTRACT, parsing_timeout=None)
        scores.append(1.0 if pred and verify(gold, pred, timeout_seconds=None) else 0.0)
    return scores


THINK_ANSWER = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
BOXED = r"\\boxed\{[^{}]+\}"


def format(prompts, completions, format: str = "think_answer", pattern: str | None = None,  # noqa: A001
           **kwargs) -> list[float]:
    """1.0 where the completion matches `pattern` (or the named format: think_answer | boxed), else 0.0."""
    if pattern is None:
        named = {"think_answer": THINK_ANSWER, "boxed": BOXED}
        if format not in named:
            raise ValueError(f"format reward: unknown format {format!r}; use one of {list(named)} or pattern=")
        pattern = named[format]
    regex = re.compile(pattern, re.DOTALL)
    return [1.0 if regex.search(completion_text(c)) else 0.0 for c in completions]


def overlong_penalty(prompts, completions, completion_ids=None, max_tokens: int = 256, buffer: int = 64,
                     **kwargs) -> list[float]:
    if completion_ids is None:
        raise ValueError("overlong_penalty needs completion_ids (the trainer passes them)")
    soft = max_tokens - buffer
    return [max(-1.0, min(0.0, (soft - len(ids)) / buffer)) if buffer > 0 else (-1.0 if len(ids) >= max_tokens
            else 0.0) for ids in completion_ids]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node, used: list[int]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError("only integers, + - * / and parentheses are allowed")


def countdown(prompts, completions, numbers=None, target=None, **kwargs) -> list[float | None]:
    if numbers is None or target is None:
        raise ValueError("countdown needs `numbers` and `target` columns")
    scores: list[float | None] = []
    for completion, nums, goal in zip(completions, numbers, target):
        found = re.findall(r"<answer>(.*?)</answer>", completion_text(completion), re.DOTALL)
        if not found:
            scores.append(0.0)
            continue
        expr = found[-1].split("=")[0].strip()
        used: list[int] = []
        try:
            value = _evaluate(ast.parse(expr, mode="eval"), used)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            scores.append(0.0)
            continue
        pool = list(nums)
        ok = all(pool.remove(u) is None if u in pool else False for u in used)
        scores.append(1.0 if ok and abs(value - goal) < 1e-6 else 0.0)
    return scores
