"""python_tests: a code-execution reward. Each completion's Python code runs against the row's tests in the
sandbox (rewards/sandbox.py): 1.0 when every test passes, 0.0 when one fails or the program crashes, hangs
past its time, or is killed for its memory or process count; the run goes on either way.

    rewards: {functions: [python_tests]}     # dataset column `tests`: Python statements (asserts) per row

The code is the completion's last ```python fenced block (or its whole text when it has none), followed by
the tests. Programs run concurrently (one per core), each in a fresh scratch directory with no network.
`limits` and `on_error` ("zero" or "none": a sandbox that could not run scores None, left out of the
weighted sum) can be set through the reward's options. The sandbox's requirements are checked when the
reward is loaded, so that an unsupported machine fails at start-up with the reason, not mid-run.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from rewards.sandbox import DEFAULT_LIMITS, Limits, run_sandboxed, sandbox_unavailable

FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(completion) -> str:
    text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else text


def python_tests(prompts, completions, tests=None, limits: Limits = DEFAULT_LIMITS, on_error: str = "zero",
                 **kwargs) -> list[float | None]:
    if tests is None:
        raise ValueError("python_tests needs a dataset column `tests` with each row's test code")
    reason = sandbox_unavailable()
    if reason is not None:
        raise RuntimeError(f"python_tests cannot confine model-written code here: {reason}")
    sources = [f"{extract_code(c)}\n\n{t}\n" for c, t in zip(completions, tests)]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:  # the waiting is in subprocesses
        results = list(pool.map(lambda src: run_sandboxed(src, limits), sources))
    scores: list[float | None] = []
    for result in results:
        if result.returncode == 0:
            scores.append(1.0)
        elif (result.returncode is None or result.returncode < 0) and on_error == "none":  # timed out / killed
            scores.append(None)
        else:
            scores.append(0.0)
    return scores
