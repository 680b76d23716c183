"""Kill -9 (or SIGTERM) a GRPO run at random instants, resume it each time, and check that nothing was lost.

    python benchmarks/fault_injection.py [--trials 20] [--steps 12] [--seed 0] [--after-checkpoint]
        [--signal KILL|TERM] [--save-every 1]

One run on a tiny random model (CPU) is killed with SIGKILL `--trials` times at random instants (in the
rollout, the update, or while a checkpoint is written: a `.tmp-step-*` directory left behind shows the
latter) and resumed with `--resume` after each kill, then let finish. After every kill, every complete
checkpoint must load (a checkpoint that does not is corrupted). At the end the run's metrics, step by step,
must equal those of the same run uninterrupted (fixed seeds), every one but wall-clock and memory
measurements, to the bit.

Equal metrics alone would not show that anything was resumed: with fixed seeds, a run that ignored its
checkpoints and started over would write them too. So every resumed process's log must say that it resumed
from the newest complete checkpoint there was when it started ("resumed from ... at step N"); `resumes` in
the result lists (that checkpoint's step, the step the process resumed at) for each. A kill can come before
the first checkpoint: the next start is then a fresh one (`--resume` needs a complete checkpoint; a directory
that holds metrics but none is cleared first, as a user would have to: `restarts` counts those).
`--after-checkpoint` kills each process only after it has written a checkpoint of its own, at a random
instant within the next two steps, so that every start after the first resumes.

`--signal TERM` preempts the run as a cluster does: a process that has started its loop must finish the
current step, write a checkpoint of it (whatever `--save-every` is) and exit 0, so that no completed step is
lost (`clean_stops`, `lost_steps`: completed steps not in the newest checkpoint after a stop); one signalled
outside its loop (during start-up, or after its last step) ends as a kill would (`stopped_outside_loop`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARYING = ("timing/", "throughput/", "memory/")  # wall-clock and process measurements; all else must be equal
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")  # rl/loop.py's log line on resume


def config_text(out: Path, steps: int, save_every: int = 1) -> str:
    return (f"model: {{name: 'random:tiny'}}\nlora: {{r: 8}}\n"
            "rollout: {engine: native, max_tokens: 8, max_prompt_tokens: 128}\n"
            "grpo: {num_generations: 4, prompts_per_step: 2}\n"
            "data: {task: arithmetic, num_examples: 64}\n"
            f"rewards: {{functions: ['{ROOT / 'tests' / 'reward_fns.py'}:token_reward']}}\n"
            f"train: {{max_steps: {steps}, learning_rate: 1.0e-2, micro_batch_size: 4, save_every: {save_every}, "
            f"keep_checkpoints: 2, output_dir: {out}, num_threads: 1}}\n"
            "tracking: {progress: false}\n")


def start(config: Path, resume: bool, log: Path) -> subprocess.Popen:
    """The run, its log (stderr) to a file: a pipe nobody reads while it runs could fill and stall it."""
    cmd = [sys.executable, "-m", "rl.grpo", "--config", str(config)] + (["--resume"] if resume else [])
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)


def newest_checkpoint(out: Path) -> int | None:
    """The step of the newest complete checkpoint, None when there is none."""
    from rl.checkpoint import list_checkpoints

    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].name.split("-")[-1]) if found else None


def resumed_at(log: Path) -> int | None:
    """The step a process said it resumed at, None when it did not say so."""
    found = RESUMED.findall(log.read_text())
    return int(found[-1]) if found else None


def checkpoints_load(out: Path) -> tuple[int, int]:
    """-> (complete checkpoints, of which fail to load), each loaded into a fresh process-free check."""
    from rl.checkpoint import list_checkpoints

    good = bad = 0
    for path in list_checkpoints(out / "checkpoints"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            import torch

            torch.load(path / "optimizer.pt", weights_only=False)
            torch.load(path / "rng.pt", weights_only=False)
            from safetensors.torch import load_file

            load_file(path / "adapter_model.safetensors")
            good += 1
        except Exception:
            bad += 1
    return good, bad


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_trials(work: Path, trials: int, steps: int, seed: int, log=print, after_checkpoint: bool = False,
               sig: signal.Signals = signal.SIGKILL, save_every: int = 1) -> dict:
    rng = random.Random(seed)
    reference, killed = work / "reference", work / "killed"
    for out in (reference, killed):
        (work / f"{out.name}.yaml").write_text(config_text(out, steps, save_every))
    t0 = time.perf_counter()
    proc = start(work / "reference.yaml", resume=False, log=work / "reference.log")
    while proc.poll() is None and not (reference / "metrics.jsonl").exists():
        time.sleep(0.02)
    first = time.perf_counter() - t0  # start-up and the first step
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed: {(work / 'reference.log').read_text()[-2000:]}")
    full = time.perf_counter() - t0
    step_s = (full - first) / max(steps - 1, 1)
    corrupted = during_write = restarts = clean_stops = outside_loop = lost_steps = 0
    # per resumed process that got somewhere (a checkpoint of its own, or the end): (the newest complete
    # checkpoint when it started, the step it said it resumed at)
    resumes: list[tuple[int, int | None]] = []
    logs = (work / f"killed-{n}.log" for n in range(trials + 1))

    def launch() -> tuple[subprocess.Popen, Path, int | None]:
        nonlocal restarts
        newest, proc_log = newest_checkpoint(killed), next(logs)
        if newest is None and (killed / "metrics.jsonl").exists():  # killed before its first checkpoint
            shutil.rmtree(killed)
            restarts += 1
        return start(work / "killed.yaml", resume=newest is not None, log=proc_log), proc_log, newest

    finished = False
    for trial in range(trials):
        proc, proc_log, newest = launch()
        if after_checkpoint:  # a checkpoint of its own first, then a random instant within two steps
            while proc.poll() is None and (newest_checkpoint(killed) or 0) <= (newest or 0):
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 2 * step_s))
        else:
            time.sleep(rng.uniform(0.7 * first, first + 3 * step_s))  # start-up, or a few steps into the run
        if proc.poll() is not None:  # it finished (or failed) before the kill
            if proc.returncode != 0:
                raise RuntimeError(f"trial {trial}: the run failed: {proc_log.read_text()[-2000:]}")
            finished = True
            break
        proc.send_signal(sig)
        proc.wait()
        if sig != signal.SIGKILL:
            if proc.returncode == 0:  # stopped cleanly: the step it was in finished and was saved
                clean_stops += 1
                rows = len(metrics(killed)) if (killed / "metrics.jsonl").exists() else 0
                lost_steps += rows - (newest_checkpoint(killed) or 0)
            elif proc.returncode == -sig:
                outside_loop += 1  # signalled outside the loop (start-up, or after the last step): as a kill
            else:
                raise RuntimeError(f"trial {trial}: {sig.name} ended the run with exit {proc.returncode}: "
                                   f"{proc_log.read_text()[-2000:]}")
        if newest is not None and (newest_checkpoint(killed) or 0) > newest:
            resumes.append((newest, resumed_at(proc_log)))
        during_write += any((killed / "checkpoints").glob(".tmp-step-*"))
        good, bad = checkpoints_load(killed)
        corrupted += bad
        done = len(metrics(killed)) if (killed / "metrics.jsonl").exists() else 0
        log(f"trial {trial + 1}: killed at step ~{done}; {good} complete checkpoints load, {bad} corrupted")
    if not finished:
        proc, proc_log, newest = launch()
        if proc.wait() != 0:
            raise RuntimeError(f"the final resume failed: {proc_log.read_text()[-2000:]}")
    if newest is not None:  # the last process ran to the end
        resumes.append((newest, resumed_at(proc_log)))
    ref, got = metrics(reference), metrics(killed)
    compared = [k for k in ref[0] if not k.startswith(VARYING)]
    mismatched = [r["step"] for r, g in zip(ref, got) if any(r.get(k) != g.get(k) for k in compared)]
    return dict(trials=trials, signal=sig.name, save_every=save_every, corrupted=corrupted,
                kills_during_checkpoint_write=during_write, clean_stops=clean_stops,
                stopped_outside_loop=outside_loop, lost_steps=lost_steps,
                steps=len(got), reference_steps=len(ref), metrics_compared=len(compared), mismatched_steps=mismatched,
                resumes=resumes, restarts=restarts, uninterrupted_seconds=full)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--after-checkpoint", action="store_true",
                        help="kill each process only after it has written a checkpoint (every start resumes)")
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM"], help="SIGKILL or SIGTERM")
    parser.add_argument("--save-every", type=int, default=1, help="train.save_every of the runs")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tandem-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run_trials(work, args.trials, args.steps, args.seed, after_checkpoint=args.after_checkpoint,
                        sig=signal.Signals[f"SIG{args.signal}"], save_every=args.save_every)
    print(json.dumps(result))
    ok = (result["corrupted"] == 0 and not result["mismatched_steps"] and result["steps"] == result["reference_steps"]
          and all(at == newest for newest, at in result["resumes"]) and result["lost_steps"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
