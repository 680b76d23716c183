"""Run untrusted Python (a model's completion) in a confined subprocess.

    result = run_sandboxed(source, Limits(wall_s=10))   # -> SandboxResult(returncode, stdout, timed_out, ...)

The program runs in a fresh scratch directory through a launcher (a separate, single-threaded Python, so that
nothing is done between fork and exec in the trainer's threaded process), which before exec'ing the program:
  - enters its own network namespace (no interface is up: no connection, not even to 127.0.0.1) and its own
    mount namespace, in which every mount is read-only except the scratch directory;
  - sets resource limits: CPU seconds, address space, processes of its user, file size;
  - drops to an unprivileged user (nobody), so that it cannot signal the trainer or touch its files.
The launcher starts a new session: on the wall-clock timeout the whole process group is killed. This needs
root (a container's root is enough): `sandbox_unavailable()` says why it cannot run elsewhere, and the code
reward refuses to start with that message rather than run model-written code unconfined.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    processes: int = 16
    file_mb: int = 16


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def sandbox_unavailable() -> str | None:
    """None when programs can be confined here; else the reason."""
    if not sys.platform.startswith("linux"):
        return "the code sandbox needs Linux namespaces; this is " + sys.platform
    if os.geteuid() != 0:
        return ("the code sandbox needs root (inside a container is enough) to give each program its own network "
                "and mount namespaces and run it as an unprivileged user; run the trainer as root in a container")
    return None


DEFAULT_LIMITS = Limits()


def run_sandboxed(source: str, limits: Limits = DEFAULT_LIMITS) -> SandboxResult:
    reason = sandbox_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    scratch = Path(tempfile.mkdtemp(prefix="tandem-sandbox-"))
    try:
        os.chown(scratch, NOBODY, NOBODY)
        (scratch / "program.py").write_text(source)
        cmd = [sys.executable, "-I", "-S", __file__, str(scratch), str(limits.cpu_s), str(limits.memory_mb),
               str(limits.processes), str(limits.file_mb)]
        t0 = time.perf_counter()
        # output goes to unlinked files outside the scratch directory: the program cannot remove or replace them
        with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
            proc = subprocess.Popen(cmd, cwd=scratch, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": str(scratch),
                                                                 "TMPDIR": str(scratch), "LANG": "C.UTF-8"})
            try:
                code = proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                code, timed_out = None, True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
                except ProcessLookupError:
                    pass
                proc.wait()
            seconds = time.perf_counter() - t0

            def read(f) -> str:
                f.seek(0)
                return f.read(1 << 16).decode(errors="replace")

            return SandboxResult(code, read(fo), read(fe), timed_out, seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ the launcher (runs as its own process)

def _launch(scratch: str, cpu_s: int, memory_mb: int, processes: int, file_mb: int) -> None:
    import ctypes
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    # the base interpreter, not a virtual environment's link to it (the environment's directory is not
    # uncovered), resolved now: once the launcher is nobody it may not read the links on the way to it.
    # The program gets the standard library only (-I -S).
    python = os.path.realpath(sys.executable)

    def check(ok, what):
        if ok != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")

    CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = \
        1, 2, 4, 32, 4096, 8192, 16384, 1 << 18
    check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    check(libc.mount(scratch.encode(), scratch.encode(), None, MS_BIND, None), "bind the scratch directory")
    # The interpreter may live where nobody cannot reach (a pyenv under /root): cover the first unreachable
    # directory with an empty tmpfs and put the interpreter's installation back at the same path inside it
    # (its libraries are found by absolute paths), so the program sees the interpreter and not the rest.
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.strip("/").split("/")
    ancestors = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    blocked = next((a for a in ancestors if not os.stat(a).st_mode & 0o001), None)
    if blocked is not None:
        holder = os.path.join(scratch, ".python")
        os.mkdir(holder)
        check(libc.mount(prefix.encode(), holder.encode(), None, MS_BIND | MS_REC, None), "bind the interpreter")
        check(libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755"),
              f"cover {blocked}")
        os.makedirs(prefix, exist_ok=True)
        check(libc.mount(holder.encode(), prefix.encode(), None, MS_MOVE, None), "move the interpreter back")
        os.rmdir(holder)
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(set(points), key=len):
        if point == scratch or point.startswith(("/proc", "/sys")):
            continue
        target = point.encode().decode("unicode_escape").encode()  # /proc/mounts escapes spaces as \040
        libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)  # best effort per mount
    for res, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
                       (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, file_mb << 20),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    os.chdir(scratch)  # through the writable bind mount (the inherited cwd still points below it)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    os.execv(python, [python, "-I", "-S", os.path.join(scratch, "program.py")])


if __name__ == "__main__":
    _launch(sys.argv[1], *map(int, sys.argv[2:6]))
