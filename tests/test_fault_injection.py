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


@pytest.mark.slow
def test_sigterm_stops_save_the_step_they_interrupt(tmp_path):
    """Preempted by SIGTERM twice (as a cluster does), with checkpoints only every 3 steps: each process
    finishes the step it is in, writes a checkpoint of it and exits 0, so no completed step is redone; the
    run, resumed each time, ends equal to the uninterrupted one."""
    import signal

    result = run_trials(tmp_path, trials=2, steps=10, seed=1, log=lambda *_: None, after_checkpoint=True,
                        sig=signal.SIGTERM, save_every=3)
    assert result["clean_stops"] == 2 and result["stopped_outside_loop"] == 0
    assert result["lost_steps"] == 0 and result["corrupted"] == 0
    assert result["steps"] == result["reference_steps"] == 10 and result["mismatched_steps"] == []
    assert len(result["resumes"]) == 2 and all(at == newest for newest, at in result["resumes"]), result["resumes"]
