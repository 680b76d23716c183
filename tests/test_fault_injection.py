"""kill -9 at random instants, resume, repeat: no corrupted checkpoint, metrics equal to an uninterrupted run's.

The full 20-trial figure is benchmarks/fault_injection.py's (README); this runs 3 trials of it."""

import pytest

from benchmarks.fault_injection import run_trials


@pytest.mark.slow
def test_three_kills_and_resumes(tmp_path):
    result = run_trials(tmp_path, trials=3, steps=12, seed=1, log=lambda *_: None)
    assert result["corrupted"] == 0
    assert result["steps"] == result["reference_steps"] == 12
    assert result["mismatched_steps"] == [] and result["metrics_compared"] > 10
