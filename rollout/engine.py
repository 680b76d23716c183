"""The rollout engine protocol shared by the native and vLLM engines.

    engine.generate(prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]

returns, for each prompt, `params.n` completions. `Completion.logprobs` are the log-probabilities of the chosen
tokens under the distribution actually sampled from (temperature, top-k and top-p applied, as vLLM's
"processed_logprobs"); the trainer uses them for the truncated importance-sampling correction. A generated
stop token is kept as the last token of `token_ids` so that the policy learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1
    stop_token_ids: list[int] | None = None  # None = the tokenizer's end-of-sequence token(s)
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1 or self.n < 1:
            raise ValueError(f"max_tokens and n must be >= 1, got {self.max_tokens} and {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    text: str | None = field(default=None, repr=False)


class Engine(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        ...
