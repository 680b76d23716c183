"""Reward functions used by the tests, loaded by path as users' reward files are."""

import math


def token_reward(prompts, completions, completion_ids, **kwargs):
    # varies across completions of random models, so that advantages (and gradients) are non-zero
    return [sum(ids) % 97 / 97 for ids in completion_ids]


def raises(prompts, completions, **kwargs):
    raise KeyError("gold_answer")


def wrong_count(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def returns_nan(prompts, completions, **kwargs):
    return [math.nan for _ in completions]


def sleeps(prompts, completions, **kwargs):
    import time

    time.sleep(5)
    return [0.0 for _ in completions]


def constant(prompts, completions, **kwargs):
    # the same score for every completion: no learning signal at all
    return [0.5 for _ in completions]


def token_value(prompts, completions, completion_ids, **kwargs):
    # the first token, scripted by tests/test_eval.py's engine: 0, 1, 2 -> 0.0, 0.5, 1.0; 3 -> None (not applicable)
    return [None if ids[0] == 3 else ids[0] / 2 for ids in completion_ids]
