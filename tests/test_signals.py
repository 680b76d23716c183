"""SIGTERM (how clusters and spot instances preempt a job) during a run: the step finishes, a checkpoint of it
is written, the trackers are flushed, the resume command is printed and the process exits 0; the run resumed
from there equals the run that was never stopped, metric for metric (all but wall-clock and memory)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.fault_injection import VARYING
from rl.config import to_dict
from tests.helpers import run_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"max_steps": 4, "save_every": 0, "num_threads": 1}  # no periodic checkpoint: the signal's is the one


def _run(argv: list[str], signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_SIGNAL_AT", "WORLD_SIZE")}
    # torchrun's workers import the project as the launcher does, and what the environment adds
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if signal_at:
        env["TANDEM_SIGNAL_AT"] = signal_at
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(run_config(tmp_path, train=TRAIN))))
    return config


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    result = _run(["-m", "rl.grpo", "--config", str(_config(base))])
    assert result.returncode == 0, result.stderr[-3000:]
    return _metrics(base / "run")


@pytest.mark.parametrize("phase", ["rollout", "train"])
def test_sigterm_saves_the_step_and_the_resumed_run_equals_the_uninterrupted_one(reference, tmp_path, phase):
    stopped = _run(["-m", "rl.grpo", "--config", str(_config(tmp_path))], signal_at=f"{phase}:2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "SIGTERM: finishing step 2, then saving a checkpoint" in stopped.stderr
    assert "rl.grpo: stopped by SIGTERM after step 2; checkpoint" in stopped.stderr
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    assert [r["step"] for r in _metrics(run)] == [1, 2]  # flushed
    assert not (run / "adapter").exists()  # not finished: no final adapter
    command = re.search(r"^  resume   python (-m rl\.grpo .+)$", stopped.stderr, re.MULTILINE).group(1)
    resumed = _run(shlex.split(command))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr
    got = _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    compared = [k for k in reference[0] if not k.startswith(VARYING)]
    assert len(compared) > 10
    assert [{k: r.get(k) for k in compared} for r in got] == [{k: r.get(k) for k in compared} for r in reference]


def test_a_second_signal_ends_the_process_at_once():
    code = ("import os, signal, time\nfrom rl.loop import TrainerBase\n"
            "t = TrainerBase.__new__(TrainerBase); t.rank, t.step = 0, 1\n"
            "with t._stop_on_signals():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); assert t.stop_signal == 'SIGTERM'\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n"
            "print('not reached')\n")
    result = _run(["-c", code])
    assert result.returncode == 128 + 2 and "not reached" not in result.stdout, result.stderr[-2000:]


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Rank 1 alone gets SIGTERM in step 2's update: both ranks finish step 2, rank 0 writes its checkpoint and
    says so, both exit 0; resumed under torchrun, the run ends equal to the 2-rank run never stopped."""
    def torchrun(config, *extra, signal_at=None):
        return _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rl.grpo",
                     "--config", str(config), *extra], signal_at=signal_at)

    def config(where):
        where.mkdir()
        cfg = to_dict(run_config(where, train=TRAIN))
        cfg["grpo"]["prompts_per_step"] = 1  # per rank
        path = where / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    reference = torchrun(config(tmp_path / "whole"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = torchrun(config(tmp_path / "stopped"), signal_at="train:2:1")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by a signal to another rank after step 2; checkpoint" in stopped.stderr
    run = tmp_path / "stopped" / "run"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    resumed = torchrun(tmp_path / "stopped" / "run.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _metrics(tmp_path / "whole" / "run")
    compared = [k for k in whole[0] if not k.startswith(VARYING)]
    got = _metrics(run)
    assert [{k: r.get(k) for k in compared} for r in got] == [{k: r.get(k) for k in compared} for r in whole]
