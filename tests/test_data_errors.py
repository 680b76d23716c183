"""A data file the loader refuses is reported with the file, the line and what is wrong with it (datasets'
own error says only "An error occurred while generating the dataset")."""

import json

import pytest

from rl.config import DataSection, OfflineDataSection
from rl.data import load_dataset
from rl.errors import DataError

GOOD = json.dumps({"prompt": "What is 1 + 1?", "answer": "2"})


def _load(path):
    return load_dataset(DataSection(path=str(path)), seed=0)


def test_a_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([GOOD] * 6 + ['{"prompt": "What is 2 + 2?", "answer": }'] + [GOOD] * 3) + "\n")
    with pytest.raises(DataError) as caught:
        _load(path)
    assert str(caught.value).startswith(f"data.path {path} line 7: not valid JSON (Expecting value, column 40)")
    assert "\n" not in str(caught.value)


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(f"{GOOD}\n\n[1, 2]\n{GOOD}\n")  # the blank line counts: line numbers are the editor's
    with pytest.raises(DataError, match=r"x\.jsonl line 3: not a JSON object .* got list"):
        _load(path)


def test_a_broken_json_document_and_a_ragged_csv_are_named(tmp_path):
    doc = tmp_path / "x.json"
    doc.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b"\n]\n')
    with pytest.raises(DataError, match=r"x\.json line 4: not valid JSON \(Expecting ',' delimiter, column 1\)"):
        _load(doc)
    table = tmp_path / "x.csv"
    table.write_text("prompt,answer\na,1\nb,2\nc,3,4\n")
    with pytest.raises(DataError, match=r"x\.csv line 4: 3 fields, the header has 2"):
        _load(table)


def test_an_offline_row_problem_names_its_line(tmp_path):
    from rl.offline_data import load_examples

    class Tok:
        eos_token_id, chat_template = 0, None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] * len(text.split())}

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: column 'rejected' must be non-empty text, got None"):
        load_examples("dpo", OfflineDataSection(path=str(path)), Tok(), seed=0)
