"""kill -9 at random instants, resume, repeat: no corrupted checkpoint, metrics equal to an uninterrupted run's,
and every restart really resumed from the newest checkpoint.

The full 20-trial figure is benchmarks/fault_injection.py's (README); this runs 3 trials of it, each process
killed after it has written a checkpoint of its own (so that every start after the first resumes)."""

import pytest

from benchmarks.fault_injection import run_trials


@pytest.mark.slow
def test_three_kills_and_resumes(tmp_path):
    result = run_trials(tmp_path, trials=3, steps=12, seed=1, log=lambda *_: None, after_checkpoint=True)
    assert result["corrupted"] == 0
    assert result["steps"] == result["reference_steps"] == 12
    assert result["mismatched_steps"] == [] and result["metrics_compared"] > 10
    # Equal metrics alone would pass a run that ignored its checkpoints and started over (the seeds are fixed).
    # Three resumes (two killed again, the last run to the end), each at the newest complete checkpoint there
    # was when it started, as its log says; each later than the one before
    assert result["restarts"] == 0 and len(result["resumes"]) == 3, result["resumes"]
    assert all(at == newest for newest, at in result["resumes"]), result["resumes"]
    steps = [newest for newest, _ in result["resumes"]]
    assert steps[0] >= 1 and steps == sorted(set(steps)), steps
