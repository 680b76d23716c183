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


def token_value_or_none(prompts, completions, completion_ids, **kwargs):
    # a second reward that is sometimes not applicable (None): for rewards.normalize per_function
    return [None if not ids or ids[0] % 5 == 0 else ids[-1] % 7 for ids in completion_ids]


def wide_token_reward(prompts, completions, completion_ids, **kwargs):
    # a reward with a range 1000 times token_reward's, which would drown it in a plain sum
    return [1000.0 * (ids[0] % 2) if ids else 0.0 for ids in completion_ids]


def flat_unless_multiple_of_3(prompts, completions, completion_ids, answer, **kwargs):
    # no signal unless the answer is a multiple of 3 (elsewhere every completion scores 0.5), token_reward there
    return [sum(ids) % 97 / 97 if int(a) % 3 == 0 else 0.5 for a, ids in zip(answer, completion_ids)]


def turn_rewards(prompts, completions, turns, **kwargs):
    # multi-turn: the environment's per-turn rewards, summed
    return [sum(t["reward"] or 0.0 for t in conversation) for conversation in turns]
