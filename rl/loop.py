"""The training machine every objective shares: set-up, the step loop, optimizer steps, checkpoints, saving.

    class MyTrainer(TrainerBase):
        def setup(self): ...              # data, rewards, engine: whatever the objective needs
        def train_step(self, step): ...   # one optimizer step (or several), -> metrics

GRPO (rl/trainer.py) and the objectives without a rollout (rl/offline.py: DPO, ORPO, KTO, SFT) are
subclasses: they differ in where a batch comes from and in the loss, not in how a run is kept.
`self.stream` (rl/data.py's PromptStream) is the data position saved in checkpoints.

Under torchrun every rank runs this loop (rl/distributed.py): subclasses take their rank's share of each
step's data, gradients are averaged over ranks before each optimizer step, metrics are averaged over ranks
and rank 0 writes them and the checkpoints.

Rank 0 also says how the run is doing (rl/health.py): a start-up summary, a warning when the metrics show that
nothing is being learned, and closing lines naming where the results are and the command that resumes.

SIGTERM or SIGINT (a cluster preempting the job, Ctrl-C) ends the run cleanly: the current step finishes, a
checkpoint of it is written and the command that resumes is printed (exit 0); a second signal ends it at once.

A subclass that sets `self.evaluation` (GRPO with eval.every: rl/evaluation.py) and implements evaluate() has
its held-out metrics added to the step's row when due, and with `self.best` (rl/best.py) the checkpoint of its
best evaluation kept apart from the rotation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import threading
from pathlib import Path

import torch
import yaml
from tqdm.contrib.logging import logging_redirect_tqdm

from rl.checkpoint import (drop_later, list_checkpoints, load_checkpoint, name_base_model, save_checkpoint,
                           save_sharded_checkpoint)
from rl.config import to_dict
from rl.distributed import (active, average_gradients, finish, full, full_model_state, full_states, init_from_env,
                            mean_over_ranks, shard, total)
from rl.errors import ConfigError, TrainingError
from rl.health import HealthMonitor, closing_lines, hints, startup_summary, stopped_lines
from rl.model import load_policy, resolve_device, resolve_dtype
from rl.resume import check_compatible, pick_checkpoint, saved_config
from rl.tracking import Tracker
from rollout.scheduler import MemoryScheduler

log = logging.getLogger("tandem")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # how clusters and spot instances preempt a job, and Ctrl-C
SIGNAL_AT = "TANDEM_SIGNAL_AT"  # for tests: "<phase>:<step>[:<rank>]" (rollout | train) sends SIGTERM there


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """Left-padded prompts + right-padded completions -> input_ids, attention_mask (b, Lp+Tc), Tc."""
    lp = max(len(p) for p in prompts)
    tc = max(max(len(c) for c in completions), 1)
    ids = torch.full((len(prompts), lp + tc), pad_id, dtype=torch.long)  # (b, Lp + Tc)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, lp - len(p):lp], mask[i, lp - len(p):lp] = torch.tensor(p), 1
        ids[i, lp:lp + len(c)], mask[i, lp:lp + len(c)] = torch.tensor(c, dtype=torch.long), 1
    return ids.to(device), mask.to(device), tc


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _plain_model(config, state: dict):
    """A plain HF model around gathered whole weights (built on the meta device, then handed the tensors)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    return plain


class TrainerBase:
    def __init__(self, cfg, resume: str | None = None):
        self.cfg = cfg
        self.rank, self.world = init_from_env()  # torchrun's process group, or a world of one
        # a group that a library makes later (vLLM makes a world of one) is not ours to leave: its own exit hook
        # destroys it, and fails with a traceback when we have done so already
        self.joined_group = active()
        self.out = Path(cfg.train.output_dir)
        self._check_output_dir(resume)
        # chosen (and verified) before the model loads: a damaged or missing checkpoint fails fast
        resume_from = pick_checkpoint(self.out, resume, self.rank) if resume else None
        if resume_from:  # likewise a config that cannot continue that run (before PyTorch's shape errors)
            check_compatible(saved_config(resume_from, self.out), to_dict(cfg), self.rank)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.train.seed)

        # the budget is enforced before the first allocation, so that the model's weights count against it
        self.memory = MemoryScheduler(resolve_device(cfg.model.device), cfg.train.gpu_memory_gb,
                                      cfg.train.memory_margin_gb)
        self.policy = load_policy(cfg.model, cfg.lora, cfg.train.seed)
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        self.full_parameters = not cfg.lora.enabled
        self.sharded = self.full_parameters and self.world > 1
        if self.sharded:  # full-parameter training over several ranks: FSDP2 (rl/distributed.py)
            if self.keeps_replica:  # the rollout engine's own whole copy, refreshed from the shards
                self.replica = copy.deepcopy(self.model).requires_grad_(False)
            shard(self.model, self.policy.device)
            self.memory.offload_optimizer_setting = False  # FSDP's optimizer state is sharded already
        self.setup()

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate,
                                           weight_decay=cfg.train.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.train.lr_scheduler, cfg.train.warmup_steps,
                                        self.total_updates())
        self.memory.attach(self.model, self.optimizer)
        self.step = 0
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient, in the whole run
        self.skipped_in_a_row = 0
        if resume_from:
            self._resume(resume_from)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.tracker = Tracker(self.out, cfg.tracking, to_dict(cfg), cfg.train.max_steps, self.step, self.rank)

    def take(self, per_rank: int) -> list[int]:
        """This rank's rows of the step: every rank draws world x per_rank rows from the same seeded stream
        (so the stream's position is the same everywhere) and keeps its own slice."""
        rows = self.stream.take(per_rank * self.world)
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    # ------------------------------------------------------------------------------------ for subclasses

    keeps_replica = False  # a full-parameter sharded run keeps a whole copy of the model for the rollout
    evaluation = None  # held-out evaluation (rl/evaluation.py's Evaluation), set by setup() where configured
    best = None  # the best checkpoint by an eval metric (rl/best.py's BestCheckpoint), likewise

    def setup(self) -> None:
        """Data (set self.stream), rewards, engine: called after the policy is loaded."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def total_updates(self) -> int:
        """Optimizer steps in the whole run (the learning-rate schedule's length)."""
        return self.cfg.train.max_steps

    def evaluate(self) -> dict:
        """The held-out metrics of the policy as it is now (eval/...); every rank takes part."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ set-up

    def _check_output_dir(self, resume) -> None:
        has_run = (self.out / "metrics.jsonl").exists() or (self.out / "checkpoints").exists()
        if has_run and not resume:
            raise ConfigError(f"train.output_dir {self.out} already holds a run; pass --resume to continue it, "
                              "or choose another train.output_dir")

    def _resume(self, path: Path) -> None:
        try:
            state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        except RuntimeError as e:  # the checkpoint is of another kind of run
            if "size mismatch" in str(e):  # PyTorch's message has a line per tensor: one line instead
                raise ConfigError(f"--resume: the tensors of {path} have other shapes than this run's model (another "
                                  "model or lora.r?); resume with the config of the run that wrote it") from None
            raise ConfigError(f"--resume: {e}") from None
        self._apply_hyperparameters()
        self.step = state["step"]
        self.stream.load_state_dict(state["data"])
        self.skipped_steps = state.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", path, self.step)
        if self.best is not None:  # its value, or (written after this step) its removal
            self.best.restore(self.step, self.rank)
        if self.rank == 0:  # going back (--resume PATH): the later checkpoints belong to the run abandoned here
            dropped = drop_later(self.out / "checkpoints", self.step)
            if dropped:
                log.info("removed the later checkpoints of the run abandoned at step %d: %s (steps %d and on run "
                         "again)", self.step, ", ".join(dropped), self.step + 1)

    def _apply_hyperparameters(self) -> None:
        """This run's learning rate and weight decay over those the optimizer and schedule state restored: a
        resume may change them (e.g. a lower rate after non-finite steps), and loaded state would undo that.
        The same expression as LambdaLR's, so that unchanged values give the same bits."""
        cfg, scheduler = self.cfg.train, self.scheduler
        scheduler.base_lrs = [cfg.learning_rate] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = cfg.learning_rate * factor(scheduler.last_epoch)
            group["weight_decay"] = cfg.weight_decay
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports

    # ------------------------------------------------------------------------------------ the loop

    stop_signal = None  # the name of the signal received, once one has been
    stopped = False  # the loop ended early on a signal, after a checkpoint

    def train(self) -> None:
        ok = False
        try:
            with self._above_the_bar(), self._stop_on_signals():
                self._say(self._summary())
                self._steps()
                if not self.stopped:
                    self.save_final()
                ok = True
                self._write_report()
                if self.stopped:
                    self._say(stopped_lines(self.cfg, module=self.module, step=self.step, world=self.world,
                                            signal_name=self.stop_signal))
                else:
                    self._say(closing_lines(self.cfg, module=self.module, step=self.step, world=self.world))
        finally:
            self.tracker.close()
            engine = getattr(self, "engine", None)  # GRPO's: shut down while the process group is there
            if hasattr(engine, "close"):
                engine.close()
            if self.joined_group:
                finish(ok)

    def _write_report(self) -> None:
        """curves.png and report.html of the run so far (rl/plot.py, rl/report.py), and the curves to wandb. A
        report that fails to draw costs a warning: the run itself is saved by now."""
        if self.rank != 0 or not self.cfg.tracking.report:
            return
        from rl.plot import plot
        from rl.report import write_report

        try:
            curves = plot([self.out], self.out / "curves.png")
            write_report([self.out], self.out / "report.html")
        except Exception as e:  # noqa: BLE001 (matplotlib, a disk that is full: any of it)
            log.warning("the run's curves.png and report.html could not be written (%s: %s); the run is saved, and "
                        "`python -m rl.report %s` tries again", type(e).__name__, e, self.out)
            return
        self.tracker.log_image("curves", curves)

    def _steps(self) -> None:
        cfg = self.cfg.train
        health = HealthMonitor(hints(self.cfg))
        while self.step < cfg.max_steps:
            self.step += 1
            metrics = mean_over_ranks(self.train_step(self.step))
            if self.evaluation is not None and self.evaluation.due(self.step, cfg.max_steps):
                metrics.update(self.evaluate())  # in this step's row: resume cuts and keeps them with it
            metrics["train/skipped_steps"] = self.skipped_steps
            self.tracker.log(self.step, metrics)
            for warning in health.observe(self.step, metrics) if self.rank == 0 else ():
                log.warning(warning)
            if self.skipped_in_a_row >= cfg.max_skipped_steps:
                found = list_checkpoints(self.out / "checkpoints")
                raise TrainingError(
                    f"step {self.step}: the loss or its gradients were not finite for {self.skipped_in_a_row} "
                    f"steps in a row, so the run stops (no update was applied in those steps). "
                    + (f"The last checkpoint, {found[-1]}, is intact: resume from it with --resume and a "
                       "lower train.learning_rate or train.max_grad_norm." if found else
                       "There is no checkpoint yet: lower train.learning_rate or train.max_grad_norm."))
            saved = cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps
            if saved:
                self.save_checkpoint()
            self._keep_best(metrics)
            # a signal: every rank stops after the same step (any rank's signal counts), with a checkpoint of it
            if total(float(self.stop_signal is not None)) > 0 and self.step < cfg.max_steps:
                self.stop_signal = self.stop_signal or "a signal to another rank"
                if not saved:
                    self.save_checkpoint()
                self.stopped = True
                return

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM or SIGINT: the current step finishes, a checkpoint is written and the run ends (exit 0); a
        second signal ends the process at once (a checkpoint being written is then left incomplete, and skipped:
        the previous one is intact)."""
        if threading.current_thread() is not threading.main_thread():  # Python takes signals in the main thread
            yield
            return

        def first(signum, frame):
            self.stop_signal = signal.Signals(signum).name
            if self.rank == 0:
                log.warning("%s: finishing step %d, then saving a checkpoint and stopping (a second signal stops at "
                            "once)", self.stop_signal, self.step)
            for s in STOP_SIGNALS:
                signal.signal(s, lambda signum, frame: os._exit(128 + signum))

        previous = {s: signal.signal(s, first) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def signal_point(self, phase: str, step: int) -> None:
        """Tests stop a run at a known point of a step (SIGNAL_AT "<phase>:<step>", or "...:<rank>" for one
        rank of a torchrun group), as a cluster's SIGTERM would."""
        if os.environ.get(SIGNAL_AT) in (f"{phase}:{step}", f"{phase}:{step}:{self.rank}"):
            os.kill(os.getpid(), signal.SIGTERM)

    def _keep_best(self, metrics: dict) -> None:
        """A checkpoint of this step under checkpoints/best/ when its evaluation is the best so far."""
        if self.best is None or not self.best.improves(metrics):
            return
        self.best.record(self.step, metrics)
        path = self.save_checkpoint(self.best.root, keep=1, state={"eval_best": self.best.state()})
        if self.rank == 0:
            log.info("step %d: %s %.4g, the best so far: kept as %s", self.step, self.best.metric, self.best.value,
                     path)

    # ------------------------------------------------------------------------------------ what the run says

    @property
    def module(self) -> str:
        """The command-line module of this run's objective (rl.grpo, rl.dpo, ...)."""
        return f"rl.{getattr(self, 'objective', 'grpo')}"

    def _above_the_bar(self):
        """Log lines printed above the progress bar rather than through it, while it is shown."""
        bar = self.tracker.bar
        return logging_redirect_tqdm(tqdm_class=type(bar)) if bar is not None else contextlib.nullcontext()

    def _say(self, lines: list[str]) -> None:
        if self.rank == 0:
            log.info("\n".join(lines))

    def _summary(self) -> list[str]:
        device, memory = self.policy.device, self.memory
        card = torch.cuda.get_device_properties(memory.device).total_memory if memory.cuda else None
        gib = lambda b: None if b is None else b / 2**30  # noqa: E731
        dtype = str(resolve_dtype(self.cfg.model.dtype, device)).removeprefix("torch.")
        return startup_summary(self.cfg, module=self.module, start_step=self.step, world=self.world,
                               device=str(device), dtype=dtype, threads=torch.get_num_threads(),
                               engine=self._engine_choice(),
                               budget_gb=gib(memory.budget), card_gb=gib(card), margin_gb=gib(memory.margin),
                               rows=self.stream.size)

    def _engine_choice(self) -> str | None:
        """The rollout engine and why (rollout/select.py records it on the engine)."""
        engine = getattr(self, "engine", None)  # GRPO's; the objectives without a rollout have none
        if engine is None:
            return None
        full = "" if self.cfg.lora.enabled else "; lora.enabled false always takes the native engine"
        return getattr(engine, "selection", type(engine).__name__) + full

    def _optimizer_step(self) -> float:
        """Clip and apply the accumulated gradients, unless they (or the loss) are not finite: then the
        update is skipped, counted (train/skipped_steps) and the learning-rate schedule moves on."""
        self.memory.before_optimizer_step()  # the optimizer state back on the GPU if the rollout moved it
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.sharded:  # FSDP has reduce-scattered (averaged) them in the backward
            average_gradients(params)  # over data-parallel ranks (each rank's loss is its share of the batch's)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            log.warning("step %d: non-finite gradients (norm %s); this update is skipped", self.step, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record_peak(self, phase: str, out: dict) -> None:
        """memory/<phase>_peak_gb: the phase's peak of allocated CUDA memory (on CPU: the process's peak RSS)."""
        out.update(self.memory.peak(phase))

    # ------------------------------------------------------------------------------------ saving

    def _trainer_state(self) -> dict:
        # the config too: a resume compares it with its own (rl/resume.py), even from another output_dir
        return {"data": self.stream.state_dict(), "skipped_steps": self.skipped_steps, "config": to_dict(self.cfg)}

    def save_checkpoint(self, root: Path | None = None, keep: int | None = None,
                        state: dict | None = None) -> Path | None:
        """Rank 0 writes, or with a sharded model every rank its shards (rl/checkpoint.py). root: default
        checkpoints/ (the best checkpoint has its own); keep: default train.keep_checkpoints; state: added to
        the trainer state."""
        root = root or self.out / "checkpoints"
        keep = keep or self.cfg.train.keep_checkpoints
        state = {**self._trainer_state(), **(state or {})}
        if self.sharded:
            return save_sharded_checkpoint(root, self.step, self.model, self.optimizer, self.scheduler, state, keep,
                                           self.rank)
        model, optimizer_state = self._savable()
        if self.rank != 0:
            return None
        return save_checkpoint(root, self.step, model, self.optimizer, self.scheduler, state, keep, optimizer_state,
                               base_model=self.cfg.model.name)

    def _savable(self):
        """(a model whose save_pretrained writes the trained weights, the optimizer state to write or None for
        the optimizer's own). LoRA: the adapter. Full-parameter: the whole model, with the optimizer state
        keyed by parameter names (it then loads at any world size); sharded (final export only): the weights
        gathered into a plain model on rank 0, a collective."""
        if not self.full_parameters:
            return self.model, None
        if not self.sharded:
            return self.model, full_states(self.model, self.optimizer)[1]
        state = full_model_state(self.model)
        return (_plain_model(self.model.config, state) if self.rank == 0 else None), None

    def save_final(self) -> None:
        if self.cfg.train.save_every:
            self.save_checkpoint()
        model = self._savable()[0] if self.sharded else self.model  # sharded: gathered (every rank takes part)
        if self.rank != 0:
            return
        name = "model" if self.full_parameters else "adapter"
        model.save_pretrained(self.out / name)
        name_base_model(self.out / name, self.cfg.model.name)
        self.tokenizer.save_pretrained(self.out / name)
        if self.cfg.train.save_merged and not self.full_parameters:  # (a whole model is its own merge)
            if self.cfg.model.load_in_4bit:
                log.warning("train.save_merged: skipped, a 4-bit base cannot be merged losslessly; load the base "
                            "in 16 bits and merge %s/adapter there", self.out)
            else:
                merged = self.model.merge_and_unload(safe_merge=True)
                merged.save_pretrained(self.out / "merged")
                self.tokenizer.save_pretrained(self.out / "merged")
