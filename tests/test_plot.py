import json

from rl.plot import main


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
