"""Multi-turn rollouts: the model writes a turn, an environment answers, the model goes on.

    env_cls = load_environment("rollout.tools:Calculator")          # or "pkg.mod:Class", "path/file.py:Class"
    envs, prompts = open_conversations(rows, num_generations, env_cls, tokenizer, timeout_s, max_prompt_tokens)
    convs = run_turns(engine.generate, tokenizer, envs, prompts, params, max_turns, timeout_s, eos_ids)

One environment instance per completion (the Environment protocol below, as in DESIGN.md). The turn loop is
token-in, token-out and shared by both engines: a conversation is a list of token ids that only grows. The
model's turns are the engine's own tokens (its stop token kept); an environment's answer is rendered with the
chat template's tool role and appended as tokens; nothing written before is tokenized again. Each conversation
carries a mask over what follows the prompt: 1 on the model's tokens (trained, with their sampling
log-probabilities), 0 on the environment's (not trained; their log-probabilities are 0 and unused).

A conversation ends when the environment says done, at `max_turns` model turns, when the model stops for
length, or when the tokens after the prompt reach `params.max_tokens`. An environment that raises, returns
something malformed or takes longer than `timeout_s` ends its conversation with a record of what happened
(`Conversation.error`); the other conversations and the run go on.

Each turn is one call of `engine.generate` on the conversations still running, each conversation whole as its
prompt. Inside `with engine.conversations():` the native engine recognizes the conversations it generated the
last turn of and prefills only what is new, going on from their KV cache (rollout/native.py); vLLM prefills
each conversation again. Sampling noise: each conversation is its own prompt (n = 1), and both engines draw
distinct noise for distinct prompts of one call; the seed changes with the turn.
"""

from __future__ import annotations

import difflib
import threading
from dataclasses import dataclass, field, replace
from typing import Protocol

from rl.errors import TandemError
from rl.imports import import_where
from rollout.engine import Completion, SamplingParams


class Environment(Protocol):
    def reset(self, row: dict) -> list[dict]:
        """The conversation's opening messages ({role, content}), from one dataset row."""

    def step(self, completion_text: str) -> tuple[str | None, float | None, bool]:
        """The model's last turn -> (observation or None, reward for that turn or None, done)."""


class EnvironmentSetupError(TandemError):
    """A bad `rollout.environment` or an environment that cannot open a conversation: what is wrong, how to fix
    it. (An environment failing in a step ends that conversation only, recorded in Conversation.error.)"""


@dataclass
class Conversation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # everything after the prompt, both sides
    mask: list[int] = field(default_factory=list)  # 1 = the model's token, 0 = the environment's
    logprobs: list[float] = field(default_factory=list)  # sampling log-probs; 0.0 on the environment's tokens
    # one entry per model turn the environment stepped on: {completion, observation, reward} (the `turns` column)
    history: list[dict] = field(default_factory=list)
    turns: int = 0  # model turns
    tool_calls: int = 0  # environment answers appended
    finish_reason: str = "stop"  # "stop" | "length"
    error: str | None = None  # why the environment ended the conversation early, if it did
    done: bool = False


def load_environment(spec: str) -> type:
    """An environment class from `pkg.module:Class` or `path/to/file.py:Class` (a built-in: rollout.tools)."""
    if ":" not in spec:
        raise EnvironmentSetupError(f"rollout.environment {spec!r}: use pkg.module:Class or path/to/file.py:Class "
                                "(built-ins: rollout.tools:Calculator, rollout.tools:PythonTool)")
    where, _, attr = spec.rpartition(":")
    module = import_where(where, f"rollout.environment {spec!r}", EnvironmentSetupError, "tandem_environment")
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        names = [n for n in dir(module) if isinstance(getattr(module, n), type) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvironmentSetupError(f"rollout.environment {spec!r}: {where} has no class {attr!r} with reset(row) and "
                                f"step(completion_text){hint}; it has: {', '.join(names) or 'no classes'}")
    return cls


def tool_tokens(tokenizer, observation: str, end_of_turn_ids: list[int]) -> list[int]:
    """The tokens that put `observation` in the conversation as a tool message and open the model's next turn,
    rendered by the chat template and cut from a reference conversation, so that what came before is never
    tokenized again. The model's turn ends at its end-of-turn token (the model's EOS); what the template writes
    after that token (a newline in ChatML) comes first."""
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    before = _template(tokenizer, base, generation_prompt=False)
    after = _template(tokenizer, base + [{"role": "tool", "content": observation}], generation_prompt=True)
    if after[:len(before)] != before:
        raise EnvironmentSetupError("the chat template renders earlier messages differently once a tool message "
                                    "follows them; multi-turn rollouts need a template that only appends")
    ends = [j for j, t in enumerate(before) if t in end_of_turn_ids]
    separator = before[ends[-1] + 1:] if ends else []
    return separator + after[len(before):]


def _template(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise EnvironmentSetupError("multi-turn rollouts need a tokenizer with a chat template (the tool role); this "
                                "one has none: set model.tokenizer to one that has")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _call(fn, args: tuple, timeout_s: float):
    """fn(*args) in a daemon thread: -> (result, None) or (None, what went wrong). A call that does not return
    within timeout_s is abandoned (a thread cannot be killed; the environment's own code must not block forever
    on a resource the run needs)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (the environment's failure is recorded, never raised here)
            box["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target, name="tandem-environment", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, f"timed out after {timeout_s:g} s (rollout.environment_timeout_s)"
    if "error" in box:
        return None, f"raised {box['error']}"
    return box.get("value"), None


def _checked_step(value) -> tuple[str | None, float | None, bool]:
    if not (isinstance(value, tuple) and len(value) == 3):
        raise TypeError(f"step() must return (observation or None, reward or None, done), got {value!r:.80}")
    observation, reward, done = value
    if observation is not None and not isinstance(observation, str):
        raise TypeError(f"step()'s observation must be a string or None, got {type(observation).__name__}")
    if reward is not None and not isinstance(reward, (int, float)):
        raise TypeError(f"step()'s reward must be a number or None, got {type(reward).__name__}")
    if not isinstance(done, bool):
        raise TypeError(f"step()'s done must be True or False, got {type(done).__name__}")
    return observation, None if reward is None else float(reward), done


def open_conversations(rows: list[dict], num_generations: int, env_cls: type, tokenizer, timeout_s: float,
                       max_prompt_tokens: int) -> tuple[list, list[list[int]]]:
    """One environment per completion (num_generations per row, groups contiguous), each reset on its row.
    -> (environments, the prompt's token ids for each). The G environments of a row must open alike: GRPO
    compares completions of one prompt."""
    envs, prompts = [], []
    for i, row in enumerate(rows):
        first = None
        for _ in range(num_generations):
            env = env_cls()
            messages, error = _call(env.reset, (row,), timeout_s)
            if error is not None:
                raise EnvironmentSetupError(f"the environment's reset() on row {i} {error}; fix the environment")
            if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m
                                                                    for m in messages)):
                raise EnvironmentSetupError(f"the environment's reset() on row {i} must return a non-empty list of "
                                        f"{{role, content}} messages, got {messages!r:.80}")
            ids = _template(tokenizer, messages, generation_prompt=True)
            if first is not None and ids != first:
                raise EnvironmentSetupError(f"the environment's reset() opened row {i} differently for two of its "
                                        f"{num_generations} completions; GRPO needs one prompt per group")
            if len(ids) > max_prompt_tokens:
                raise EnvironmentSetupError(f"row {i}: the environment's opening has {len(ids)} tokens, more than "
                                        f"rollout.max_prompt_tokens = {max_prompt_tokens}; raise it")
            first = ids
            envs.append(env)
            prompts.append(ids)
    return envs, prompts


def run_turns(generate, tokenizer, envs: list, prompts: list[list[int]], params: SamplingParams,
              max_turns: int, timeout_s: float, end_of_turn_ids: list[int]) -> list[Conversation]:
    """The turn loop. `generate(prompt_token_ids, params) -> list[list[Completion]]` is an engine's (n = 1: each
    conversation is its own prompt). `params.max_tokens` caps the tokens after the prompt, both sides together;
    a turn is cut where it would pass that. `end_of_turn_ids`: the model's EOS tokens, which the chat template
    writes at the end of a turn (params.stop_token_ids may hold more)."""
    convs = [Conversation(prompt_ids=list(p)) for p in prompts]
    for turn in range(max_turns):
        live = [i for i, c in enumerate(convs) if not c.done]
        if not live:
            break
        room = {i: params.max_tokens - len(convs[i].token_ids) for i in live}
        seed = None if params.seed is None else params.seed + 7_919 * turn
        outs = generate([convs[i].prompt_ids + convs[i].token_ids for i in live],
                        replace(params, n=1, max_tokens=max(room.values()), seed=seed))
        for i, group in zip(live, outs):
            out = group[0]
            if len(out.token_ids) > room[i]:  # its share of max_tokens ends inside this turn
                out = Completion(out.token_ids[:room[i]], out.logprobs[:room[i]], "length")
            _model_turn(convs[i], envs[i], out, tokenizer, params.max_tokens, turn + 1 == max_turns, timeout_s,
                        end_of_turn_ids)
    return convs


def _model_turn(conv: Conversation, env, out: Completion, tokenizer, max_tokens: int, last_turn: bool,
                timeout_s: float, end_of_turn_ids: list[int]) -> None:
    conv.token_ids += out.token_ids
    conv.mask += [1] * len(out.token_ids)
    conv.logprobs += list(out.logprobs)
    conv.turns += 1
    if out.finish_reason == "length":  # cut off mid-turn: nothing for the environment to answer
        conv.finish_reason, conv.done = "length", True
        return
    text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    value, error = _call(env.step, (text,), timeout_s)
    if error is None:
        try:
            observation, reward, done = _checked_step(value)
        except TypeError as e:
            error = str(e)
    if error is not None:
        conv.error, conv.done = f"environment step {conv.turns}: {error}", True
        return
    conv.history.append({"completion": text, "observation": observation, "reward": reward})
    if done or observation is None or last_turn:
        conv.done = True
        return
    answer = tool_tokens(tokenizer, observation, end_of_turn_ids)
    if len(conv.token_ids) + len(answer) >= max_tokens:  # no room left for the model to read it and go on
        conv.finish_reason, conv.done = "length", True
        return
    conv.token_ids += answer
    conv.mask += [0] * len(answer)
    conv.logprobs += [0.0] * len(answer)
    conv.tool_calls += 1
