"""The code reward's sandbox against hostile programs: each one contained, scored, and the trainer alive.

The tests assert what happened (timed out, killed, refused, nothing left running), never how fast: a loaded
machine is slower, not wrong."""

import os
import socket
import time
from pathlib import Path

import pytest

from rewards.code import extract_code, python_tests
from rewards.sandbox import Limits, run_sandboxed, sandbox_unavailable

pytestmark = pytest.mark.skipif(sandbox_unavailable() is not None, reason=str(sandbox_unavailable()))
FAST = Limits(wall_s=5, cpu_s=3, memory_mb=256, processes=8)


def score(code, tests="", limits=FAST, on_error="zero"):
    return python_tests(["p"], [f"```python\n{code}\n```"], tests=[tests], limits=limits, on_error=on_error)[0]


def test_right_and_wrong_solutions():
    assert score("def add(a, b):\n    return a + b", "assert add(2, 3) == 5") == 1.0
    assert score("def add(a, b):\n    return a - b", "assert add(2, 3) == 5") == 0.0
    assert extract_code([{"role": "assistant", "content": "x\n```python\nprint(1)\n```\ny"}]).strip() == "print(1)"


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    result = run_sandboxed("while True:\n    pass\n", Limits(wall_s=2, cpu_s=30))
    # the wall-clock timer ended it (the CPU limit, 30 s, would have shown as a signal's return code instead)
    assert result.timed_out and result.returncode is None
    assert _survivors() == []
    assert score("while True:\n    pass", limits=Limits(wall_s=2, cpu_s=30)) == 0.0
    assert score("while True:\n    pass", limits=Limits(wall_s=2, cpu_s=30), on_error="none") is None


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    limits = Limits(wall_s=3, cpu_s=3, processes=8)
    result = run_sandboxed(bomb, limits)
    assert result.returncode != 0  # ended by the wall clock or the CPU limit: it never exits by itself
    assert _survivors() == []  # nothing of it outlives its process group
    assert score(bomb, limits=limits) == 0.0


def test_ten_gigabytes_are_refused():
    result = run_sandboxed("x = bytearray(10 * 1024 ** 3)\n", FAST)
    assert result.returncode not in (0, None) and "MemoryError" in result.stderr


def test_no_network_not_even_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    local = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    outside = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n"
    for program in (local, outside):
        result = run_sandboxed(program, FAST)
        assert result.returncode != 0 and ("unreachable" in result.stderr or "Error" in result.stderr)
    with pytest.raises(BlockingIOError):
        server.accept()  # no connection ever arrived
    server.close()


def test_writes_are_confined_to_the_scratch_directory(tmp_path):
    home_target = Path.home() / "tandem-sandbox-probe"
    program = (f"open('here.txt', 'w').write('ok')\n"  # its own directory: allowed
               f"import os\nfor path in ({str(home_target)!r}, '/tmp/tandem-sandbox-probe', {str(tmp_path / 'x')!r}):\n"
               "    try:\n        open(path, 'w').write('escaped')\n        print('WROTE', path)\n"
               "    except OSError as e:\n        print('refused', path, type(e).__name__)\n")
    result = run_sandboxed(program, FAST)
    assert result.returncode == 0, result.stderr
    assert "WROTE" not in result.stdout and result.stdout.count("refused") == 3
    assert not home_target.exists() and not Path("/tmp/tandem-sandbox-probe").exists()


def test_it_cannot_kill_the_trainer():
    result = run_sandboxed("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", FAST)
    assert result.returncode != 0 and "PermissionError" in result.stderr  # and we are still here


def _survivors(wait_s=30.0):
    """Sandboxed programs (run as nobody) still alive, after waiting up to `wait_s` for the killed ones to be
    reaped: a SIGKILLed process leaves /proc when the kernel gets to it, later on a loaded machine. The wait is
    a limit, not a measurement: it returns as soon as none is left."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) == 65534 and "program.py" in _cmd(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _cmd(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def test_a_grpo_run_scores_code_in_the_sandbox(tmp_path, monkeypatch):
    import json

    import rewards.code
    from rl.trainer import GRPOTrainer
    from tests.helpers import run_config

    # A random model's completions are not Python: each program would end in a SyntaxError before its tests
    # ran. Their code is taken as empty, so that each row's tests decide: one row's pass, the other's hang.
    monkeypatch.setattr(rewards.code, "extract_code", lambda completion: "")
    ran, real = [], rewards.code.run_sandboxed

    def recorded(source, limits):
        ran.append((limits, real(source, limits)))
        return ran[-1][1]

    monkeypatch.setattr(rewards.code, "run_sandboxed", recorded)
    data = tmp_path / "code.jsonl"
    rows = [{"prompt": "Write add(a, b).", "tests": "assert True"},
            {"prompt": "Loop forever.", "tests": "while True:\n    pass"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_config(tmp_path, data={"task": None, "path": str(data)},
                     rewards={"functions": ["python_tests"], "code_timeout_s": 1.0, "code_on_error": "none"},
                     grpo={"prompts_per_step": 2, "num_generations": 2}, train={"max_steps": 1})
    GRPOTrainer(cfg).train()
    assert {limits.wall_s for limits, _ in ran} == {1.0}  # rewards.code_timeout_s reached the sandbox
    step = [r for _, r in ran[-4:]]  # the step's 4 completions (2 per prompt); before them, the start-up check
    assert [r.returncode for r in step if not r.timed_out] == [0, 0]  # the passing tests
    assert [r.returncode for r in step if r.timed_out] == [None, None]  # the hanging ones, killed
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    # the hanging programs score None (code_on_error none) and are left out of the mean; the others pass
    assert rows[0]["rewards/python_tests/mean"] == 1.0


def test_the_program_cannot_tamper_with_its_reported_output():
    result = run_sandboxed("import os\nfor name in os.listdir('.'):\n    os.remove(name)\nprint('done')\n", FAST)
    assert result.returncode == 0 and result.stdout == "done\n"
