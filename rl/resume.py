"""What `--resume` continues from: the newest intact checkpoint.

Every checkpoint's COMPLETE marker records the size and sha256 of its files (rl/checkpoint.py). A damaged one
(a disk error, a partial copy between machines) is reported in one line and passed over for the next older
one, rather than failing inside a loader with its traceback; when none is intact the run stops (exit 2) with
one message. Checkpoints written before markers held checksums load unchecked, and say so.

The config of the run being continued is compared with the new one: a change to a key that defines the run
(FIXED: the model, the LoRA shape, G, the loss, the data, the seed) is refused in one message listing each
change and the old values; other changes (train.max_steps, train.save_every, tracking...) are logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

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


# ---------------------------------------------------------------------------------------------- compatibility

# Keys that define the run itself: with another value the checkpoint's weights, optimizer state or data position
# would not fit (LoRA shapes, the base they adapt), or the run would silently become another one (the group
# size, the loss, the data, the seed of its sampling and order). Every other key may change on resume.
FIXED = ("model.name", "model.load_in_4bit", "lora.enabled", "lora.r", "lora.alpha", "lora.target_modules",
         "grpo.num_generations", "grpo.loss_type", "grpo.advantage", "grpo.dynamic_sampling", "objective.loss_type",
         "data.task", "data.path", "data.name",
         "data.split", "data.num_examples", "train.seed")


def saved_config(checkpoint: Path, out: Path) -> dict | None:
    """The config of the run that wrote `checkpoint`: recorded in its trainer state, or (checkpoints written
    before it was) the run directory's config.yaml; None when neither is there."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if "config" in state:
        return state["config"]
    if (out / "config.yaml").is_file():
        return yaml.safe_load((out / "config.yaml").read_text())
    return None


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def _arg(value) -> str:
    """A value as it is written on the command line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def check_compatible(saved: dict | None, new: dict, rank: int = 0) -> None:
    """Refuse (ConfigError, one line) a resume whose config changes a FIXED key, naming each change and the
    old values that continue the run; log the other changes."""
    if saved is None:
        if rank == 0:
            log.warning("resume: the run's saved config was not found; its settings cannot be compared")
        return
    old, now = _flat(saved), _flat(new)
    changed = [k for k in now if k in old and old[k] != now[k]]
    if "data.task" in now and now["data.task"] is None:  # num_examples only sizes a built-in task
        changed = [k for k in changed if k != "data.num_examples"]
    show = lambda k: f"{k} {_arg(old[k])} -> {_arg(now[k])}"  # noqa: E731
    refused = [k for k in changed if k in FIXED]
    if refused:
        raise ConfigError("--resume: these changes cannot continue the same run: " + "; ".join(map(show, refused))
                          + ". Keep the old values (" + " ".join(f"--{k} {_arg(old[k])}" for k in refused)
                          + ") to resume, or start a new run in another train.output_dir")
    if changed and rank == 0:
        log.info("resume: changed since the checkpoint was written: %s", "; ".join(map(show, changed)))
