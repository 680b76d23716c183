"""What `--resume` continues from: the newest intact checkpoint.

Every checkpoint's COMPLETE marker records the size and sha256 of its files (rl/checkpoint.py). A damaged one
(a disk error, a partial copy between machines) is reported in one line and passed over for the next older
one, rather than failing inside a loader with its traceback; when none is intact the run stops (exit 2) with
one message. Checkpoints written before markers held checksums load unchecked, and say so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rl.checkpoint import MARKER, list_checkpoints, verify
from rl.errors import ConfigError

log = logging.getLogger("tandem")


def pick_checkpoint(out: Path, resume: str, rank: int = 0) -> Path:
    """The checkpoint that `--resume` (resume "latest") or `--resume PATH` loads, verified. rank: only rank 0
    says what it found (every rank checks, and finds the same)."""
    say = log.warning if rank == 0 else (lambda *a: None)
    if resume != "latest":
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (expected "
                              "checkpoints/step-NNNNNN with a COMPLETE marker)")
        status, detail = verify(path)
        if status == "damaged":  # the user chose it: no silent substitute
            raise ConfigError(f"--resume {resume}: the checkpoint is damaged: {detail}; resume from another one "
                              "(--resume alone takes the newest intact checkpoint of train.output_dir)")
        _unverified(path, status, detail, say)
        return path
    root = out / "checkpoints"
    found = list_checkpoints(root)
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint under {root}; start without --resume, or pass "
                          "--resume PATH")
    damaged = []
    for path in reversed(found):
        status, detail = verify(path)
        if status == "damaged":
            say("checkpoint %s is damaged: %s", path, detail)
            damaged.append(f"{path.name}: {detail}")
            continue
        if damaged:
            say("resuming from %s, the newest intact checkpoint (the newer ones are damaged)", path)
        _unverified(path, status, detail, say)
        return path
    raise ConfigError(f"--resume: every checkpoint under {root} is damaged ({'; '.join(damaged)}); restore one "
                      "from a copy and resume, or start the run again in a new train.output_dir")


def _unverified(path: Path, status: str, detail: str, say) -> None:
    if status == "unverified":
        say("checkpoint %s is unverified (%s): loading it without checking", path, detail)

