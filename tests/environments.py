"""Environments used by the tests, loaded by path as users' environment files are."""

import time


class Echo:
    """Answers every turn with what it saw (its length), a reward of 0.5 per answer; never says done."""

    def reset(self, row):
        prompt = row["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def step(self, completion_text):
        return f"seen {len(completion_text)} characters", 0.5, False


class RaisesInStep(Echo):
    def step(self, completion_text):
        raise KeyError("no such tool")


class HangsInStep(Echo):
    def step(self, completion_text):
        time.sleep(3)
        return "late", None, False


class MalformedStep(Echo):
    def step(self, completion_text):
        return "an observation alone"


class RaisesInReset(Echo):
    def reset(self, row):
        raise ValueError("row has no question")


class OpensDifferently(Echo):
    """Each instance opens with another message: a group would not share one prompt."""
    count = 0

    def reset(self, row):
        OpensDifferently.count += 1
        return [{"role": "user", "content": f"{row['prompt']!s} ({OpensDifferently.count})"}]
