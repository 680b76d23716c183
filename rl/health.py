"""How a run is doing, in words: a start-up summary, warnings when nothing is being learned, closing lines.

    log.info("\\n".join(startup_summary(cfg, module="rl.grpo", ...)))    # once, before the first step
    monitor = HealthMonitor(hints(cfg))
    for message in monitor.observe(step, metrics):                      # after every step
        log.warning(message)
    log.info("\\n".join(closing_lines(cfg, module="rl.grpo", ...)))     # after the final save

The checks are pure functions over the rows that metrics.jsonl holds (TRL's metric names and ours). A metric
that a run does not write leaves its check silent: the objectives without a rollout (DPO, ORPO, KTO, SFT) have
no rewards, truncation or entropy, so only the zero-update check applies to them. A condition must hold for
several steps in a row before it is reported (one step of a few prompts says little), and each warning is
given once per run: it names the cause and the fix, and repeating it every step would bury the progress.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from rl.checkpoint import list_checkpoints
from rollout.scheduler import CPU_MICRO_BATCH

SEVERAL = 3  # steps in a row a condition must hold before it is reported
REWARD_FN_STEPS = 5  # steps from the start that a reward function must be flat before it is called flat
ENTROPY_FLOOR = 0.05  # nats per token: below it the policy samples nearly one completion per prompt
ZERO = 1e-12
WINDOW = max(SEVERAL, REWARD_FN_STEPS)  # rows a monitor keeps: no check looks further back


# ------------------------------------------------------------------------------------ metric rows


def value(row: dict, key: str) -> float | None:
    """The metric as a float; None where the run does not write it or it is not finite."""
    v = row.get(key)
    v = v.item() if hasattr(v, "item") else v
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def streak(rows: list[dict], holds) -> int:
    """How many of the last rows, in a row, `holds(row)` is true of."""
    n = 0
    for row in reversed(rows):
        if not holds(row):
            break
        n += 1
    return n


def _now(hints: dict, key: str) -> str:
    return f" (now {hints[key]:g})" if hints.get(key) is not None else ""


def hints(cfg) -> dict:
    """The settings the warnings name, where the run has them (GRPO's rollout and grpo sections)."""
    rollout, grpo = getattr(cfg, "rollout", None), getattr(cfg, "grpo", None)
    return {"max_tokens": getattr(rollout, "max_tokens", None), "temperature": getattr(rollout, "temperature", None),
            "beta": getattr(grpo, "beta", None)}


# ------------------------------------------------------------------------------------ the checks


def _no_signal(rows: list[dict], h: dict) -> str | None:
    n = streak(rows, lambda r: (value(r, "frac_reward_zero_std") or 0.0) >= 1.0)
    if n < SEVERAL:
        return None
    reward = value(rows[-1], "reward")
    mean = f"; reward {reward:g}" if reward is not None else ""
    return (f"no learning signal: for the last {n} steps every prompt's completions got equal rewards "
            f"(frac_reward_zero_std 1{mean}), so every advantage is 0 and the update changes nothing. Make the reward "
            "vary between completions of a prompt (partial credit rather than all-or-nothing), raise "
            f"rollout.temperature{_now(h, 'temperature')} for more varied completions, or check the "
            "reward function on a few completions (samples.jsonl): all at 0 often means the task is too hard for "
            "the model or the answer is not where the reward looks for it; all at the top, that it is solved")


def _no_update(rows: list[dict], h: dict) -> str | None:
    def zero(r: dict) -> bool:
        loss, grad = value(r, "loss"), value(r, "grad_norm")
        explained = (value(r, "frac_reward_zero_std") or 0.0) >= 1.0  # said by _no_signal, with its fix
        return loss is not None and grad is not None and abs(loss) < ZERO and grad < ZERO and not explained

    n = streak(rows, zero)
    if n < SEVERAL:
        return None
    return (f"nothing is being learned: the loss and the gradient norm have been 0 for the last {n} steps, so the "
            "weights do not change. In GRPO this comes from advantages of 0 or from every completion token being "
            "masked (grpo.mask_truncated_completions with every completion truncated: raise rollout.max_tokens); "
            "otherwise check that the examples have completion tokens to train on")


def _truncated(rows: list[dict], h: dict) -> str | None:
    n = streak(rows, lambda r: (value(r, "completions/clipped_ratio") or 0.0) >= 1.0)
    if n < SEVERAL:
        return None
    return (f"every completion was cut off at rollout.max_tokens{_now(h, 'max_tokens')} in the last "
            f"{n} steps (completions/clipped_ratio 1): no completion ends, so an answer at the end is never "
            "written. Raise rollout.max_tokens, or ask for shorter answers in the prompt")


def _entropy(rows: list[dict], h: dict) -> str | None:
    n = streak(rows, lambda r: value(r, "entropy") is not None and value(r, "entropy") < ENTROPY_FLOOR)
    if n < SEVERAL:
        return None
    return (f"the policy's entropy has collapsed: {value(rows[-1], 'entropy'):.3g} nats per token (below "
            f"{ENTROPY_FLOOR}) for the last {n} steps, so it samples nearly the same completion every time and "
            f"its groups stop differing. Raise grpo.beta{_now(h, 'beta')} (a KL term keeps the policy near "
            f"the base model), raise rollout.temperature{_now(h, 'temperature')}, or lower "
            "train.learning_rate")


def _flat_reward_functions(rows: list[dict]) -> dict[str, str]:
    """Reward functions that gave every completion of a step the same score in every step so far."""
    if len(rows) < REWARD_FN_STEPS:
        return {}
    names = [k[len("rewards/"):-len("/std")] for k in rows[-1] if k.startswith("rewards/") and k.endswith("/std")]
    out = {}
    for name in names:
        if all((value(r, f"rewards/{name}/std") or 0.0) < ZERO for r in rows):
            mean = value(rows[-1], f"rewards/{name}/mean")
            score = f"the same score ({mean:g})" if mean is not None else "None (not applicable)"
            out[f"reward:{name}"] = (
                f"reward function {name} has given every completion {score} in each of the {len(rows)} steps so "
                f"far: it adds nothing to the advantages. Check it on a few completions (samples.jsonl), or drop "
                "it from rewards.functions")
    return out


CHECKS = {"no_signal": _no_signal, "no_update": _no_update, "truncated": _truncated, "entropy": _entropy}


def diagnose(rows: list[dict], h: dict | None = None, from_start: bool = True) -> dict[str, str]:
    """{check: message} for every condition that holds at the last row of `rows`, the run's latest metrics.
    from_start: the rows begin at the run's first step (whether a reward function was ever varied needs them)."""
    h = h or {}
    found = {key: message for key, check in CHECKS.items() if (message := check(rows, h)) is not None}
    if from_start:
        found.update(_flat_reward_functions(rows))
    return found


class HealthMonitor:
    """diagnose() after every step, each warning said once. It keeps the last WINDOW rows: a flat reward
    function is flat from the start, so it is found by step REWARD_FN_STEPS or never."""

    def __init__(self, h: dict | None = None):
        self.hints = h or {}
        self.rows: list[dict] = []
        self.steps = 0
        self.said: set[str] = set()

    def observe(self, step: int, metrics: dict) -> list[str]:
        """-> the warnings that hold now and were not said before, each starting with the step."""
        self.steps += 1
        self.rows = (self.rows + [{k: value(metrics, k) for k in metrics}])[-WINDOW:]
        found = diagnose(self.rows, self.hints, from_start=self.steps <= WINDOW)
        new = {k: m for k, m in found.items() if k not in self.said}
        self.said.update(new)
        return [f"step {step}: {m}" for m in new.values()]


# ------------------------------------------------------------------------------------ start and end


def startup_summary(cfg, *, module: str, start_step: int, world: int, device: str, dtype: str, threads: int,
                    engine: str | None, budget_gb: float | None, card_gb: float | None, margin_gb: float | None,
                    rows: int) -> list[str]:
    """What this run is about to do, once, before its first step."""
    m, t = cfg.model, cfg.train
    weights = f"4-bit NF4 base (QLoRA), computing in {dtype}" if m.load_in_4bit else f"{dtype} (not 4-bit)"
    if cfg.lora.enabled:
        targets = cfg.lora.target_modules
        targets = targets if isinstance(targets, str) else ", ".join(targets)
        trained = f"LoRA r {cfg.lora.r} (alpha {cfg.lora.alpha}, {targets})"
    else:
        trained = "every weight (full-parameter training, lora.enabled false)"
    steps = f"steps {start_step + 1}-{t.max_steps}" + (f" (resumed at step {start_step})" if start_step else "")
    micro = t.micro_batch_size
    if budget_gb is not None:
        memory = (f"budget {budget_gb:.1f} GiB of the card's {card_gb:.1f} GiB (train.gpu_memory_gb "
                  f"{t.gpu_memory_gb if t.gpu_memory_gb is not None else 'null: the whole card'}), margin "
                  f"{margin_gb:.1f} GiB; micro-batch {micro}"
                  + (": planned each step from what the budget leaves" if micro == "auto" else ""))
    else:
        memory = f"no GPU budget (not on a GPU); micro-batch {micro}" + (
            f" ({CPU_MICRO_BATCH} without a GPU)" if micro == "auto" else "")
    source = f"task {cfg.data.task}" if getattr(cfg.data, "task", None) else str(getattr(cfg.data, "path", ""))
    data = f"{rows} rows ({source})"
    grpo = getattr(cfg, "grpo", None)
    if grpo is not None:
        data += (f"; a step: {_count(grpo.prompts_per_step, 'prompt')} x {grpo.num_generations} completions of at "
                 f"most {_count(cfg.rollout.max_tokens, 'token')}")
        if cfg.rollout.environment:
            data += (f", multi-turn with {cfg.rollout.environment} (up to {_count(cfg.rollout.max_turns, 'model turn')}"
                     "; its answers are in the tokens, not in the loss)")
    out = Path(t.output_dir)
    saved = "adapter/" if cfg.lora.enabled else "model/"
    if cfg.lora.enabled and t.save_merged and not m.load_in_4bit:  # (a 4-bit base is not merged: loop.py says so)
        saved += ", merged/"
    checkpoints = (f"checkpoints/ every {t.save_every} steps and at the end (the last {t.keep_checkpoints} kept)"
                   if t.save_every else "no checkpoints (train.save_every 0)")
    lines = [f"{module}: {steps}",
             f"  model    {m.name}, {weights}; training {trained}",
             f"  device   {device}" + (f", {_count(threads, 'CPU thread')}" if device == "cpu" else "")
             + (f"; {world} ranks (torchrun)" if world > 1 else "")]
    if engine is not None:
        lines.append(f"  engine   {engine}")
    lines += [f"  memory   {memory}",
              f"  data     {data}",
              f"  outputs  {out}/: metrics.jsonl, {checkpoints}, {saved} at the end"]
    return lines


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def resume_command(cfg, module: str, world: int, further: bool = True) -> str:
    """The command that continues this run from its last checkpoint (further: beyond its end, to a larger
    train.max_steps). The run's own config.yaml holds every setting, overrides included."""
    launch = f"torchrun --nproc_per_node {world} -m {module}" if world > 1 else f"python -m {module}"
    config = Path(cfg.train.output_dir) / "config.yaml"
    command = f"{launch} --config {shlex.quote(str(config))} --resume"
    return command + (f" --train.max_steps {2 * cfg.train.max_steps}" if further else "")


def stopped_lines(cfg, *, module: str, step: int, world: int, signal_name: str) -> list[str]:
    """What a run stopped by a signal says last: the checkpoint of the step it finished, and how to go on."""
    checkpoint = Path(cfg.train.output_dir) / "checkpoints" / f"step-{step:06d}"
    return [f"{module}: stopped by {signal_name} after step {step}; checkpoint {checkpoint}",
            f"  resume   {resume_command(cfg, module, world, further=False)}"]


def closing_lines(cfg, *, module: str, step: int, world: int) -> list[str]:
    """Where the run's results are and how to go on, after the final save: only what is on disk is named."""
    out = Path(cfg.train.output_dir)
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    lines = [f"{module}: done, {step} steps; results in {out}/"]
    trained = out / ("adapter" if cfg.lora.enabled else "model")
    if trained.is_dir():
        what = f"LoRA adapter, on base model {cfg.model.name}" if cfg.lora.enabled else "the whole trained model"
        lines.append(f"  {trained.name:<9}{trained}  ({what})")
    if (out / "merged").is_dir():
        lines.append(f"  merged   {out / 'merged'}  (base model with the adapter merged in)")
    for name in ("metrics.jsonl", "samples.jsonl"):
        if (out / name).is_file():
            lines.append(f"  {name.split('.')[0]:<9}{out / name}")
    best = list_checkpoints(out / "checkpoints" / "best")
    if best:
        lines.append(f"  best     {best[-1]}  (the best checkpoint by {cfg.eval.best_metric})")
    if (out / "report.html").is_file():
        lines.append(f"  report   {out / 'report.html'}  (curves, settings and sample completions; open it in a "
                     f"browser)")
    lines.append(f"  plots    python -m rl.plot {q(out)}  (writes {out / 'curves.png'}), python -m rl.report "
                 f"{q(out)} [MORE_RUNS...]")
    if trained.is_dir():
        lines.append(f"  try it   python -m rl.generate {q(out)}  (chat with the trained policy)")
    if module == "rl.grpo" and trained.is_dir():  # the offline objectives have no reward functions to score with
        lines.append(f"  evaluate python -m rl.evaluate {q(out)} --data held-out|FILE|TASK  (writes "
                     f"{out / 'eval.json'})")
    if list_checkpoints(out / "checkpoints"):
        lines.append(f"  resume   {resume_command(cfg, module, world)}  (train.max_steps: the step to stop at)")
    else:
        lines.append("  resume   not possible: no checkpoint was kept (train.save_every 0); set train.save_every "
                     "to keep one")
    return lines
