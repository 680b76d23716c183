"""Reward functions: the protocol, the loader, the built-ins and the concurrent runner.

A reward function has TRL's signature, so TRL's and Unsloth's reward functions work unchanged:

    fn(prompts: list, completions: list, **columns) -> list[float | None]     # None = not applicable

`columns` are the dataset's other columns (one value per completion) plus `completion_ids`.

    from rewards import load_reward
    fn = load_reward("math_accuracy")             # built-in | "pkg.mod:fn" | "path/file.py:fn"
"""

from rewards.registry import BUILTINS, load_reward
from rewards.runner import RewardRunner

__all__ = ["BUILTINS", "RewardRunner", "load_reward"]
