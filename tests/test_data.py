"""Datasets: built-in tasks, local files, chat templates, prompt checks and the resumable prompt stream."""

import json

import pytest

from rl.config import DataSection
from rl.data import PromptStream, countdown_rows, load_dataset, tokenize_all
from rl.errors import DataError
from rewards.builtin import countdown


def test_builtin_tasks_are_seeded():
    a = load_dataset(DataSection(task="arithmetic", num_examples=5), seed=1)
    b = load_dataset(DataSection(task="arithmetic", num_examples=5), seed=1)
    assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
    assert "What is" in a[0]["prompt"][0]["content"]


def test_countdown_rows_are_solvable_by_their_construction():
    for row in countdown_rows(20, seed=0):
        assert 0 < row["target"] <= 200 and len(row["numbers"]) == 3


def test_countdown_reward_accepts_a_correct_equation():
    assert countdown(None, ["<answer>(4 + 6) * 3</answer>"], numbers=[[3, 4, 6]], target=[30]) == [1.0]


def test_local_jsonl_with_text_prompts_and_extra_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(3)))
    ds = load_dataset(DataSection(path=str(path), prompt_column="question"), seed=0)
    assert ds.column_names == ["prompt", "answer"] and ds[2]["prompt"] == "q2"


def test_missing_file_and_long_prompts(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataSection(path=str(tmp_path / "none.jsonl")), seed=0)

    class Tok:
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(range(len(text.split())))}

    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "short"}, {"prompt": "a much longer prompt than allowed"}])
    with pytest.raises(DataError, match="row 1: the prompt has 6 tokens"):
        tokenize_all(ds, Tok(), DataSection(path="x"), max_prompt_tokens=4)


def test_prompt_stream_resumes_where_it_stopped():
    a = PromptStream(7, seed=3)
    first = a.take(5)
    state = a.state_dict()
    rest = a.take(6)  # crosses into the second epoch
    b = PromptStream(7, seed=3)
    b.load_state_dict(state)
    assert b.take(6) == rest
    assert sorted(first + rest[:2]) == list(range(7))  # each epoch is a permutation
