"""Checkpoints written atomically: a run killed at any instant leaves the previous checkpoint intact.

Layout of `<output_dir>/checkpoints/step-000042/`:
    adapter_model.safetensors, adapter_config.json   the LoRA adapter in PEFT's format, or
    model*.safetensors, config.json                  the whole model (lora.enabled false, one process), or
    sharded/                                         its shards and the optimizer's, one file per rank
                                                     (FSDP2; torch.distributed.checkpoint: loadable at any
                                                     world size, into a sharded or a plain model)
    optimizer.pt                                     optimizer and LR-scheduler state (full-parameter runs:
                                                     keyed by parameter names; sharded: the scheduler only)
    trainer_state.json                               step, data position, RNG states' companion
    rng.pt                                           torch / CUDA / python / numpy RNG states
    COMPLETE                                         written last; a directory without it is ignored. It
                                                     records the size and sha256 of every other file, so that
                                                     damage after the write (a disk error, a partial copy) is
                                                     found on resume (verify) rather than as a loader's error

Everything is written into a hidden temporary directory, each file fsynced, the directory renamed into place
and its parent fsynced; only then are checkpoints beyond `keep` deleted, oldest first. A run resumed from an
earlier checkpoint than the latest deletes the later ones (drop_later): they belong to the run it abandons.

    python -m rl.checkpoint verify DIR     # DIR: a run directory or one checkpoint; exit 1 if any is damaged
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("tandem")
MARKER = "COMPLETE"
CHUNK = 1 << 20  # files are hashed in 1 MiB reads: a whole-model checkpoint need not fit in memory


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _clear_stale(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed while writing: never complete, safe to drop
        shutil.rmtree(stale, ignore_errors=True)


def _complete(root: Path, tmp: Path, step: int, optimizer_payload: dict, state: dict, keep: int) -> Path:
    """Write the rest of a checkpoint into `tmp`, the marker last, fsync, and rename it into place; then drop
    the checkpoints beyond `keep`. `tmp` is removed whatever happens."""
    final = root / f"step-{step:06d}"
    try:
        torch.save(optimizer_payload, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": manifest(tmp)}, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. the final step after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(directory: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under `directory` but the marker."""
    return {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MARKER}


def verify(path: Path) -> tuple[str, str]:
    """-> (status, detail) of one checkpoint directory: ("ok", "N files verified"), ("unverified", why) for one
    written before markers held checksums (it loads as before, unchecked), ("incomplete", why) without a
    marker, or ("damaged", "which file: what is wrong") for the first problem found."""
    marker = path / MARKER
    if not marker.is_file():  # never complete: --resume skips it, nothing was lost that had been saved
        return "incomplete", f"no {MARKER} marker (the run stopped while writing it; --resume skips it)"
    text = marker.read_text()
    if text.strip().isdigit():  # the marker of older versions: the step alone
        return "unverified", "written before checkpoints recorded checksums"
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return "damaged", f"{MARKER}: not a readable marker (the marker itself is damaged)"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return "damaged", f"{name}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            cut = " (truncated)" if size < want["size"] else ""
            return "damaged", f"{name}: {size} bytes, {want['size']} when written{cut}"
        if _sha256(f) != want["sha256"]:
            return "damaged", f"{name}: its contents changed since it was written (sha256 differs)"
    return "ok", f"{len(files)} files verified"


def name_base_model(directory: Path, name: str) -> None:
    """Set adapter_config.json's base model (if the directory holds an adapter) to the user's model.name. PEFT
    writes the directory the base was loaded from, a cache path (the GGUF conversion's, a random model's), or
    nothing for a model built in memory: neither tells whoever loads the adapter later which base it needs."""
    path = Path(directory) / "adapter_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = name
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                    optimizer_state: dict | None = None, base_model: str | None = None) -> Path:
    """optimizer_state: what to write for the optimizer instead of optimizer.state_dict(); base_model: the
    name an adapter's config gives its base (name_base_model)."""
    _clear_stale(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:06d}-"))
    try:
        model.save_pretrained(tmp)
        if base_model is not None:
            name_base_model(tmp, base_model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _complete(root, tmp, step, {"optimizer": optimizer.state_dict() if optimizer_state is None
                                       else optimizer_state, "scheduler": scheduler.state_dict()}, state, keep)


def save_sharded_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                            rank: int) -> Path:
    """A checkpoint of a model sharded over ranks (FSDP2): every rank writes its own shards of the weights and
    of the optimizer state (torch.distributed.checkpoint, under `sharded/`), rank 0 the rest; the same atomic
    protocol as save_checkpoint, with one temporary directory whose name every rank knows."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        _clear_stale(root)
        tmp.mkdir()
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / "sharded")
    dist.barrier()  # every rank's shards are written
    if rank == 0:
        _complete(root, tmp, step, {"scheduler": scheduler.state_dict()}, state, keep)
    dist.barrier()
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones are reported and skipped."""
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.glob("step-*")):
        if (path / MARKER).is_file():
            done.append(path)
        else:
            log.warning("skipping incomplete checkpoint %s (no %s marker: the run stopped while writing it)",
                        path, MARKER)
    return done


def drop_later(root: Path, step: int) -> list[str]:
    """Delete the complete checkpoints under `root` past `step`: those of a run abandoned by resuming from an
    earlier one. Left in place, `--resume` would later take the abandoned run's latest, and pruning to `keep`
    (by step number) would delete the resumed run's new checkpoints as soon as they are written. Newest first,
    each renamed to a `.tmp-step-*` name (atomic) before it is removed: a crash in between leaves only what
    _clear_stale removes, never a complete checkpoint of the abandoned run newer than one that is gone.
    -> the names dropped."""
    dropped = []
    for path in reversed(list_checkpoints(root)):
        if int(path.name.removeprefix("step-")) <= step:
            break
        doomed = root / f".tmp-{path.name}-abandoned"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        dropped.append(path.name)
    return dropped[::-1]


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restores the weights (adapter or whole model), optimizer, scheduler and RNG; returns the trainer state
    (step, data...). A whole model's checkpoint loads into a sharded model on every rank, or into a plain one."""
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    if (path / "sharded").is_dir():  # written by save_sharded_checkpoint: loads at any world size
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)  # the shapes to fill, this rank's
        states = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(states, checkpoint_id=path / "sharded")
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    else:
        _load_weights(path, model, optimizer, opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _load_weights(path: Path, model, optimizer, optimizer_state: dict) -> None:
    """A single writer's checkpoint: the LoRA adapter, or the whole model (keyed by parameter names)."""
    from safetensors.torch import load_file

    adapter = path / "adapter_model.safetensors"
    lora = hasattr(model, "peft_config")
    if adapter.is_file() != lora:
        held, trained = ("a LoRA adapter", "the whole model") if adapter.is_file() else ("a whole model", "LoRA")
        raise RuntimeError(f"checkpoint {path} holds {held} but this run trains {trained}; resume with the "
                           "lora.enabled of the run that wrote it")
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        weights = load_file(adapter, device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise RuntimeError(f"checkpoint {path} does not match the model's adapters (missing {missing[:3]}...)")
        optimizer.load_state_dict(optimizer_state)
    else:
        from rl.distributed import load_full_states

        weights = {k: v for f in sorted(path.glob("model*.safetensors")) for k, v in load_file(f).items()}
        load_full_states(model, optimizer, weights, optimizer_state)


# ---------------------------------------------------------------------------------------------- command line


def _checkpoints_under(directory: Path) -> list[Path]:
    """One checkpoint, or those of a run directory (checkpoints/ and checkpoints/best/) or of a checkpoints/."""
    if (directory / MARKER).is_file() or directory.name.startswith("step-"):
        return [directory]
    found = []
    for root in (directory / "checkpoints", directory / "checkpoints" / "best", directory, directory / "best"):
        found += sorted(p for p in root.glob("step-*") if p.is_dir())
    return list(dict.fromkeys(found))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rl.checkpoint",
                                     description="Check checkpoints against the sizes and checksums they recorded.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="one line per checkpoint; exit 1 if any is damaged")
    check.add_argument("dir", help="a run directory (train.output_dir), its checkpoints/, or one checkpoint")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    found = _checkpoints_under(directory) if directory.is_dir() else []
    if not found:
        print(f"rl.checkpoint: error: {directory} holds no checkpoint (step-NNNNNN directories)", file=sys.stderr)
        return 2
    damaged = 0
    for path in found:
        status, detail = verify(path)
        damaged += status == "damaged"
        print(f"{path}: {status}: {detail}")
    return 1 if damaged else 0


if __name__ == "__main__":
    raise SystemExit(main())
