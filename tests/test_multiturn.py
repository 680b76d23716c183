"""Multi-turn rollouts on the CPU (rollout/environment.py, rollout/tools.py, the trainer's loss mask).

A tiny random model rarely writes its end-of-sequence token, so these tests end its turns with a wide set of
stop tokens (STOPS: about 40% of what it samples): conversations of several short turns. Greedy decoding is
compared with a turn-by-turn HF generate reference up to fp32 near-ties (tests/helpers.py greedy_partings),
never token for token across batch shapes.
"""

import json
import time
from contextlib import nullcontext

import pytest
import torch

from rl.model import unwrap
from rl.trainer import GRPOTrainer, loss_mask
from rollout import NativeEngine, SamplingParams
from rollout.engine import Completion
from rollout.environment import EnvironmentSetupError, load_environment, open_conversations, run_turns, tool_tokens
from rollout.native import eos_token_ids
from rollout.tools import Calculator, PythonTool, calculate
from rewards.sandbox import sandbox_unavailable
from tests.environments import Echo, HangsInStep, MalformedStep, OpensDifferently, RaisesInReset, RaisesInStep
from tests.helpers import greedy_partings, run_config, tiny_policy

ROWS = [{"prompt": "What is 2 + 3?"}, {"prompt": "Name a number."}]
STOPS = [2] + list(range(1000, 20000))  # the EOS and ~40% of a random model's samples
# ~12%: turns of ~8 tokens, long enough that decoding and encoding them again would change some (a third of
# random 10-token sequences do), so that a turn loop that tokenized what came before again is seen
LONGER_TURNS = [2] + list(range(1000, 6000))
TIE = 1e-4  # fp32 near-ties (tests/test_native_engine.py)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("tiny")


def converse(policy, env_cls, params, max_turns=3, timeout_s=5.0, calls=None, rows=ROWS, g=2, continuing=False,
             max_length=None):
    """continuing: inside engine.conversations() (each turn goes on from the conversation's KV cache), with a
    cache of max_length positions (the trainer's: prompt + 2 x max_tokens)."""
    engine = NativeEngine(policy.model, policy.tokenizer, max_length=max_length)

    def generate(ids, p):
        before = engine.prefilled_tokens
        outs = engine.generate(ids, p)
        if calls is not None:
            calls.append((ids, outs, engine.prefilled_tokens - before))
        return outs

    envs, prompts = open_conversations(rows, g, env_cls, policy.tokenizer, timeout_s, 512)
    eot = eos_token_ids(unwrap(policy.model), policy.tokenizer)
    with engine.conversations() if continuing else nullcontext():
        convs = run_turns(generate, policy.tokenizer, envs, prompts, params, max_turns, timeout_s, eot)
    return prompts, convs, eot


def test_the_mask_covers_exactly_the_models_tokens_and_nothing_is_retokenized(policy):
    calls = []
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=3, stop_token_ids=LONGER_TURNS)
    prompts, convs, eot = converse(policy, Echo, params, max_turns=3, calls=calls)
    assert len(calls) == 3 and sum(c.tool_calls for c in convs) >= 4  # several turns happened
    for i, conv in enumerate(convs):
        assert len(conv.token_ids) == len(conv.mask) == len(conv.logprobs) <= params.max_tokens
        turns = [(ids[live.index(i)], outs[live.index(i)][0])  # this conversation's (prompt, output) per turn
                 for t, (ids, outs, _) in enumerate(calls)
                 for live in [[k for k, c in enumerate(convs) if c.turns > t]] if i in live]
        assert len(turns) == conv.turns
        model_tokens = 0
        for k, (prompt, out) in enumerate(turns):
            # the turn's prompt is the conversation as it stays: nothing before it was tokenized again
            assert prompt == (conv.prompt_ids + conv.token_ids)[:len(prompt)]
            start = len(prompt) - len(conv.prompt_ids)
            own = out.token_ids[:params.max_tokens - start]
            end = start + len(own)
            assert conv.token_ids[start:end] == own and conv.mask[start:end] == [1] * len(own)
            assert conv.logprobs[start:end] == out.logprobs[:len(own)]
            model_tokens += len(own)
            # between this turn and the next: the environment's answer, rendered by the chat template, masked
            following = len(turns[k + 1][0]) - len(conv.prompt_ids) if k + 1 < len(turns) else len(conv.token_ids)
            if following > end:
                answer = tool_tokens(policy.tokenizer, conv.history[k]["observation"], eot)
                assert conv.token_ids[end:following] == answer and conv.mask[end:following] == [0] * len(answer)
                assert policy.tokenizer.decode(answer).startswith("\n<|im_start|>tool\nseen ")
        assert sum(conv.mask) == model_tokens
    # the trainer's loss mask is the conversations' mask, padded
    width = max(len(c.token_ids) for c in convs)
    batch = {"completion_ids": [c.token_ids for c in convs], "completion_masks": [c.mask for c in convs],
             "truncated": torch.tensor([False] * len(convs))}
    expected = torch.tensor([c.mask + [0] * (width - len(c.mask)) for c in convs], dtype=torch.float32)
    assert torch.equal(loss_mask(batch, width, mask_truncated=False), expected)


def reference_turns(policy, env, prompt, params, max_turns, eot) -> list[int]:
    """Turn by turn with HF generate (greedy), the environment's answers appended as tool_tokens renders them."""
    ids = []
    for turn in range(max_turns):
        room = params.max_tokens - len(ids)
        x = torch.tensor([prompt + ids])
        out = policy.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=room,
                                    do_sample=False, eos_token_id=STOPS, pad_token_id=0)
        new = out[0, x.shape[1]:].tolist()
        ids += new
        if new[-1] not in STOPS:  # cut at max_tokens
            break
        observation, _, done = env.step(policy.tokenizer.decode(new, skip_special_tokens=True))
        answer = tool_tokens(policy.tokenizer, observation, eot)
        if done or turn + 1 == max_turns or len(ids) + len(answer) >= params.max_tokens:
            break
        ids += answer
    return ids


@pytest.mark.parametrize("continuing", [False, True], ids=["prefilled-each-turn", "kv-cache-kept"])
def test_greedy_multiturn_follows_a_turn_by_turn_generate_reference(policy, continuing):
    params = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=STOPS)
    prompts, convs, eot = converse(policy, Echo, params, max_turns=4, continuing=continuing,
                                   max_length=max(map(len, prompts_of(policy))) + 2 * 48)
    policy.model.eval()
    with torch.no_grad():
        theirs = [reference_turns(policy, Echo(), p, params, 4, eot) for p in prompts]
    assert max(c.turns for c in convs) >= 2
    agreed = greedy_partings(policy.model, prompts, [[Completion(c.token_ids, [], "stop")] for c in convs],
                             [[Completion(t, [], "stop")] for t in theirs], TIE)
    assert sum(agreed) >= sum(len(t) for t in theirs) // 2  # partings are rare near-ties, not the rule


def prompts_of(policy, rows=ROWS):
    return open_conversations(rows, 1, Echo, policy.tokenizer, 5.0, 512)[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_continuing_conversations_prefills_only_what_is_new_and_samples_what_the_trainer_scores(policy, device,
                                                                                                 caplog):
    """Inside engine.conversations() a turn prefills the last generated token and the environment's answer,
    not the conversation again, and what it samples is what the trainer scores: the sampling log-probabilities
    of every model token equal a teacher-forced forward of the whole conversation (fp32). On CUDA the decode
    steps are CUDA graphs, replayed on rows that were permuted and packed between turns (with this test's
    thousands of stop tokens, which torch.isin could not check inside a graph)."""
    if device == "cuda":
        policy = tiny_policy("tiny")
        policy.model.to(device)
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=5, stop_token_ids=LONGER_TURNS)
    calls = []
    prompts, convs, _ = converse(policy, Echo, params, max_turns=4, calls=calls, continuing=True,
                                 max_length=max(map(len, prompts_of(policy))) + 2 * 64)
    assert len(calls) >= 3
    assert "cannot be captured" not in caplog.text
    seqs = {}  # a conversation's tokens after its last turn -> the tokens that turn left
    for t, (ids, outs, prefilled) in enumerate(calls):
        if t == 0:
            assert prefilled == len(ids) * max(map(len, ids))  # whole prompts, left-padded
        else:  # each conversation's last generated token and the answer to it, left-padded
            new = [len(p) - (len(next(s for s in seqs if p[:len(s)] == list(s))) - 1) for p in ids]
            assert prefilled == len(ids) * max(new) < len(ids) * max(map(len, ids))
        seqs = {tuple(p + o[0].token_ids): None for p, o in zip(ids, outs)}
    policy.model.eval()
    for prompt, conv in zip(prompts, convs):
        full = torch.tensor([prompt + conv.token_ids], device=device)
        with torch.no_grad():
            logits = policy.model(input_ids=full).logits[0, len(prompt) - 1:-1].float().cpu()
        theirs = logits.log_softmax(-1).gather(-1, torch.tensor(conv.token_ids)[:, None]).squeeze(1)
        mine, model = torch.tensor(conv.logprobs), torch.tensor(conv.mask, dtype=torch.bool)
        torch.testing.assert_close(mine[model], theirs[model], rtol=0, atol=1e-4)


def test_a_cache_too_short_for_the_next_turn_prefills_the_conversations_again(policy):
    """Without the extra room (a cache of prompt + max_tokens), a turn that does not fit after the longest row
    falls back to prefilling whole conversations, and greedy output is what the continuing engine writes."""
    params = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=STOPS)
    short, long = [], []
    prompts, tight, _ = converse(policy, Echo, params, max_turns=4, calls=short, continuing=True)
    _, roomy, _ = converse(policy, Echo, params, max_turns=4, calls=long, continuing=True,
                           max_length=max(map(len, prompts)) + 2 * 48)
    whole = [len(ids) * max(map(len, ids)) for ids, _, _ in short]
    assert any(p == w for (_, _, p), w in zip(short[1:], whole[1:]))  # some turn was prefilled whole
    assert sum(p for _, _, p in short) > sum(p for _, _, p in long)
    agreed = greedy_partings(policy.model, prompts, [[Completion(c.token_ids, [], "stop")] for c in tight],
                             [[Completion(c.token_ids, [], "stop")] for c in roomy], TIE)
    assert sum(agreed) >= sum(len(c.token_ids) for c in roomy) // 2


def test_an_environment_that_fails_ends_its_conversation_and_the_others_go_on(policy):
    engine = NativeEngine(policy.model, policy.tokenizer)
    _, prompts = open_conversations(ROWS[:1], 4, Echo, policy.tokenizer, 5.0, 512)
    envs = [Echo(), RaisesInStep(), HangsInStep(), MalformedStep()]
    eot = eos_token_ids(unwrap(policy.model), policy.tokenizer)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, stop_token_ids=STOPS)
    start = time.perf_counter()
    convs = run_turns(engine.generate, policy.tokenizer, envs, prompts, params, 3, 0.5, eot)
    assert time.perf_counter() - start < 3.0  # the hanging step was left behind, not waited for
    assert convs[0].error is None and convs[0].tool_calls >= 1
    assert convs[1].error == "environment step 1: raised KeyError: 'no such tool'"
    assert convs[2].error == "environment step 1: timed out after 0.5 s (rollout.environment_timeout_s)"
    assert convs[3].error.startswith("environment step 1: step() must return (observation or None, reward or None")
    for c in convs[1:]:
        assert c.turns == 1 and c.tool_calls == 0 and sum(c.mask) == len(c.token_ids)


def test_environments_that_cannot_open_a_conversation_stop_with_one_message(policy, tmp_path):
    with pytest.raises(EnvironmentSetupError, match=r"reset\(\) on row 0 raised ValueError: row has no question"):
        open_conversations(ROWS, 2, RaisesInReset, policy.tokenizer, 5.0, 512)
    with pytest.raises(EnvironmentSetupError, match="opened row 0 differently for two of its 2 completions"):
        open_conversations(ROWS, 2, OpensDifferently, policy.tokenizer, 5.0, 512)
    with pytest.raises(EnvironmentSetupError, match="more than rollout.max_prompt_tokens = 4"):
        open_conversations(ROWS, 2, Echo, policy.tokenizer, 5.0, 4)


def test_load_environment_forms_and_mistakes(tmp_path):
    assert load_environment("rollout.tools:Calculator") is Calculator
    assert load_environment("tests/environments.py:Echo")().step("abc") == ("seen 3 characters", 0.5, False)
    with pytest.raises(EnvironmentSetupError, match="has no class 'Calculater'.*did you mean 'Calculator'"):
        load_environment("rollout.tools:Calculater")
    with pytest.raises(EnvironmentSetupError, match="does not exist"):
        load_environment(f"{tmp_path}/none.py:Env")
    with pytest.raises(EnvironmentSetupError, match="use pkg.module:Class"):
        load_environment("Calculator")


def test_the_calculator_computes_arithmetic_and_nothing_else():
    assert calculate("12 * (3 + 4)") == "84"
    assert calculate("7 / 2") == "3.5" and calculate("-2 ** 3") == "-8" and calculate("17 % 5") == "2"
    assert calculate("2 ** 60") == str(2**60) and calculate("6 / 3") == "2"
    assert calculate("1 / 0") == "error: division by zero"
    assert calculate("9 ** 9 ** 9") == "error: exponent larger than 64"
    assert calculate("((10 ** 64) ** 64) ** 64") == "error: a number larger than 2 ** 4096"  # refused, not computed
    assert calculate("__import__('os').getcwd()").startswith("error: only numbers")
    assert calculate("2 +") == "error: not an arithmetic expression"
    assert calculate("(-8) ** (1 / 3)") == "error: the result is not a real number"
    env = Calculator()
    opening = env.reset({"prompt": "What is 6 * 7?"})
    assert [m["role"] for m in opening] == ["system", "user"] and opening[1]["content"] == "What is 6 * 7?"
    assert env.step("Let me see. <calculator>6 * 7</calculator>") == ("42", None, False)
    assert env.step("<calculator>1+1</calculator> then <calculator>2*3</calculator>") == ("6", None, False)
    assert env.step("The answer is 42.") == (None, None, True)


def test_a_multiturn_grpo_run_records_turns_and_trains(tmp_path):
    cfg = run_config(tmp_path, rollout={"environment": "tests/environments.py:Echo", "max_turns": 3,
                                        "max_tokens": 24, "stop_token_ids": list(range(1000, 20000))},
                     tracking={"progress": False, "report": False, "log_completions_every": 1})
    trainer = GRPOTrainer(cfg)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["env/turns"] > 1 and r["env/tool_calls"] > 0 for r in rows)
    assert all(r["env/errors"] == 0 and r["grad_norm"] > 0 for r in rows)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["turns"] >= 1 and "tool_calls" in s and s["environment_error"] is None for s in samples)
    assert any("seen " in s["completion"] for s in samples)  # the environment's answers are in the text scored


def test_the_turns_column_reaches_the_reward_functions(tmp_path):
    cfg = run_config(tmp_path, rollout={"environment": "tests/environments.py:Echo", "max_turns": 2,
                                        "max_tokens": 24, "stop_token_ids": list(range(1000, 20000))},
                     rewards={"functions": ["tests/reward_fns.py:turn_rewards"]},
                     train={"max_steps": 1})
    trainer = GRPOTrainer(cfg)
    batch = trainer.rollout(trainer.take(2), 1)
    rewards, _ = trainer.score(batch)
    expected = [sum(t["reward"] for t in turns) for turns in batch["turns"]]
    assert rewards.tolist() == pytest.approx(expected) and max(expected) > 0


@pytest.mark.skipif(sandbox_unavailable() is not None, reason=f"the Python tool's sandbox: {sandbox_unavailable()}")
def test_the_calculator_examples_bonus_pays_for_a_value_and_nothing_else():
    import importlib.util

    spec = importlib.util.spec_from_file_location("calculator_rewards", "examples/calculator_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    turns = [[{"completion": "<calculator>2+3</calculator>", "observation": "5", "reward": None}],
             [{"completion": "<calculator>x</calculator>", "observation": "error: not an arithmetic expression",
               "reward": None}], []]
    assert module.calculator_used([""] * 3, [""] * 3, turns=turns) == [0.5, 0.0, 0.0]
    assert module.calculator_used([""] * 2, [""] * 2) == [0.0, 0.0]  # a single-turn run


def test_the_calculator_sft_task_demonstrates_the_call_and_its_reading(policy):
    """data.task calculator (the warm start of examples/calculator_sft.yaml): even rows end in the call, odd
    rows read the tool's answer (rendered with the chat template's tool role) into \\boxed{}; the values are
    the calculator's own. Other objectives are refused."""
    from rl.config import OfflineDataSection
    from rl.errors import DataError
    from rl.offline_data import load_examples

    tok = policy.tokenizer
    examples = load_examples("sft", OfflineDataSection(task="calculator", num_examples=4), tok, 0)
    for i, ex in enumerate(examples):
        prompt, completion = tok.decode(ex["prompt"]), tok.decode(ex["completion"], skip_special_tokens=True)
        expression = prompt.split("What is ", 1)[1].split("?", 1)[0]
        assert "<calculator>expression</calculator>" in prompt  # the environment's system message
        if i % 2 == 0:
            assert completion == f"<calculator>{expression}</calculator>"
        else:
            value = calculate(expression)
            assert f"<|im_start|>tool\n{value}<|im_end|>" in prompt
            assert completion.endswith(f"\\boxed{{{value}}}.") and prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match="data.task calculator makes SFT examples"):
        load_examples("dpo", OfflineDataSection(task="calculator", num_examples=2), tok, 0)


def test_the_python_tool_runs_code_in_the_sandbox_and_reports_errors():
    tool = PythonTool()
    tool.wall_s = 2.0
    assert tool.step("I will compute. <python>print(6 * 7)</python>") == ("42", None, False)
    assert tool.step("<python>1 / 0</python>") == ("error: ZeroDivisionError: division by zero", None, False)
    assert tool.step("<python>import socket; socket.create_connection(('1.1.1.1', 53), timeout=1)</python>")[0] \
        .startswith("error: ")  # no network in the sandbox
    assert tool.step("<python>while True: pass</python>") == ("error: timed out after 2 s", None, False)
    assert tool.step("The answer is 42.") == (None, None, True)


def test_config_mistakes_about_environments_are_one_message_each(tmp_path):
    from rl.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout.environment is 'Calculator'; use pkg.module:Class"):
        run_config(tmp_path, rollout={"environment": "Calculator"})
    with pytest.raises(ConfigError, match="rollout.max_turns is 0"):
        run_config(tmp_path, rollout={"environment": "rollout.tools:Calculator", "max_turns": 0})
    with pytest.raises(ConfigError, match="eval.every with rollout.environment"):
        run_config(tmp_path, rollout={"environment": "rollout.tools:Calculator"}, eval={"every": 5})


def test_an_environment_that_cannot_open_stops_the_run_at_start_up(tmp_path):
    cfg = run_config(tmp_path, rollout={"environment": "tests/environments.py:RaisesInReset"})
    with pytest.raises(EnvironmentSetupError, match="reset\\(\\) on row 0 raised ValueError: row has no question"):
        GRPOTrainer(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
