"""User-facing errors.

Every mistake a user can make (a config typo, a missing dataset column, a reward function that misbehaves, a
model path that does not exist) raises a `TandemError` subclass whose message says what is wrong and how to
fix it. The command-line entry points (rl/cli.py) print that message alone and exit with code 2; anything
else is a bug in Tandem and keeps its traceback.
"""


class TandemError(Exception):
    """A problem with the user's input, reported without a traceback (exit code 2)."""


class ConfigError(TandemError):
    pass


class DataError(TandemError):
    pass


class ModelError(TandemError):
    pass


class RewardError(TandemError):
    pass


class TrainingError(TandemError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""
