"""Reward functions: the protocol, the loader, the built-ins and the concurrent runner.

A reward function has TRL's signature, so TRL's and Unsloth's reward functions work unchanged:

    fn(prompts: list, completions: list, **columns) -> list[float | None]     # None = not applicable

`columns` are the dataset's other columns (one value per completion) plus `completion_ids`. Completions are
strings for text prompts and [{"role": "assistant", "content": ...}] for chat prompts (every built-in task's);
`completion_text(c)` is the text of either.

    from rewards import load_reward, completion_text
    fn = load_reward("math_accuracy")             # built-in | "pkg.mod:fn" | "path/file.py:fn"
"""

from rewards.builtin import completion_text
from rewards.registry import BUILTINS, load_reward
from rewards.runner import RewardRunner

__all__ = ["BUILTINS", "RewardRunner", "completion_text", "load_reward"]
