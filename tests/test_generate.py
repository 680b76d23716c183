"""`python -m rl.generate RUN_DIR` on a real run: a 1-step GRPO run of the tiny random model (native engine).

What it prints is checked against an independent path: the base rebuilt from the run's config, the final adapter
loaded by PEFT's own PeftModel.from_pretrained, and HF `generate` (greedy), with the adapters on (trained) and
off (base). Chat reads piped stdin in a subprocess, as a user runs it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rl.generate import main
from tests.helpers import run_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 2 + 3?", "Name a colour."]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from rl.trainer import GRPOTrainer

    tmp = tmp_path_factory.mktemp("generate")
    GRPOTrainer(run_config(tmp, train={"max_steps": 1, "save_every": 1})).train()
    return tmp / "run"


def blocks(stdout: str) -> list[dict]:
    """The printed prompts, each {"prompt": ..., "base": ..., "trained": ...}."""
    out, label = [], None
    for line in stdout.splitlines():
        if line.startswith("=== ["):
            out.append({"prompt": line.split("] ", 1)[1]})
        elif line.startswith("--- "):
            label = line[4:].split(" ")[0]
            out[-1][label] = []
        elif out and label:
            out[-1][label].append(line)
    return [{k: v if k == "prompt" else "\n".join(v) for k, v in b.items()} for b in out]


def reference(run: Path, prompts: list[str]) -> list[dict]:
    """Greedy HF generate of the run's base and of the base with the final adapter, loaded by PEFT."""
    import torch
    from peft import PeftModel

    from rl.config import load_config
    from rl.data import tokenize_prompt
    from rl.model import load_base_model

    cfg = load_config(str(run / "config.yaml"))
    base, tok = load_base_model(cfg.model, cfg.train.seed)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()

    def greedy(ids: list[int]) -> str:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip() or "(empty)"

    rows = []
    for p in prompts:
        ids = tokenize_prompt(p, tok, cfg.data.system_prompt, cfg.data.chat_template)
        with model.disable_adapter():
            b = greedy(ids)
        rows.append({"prompt": p, "base": b, "trained": greedy(ids)})
    return rows


def test_completes_a_prompt_file_base_beside_trained(run_dir, tmp_path, capsys):
    """A .jsonl file (text and chat prompts) and a text file: every prompt printed with the base's and the trained
    policy's greedy completions, equal to HF generate's with the adapter off and on; the adapter changes them."""
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": PROMPTS[1]}]}) + "\n")
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(PROMPTS) + "\n\n")

    expected = reference(run_dir, PROMPTS)
    assert any(r["base"] != r["trained"] for r in expected), "the trained adapter should change some completion"
    for path in (rows, text):
        assert main([str(run_dir), "--prompts", str(path), "--max-tokens", str(MAX_TOKENS)]) == 0
        assert blocks(capsys.readouterr().out) == expected


def test_chats_from_piped_stdin(run_dir):
    """Each stdin line is a prompt; --no-compare prints the trained completion only, the same as from a file."""
    done = subprocess.run([sys.executable, "-m", "rl.generate", str(run_dir), "--no-compare", "--max-tokens",
                           str(MAX_TOKENS)], input="\n".join(PROMPTS) + "\n", cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = reference(run_dir, PROMPTS)
    assert blocks(done.stdout) == [{"prompt": r["prompt"], "trained": r["trained"]} for r in expected]


def test_a_run_without_its_final_adapter_uses_its_latest_checkpoint(run_dir, tmp_path, capsys, caplog):
    copy = tmp_path / "stopped"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("adapter"))
    with caplog.at_level("INFO", logger="tandem"):
        assert main([str(copy), "--prompts", str(_lines(tmp_path, PROMPTS[:1])), "--max-tokens", str(MAX_TOKENS),
                     "--no-compare"]) == 0
    assert "using its latest checkpoint" in caplog.text and "step-000001" in caplog.text
    assert blocks(capsys.readouterr().out)[0]["trained"] == reference(run_dir, PROMPTS[:1])[0]["trained"]


def _lines(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "one.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("no_run", "has no config.yaml"),
    ("no_column", "no 'prompt' key"),
    ("bad_temperature", "check --max-tokens, --temperature"),
])
def test_mistakes_stop_with_one_message(run_dir, tmp_path, capsys, case, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    argv = {"no_run": [str(tmp_path)],
            "no_column": [str(run_dir), "--prompts", str(bad)],
            "bad_temperature": [str(run_dir), "--prompts", str(_lines(tmp_path, PROMPTS)), "--temperature", "-1"]}
    assert main(argv[case]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rl.generate: error:") and message in err, err
