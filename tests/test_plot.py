"""rl.plot: PNG curves of GRPO runs (made-up metrics) and of DPO, ORPO, KTO and SFT runs (real tiny runs)."""

import json

import pytest

from rl.cli import run_cli
from rl.plot import figure, main


def test_plot_writes_a_png(tmp_path):
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        rows = [{"step": s, "reward": s * 0.1 + seed, "entropy": 1.0, "completions/mean_length": 30,
                 "throughput/rollout_tokens_per_s": 100.0} for s in range(1, 12)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("objective, own_metric", [("dpo", "reward margin"), ("orpo", "NLL"), ("kto", "KL"),
                                                   ("sft", "tokens")])
def test_plot_draws_what_an_offline_run_writes(objective, own_metric, tmp_path):
    # a real 2-step run on the tiny model and the built-in task (which has rows for every objective)
    module = __import__(f"rl.{objective}", fromlist=["main"])
    run = tmp_path / objective
    assert run_cli(f"rl.{objective}", module.main, [
        "--model.name", "random:tiny", "--data.num_examples", "8", "--objective.batch_size", "2",
        "--train.max_steps", "2", "--train.save_every", "0", "--train.output_dir", str(run),
        "--train.num_threads", "2", "--tracking.progress", "false"]) == 0

    fig = figure([run])
    drawn = {ax.get_title(): len(ax.lines) for ax in fig.axes if ax.get_visible()}
    assert len(drawn) == 4 and all(drawn.values()), drawn  # four panels, none of them empty
    assert "loss" in drawn
    assert any(own_metric in title for title in drawn), drawn
    assert main([str(run)]) == 0 and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
