"""A reward for examples/calculator.yaml: a small model rarely calls a tool it has only been told about, and
GRPO can only reinforce what it samples. This pays a bonus to a conversation in which the calculator answered
with a value (not an error); math_accuracy still decides whether the final answer is right.

    rewards:
      functions: [math_accuracy, format, examples/calculator_rewards.py:calculator_used]
"""


def calculator_used(prompts, completions, turns=None, **kwargs):
    if turns is None:  # a single-turn run has no turns column: nothing was called
        return [0.0 for _ in completions]
    return [0.5 if any(t["observation"] and not t["observation"].startswith("error") for t in conversation)
            else 0.0 for conversation in turns]
