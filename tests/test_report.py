"""rl.report on made-up runs (no browser; tests/test_dashboards_browser.py renders real ones): the panels
chosen from what the runs wrote, the settings that differ, the samples table, and nothing fetched from outside."""

import json
import re

import yaml

from rl.report import main, render


def _run(path, rows, config, samples=()):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if samples:
        (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_two_grpo_runs_overlaid_with_their_differences_and_samples(tmp_path):
    rows = [{"step": s, "reward": 0.1 * s, "rewards/fmt/mean": 0.05 * s, "entropy": 2 - 0.1 * s, "kl": None,
             "timing/rollout": 1.0, "timing/train": 2.0, "memory/peak_rss_gb": 3.0} for s in range(1, 6)]
    config = {"model": {"name": "m"}, "grpo": {"loss_type": "dapo", "beta": 0.0}}
    a = _run(tmp_path / "a", rows, config, [{"step": 1, "prompt": "2+2?", "completion": "4 <b>", "reward": 1.0,
                                            "reward/fmt": 1.0}])
    b = _run(tmp_path / "b", rows, {**config, "grpo": {"loss_type": "gspo", "beta": 0.0}},
             [{"step": 5, "prompt": "3+3?", "completion": "6", "reward": 0.5, "reward/fmt": 0.0}])
    page = render([a, b])
    titles = re.findall(r"<img alt='([^']+)'", page)
    assert titles == ["reward (weighted sum)", "reward per function (mean)", "policy entropy",
                      "step time by phase (s)", "memory (GB)"]  # kl: never written (None), so no panel
    diff = page.split("id='config-diff'>")[1].split("</table>")[0]
    assert "grpo.loss_type" in diff and "gspo" in diff and "grpo.beta" not in diff and "model.name" not in diff
    assert page.count("<tr data-step=") == 2 and "data-step='5'" in page
    assert "4 &lt;b&gt;" in page  # completions are escaped, not markup
    assert "http://" not in page and "https://" not in page


def test_an_offline_run_without_samples(tmp_path, capsys):
    rows = [{"step": s, "loss": 1 / s, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5, "grad_norm": 1.0}
            for s in range(1, 4)]
    run = _run(tmp_path / "dpo", rows, {"model": {"name": "m"}})
    assert main([str(run)]) == 0
    page = (run / "report.html").read_text()
    assert str(run / "report.html") in capsys.readouterr().out
    assert re.findall(r"<img alt='([^']+)'", page) == ["loss", "reward margin, chosen - rejected",
                                                       "preference accuracy", "gradient norm"]
    assert "No samples.jsonl" in page and "config-diff" not in page
