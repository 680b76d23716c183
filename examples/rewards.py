"""A custom reward module: functions with TRL's signature, loaded as `examples/rewards.py:<name>`.

    rewards:
      functions: [math_accuracy, examples/rewards.py:answer_is_a_number]

Each function receives the prompts, the completions (strings, or [{"role": "assistant", "content": ...}] for
chat prompts) and every dataset column as keyword arguments, and returns one float per completion, or None
where the reward does not apply.
"""

import re


def _text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def answer_is_a_number(prompts, completions, **kwargs):
    """0.5 when the <answer> tag holds a bare number: a cheap shaping reward that precedes correctness."""
    scores = []
    for completion in completions:
        found = re.findall(r"<answer>\s*(.*?)\s*</answer>", _text(completion), re.DOTALL)
        scores.append(0.5 if found and re.fullmatch(r"-?[\d,]*\.?\d+", found[-1]) else 0.0)
    return scores


def brevity(prompts, completions, completion_ids, **kwargs):
    """Prefer short completions: 1 at 0 tokens, 0 at 256 and beyond."""
    return [max(0.0, 1.0 - len(ids) / 256) for ids in completion_ids]
