"""Memory scheduler: one GPU memory budget, taken in turn by the rollout and by training.

    memory = MemoryScheduler(device, budget_gb=cfg.train.gpu_memory_gb)   # before the model is loaded
    memory.attach(model, optimizer)
    outs = memory.generate(engine, prompts, params)         # ROLLOUT: room made, KV sized, waves, back-off
    plan = memory.plan_training(engine, tokens, sequences)  # TRAIN: micro-batch and activation policy
    memory.run_with_backoff("train", fn, plan, reset)       # a CUDA OOM halves the micro-batch and retries once
    memory.before_optimizer_step()                          # the optimizer state comes back for the update

The budget (train.gpu_memory_gb, default the whole card) is made real with
torch.cuda.set_per_process_memory_fraction, so that going over it fails here as it would on a smaller card.
What a phase may still take is the budget minus what is allocated minus a margin (fragmentation, cuBLAS
workspaces, CUDA graph pools; train.memory_margin_gb, default 5% of the budget and at least 0.5 GiB).

ROLLOUT. The optimizer state (AdamW's moments) and any gradients go to pinned host memory first (copies
queued on the compute stream; they come back just before the optimizer step). The KV cache is sized from
what is left: when all (prompts x G) rows do not fit, the batch runs in waves of as many rows as fit, whole
groups where a group fits, else a group's samples split over waves, each wave seeded apart. The native
engine builds its merged working weights only where they fit beside the whole batch's KV cache.

TRAIN. The engine's KV cache and working weights stay between steps when training fits beside them
(rebuilding them re-captures the decode graphs); otherwise they are released first. The micro-batch
(train.micro_batch_size auto) and the activation policy (model.gradient_checkpointing auto: none,
checkpointed layers, or checkpointed layers whose saved inputs wait in host memory) are the first that fit,
from a per-token estimate that every step's measured peak replaces.

OOM. A CUDA out-of-memory error frees what it can, halves the micro-batch or the wave (at one sequence:
moves to the next activation policy), logs it and retries once; a second one fails with the sizes that the
estimate says would fit. TRL and Unsloth take a fixed batch from the user and end the run on an OOM; vLLM
sizes its KV cache once, at start-up, from a fixed fraction of the card.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace

import torch

from rl.errors import ConfigError, TrainingError

log = logging.getLogger("tandem")

GIB = 2**30
ACTIVATIONS = ("none", "checkpoint", "offload")  # cheapest in time first, in memory last
CPU_MICRO_BATCH = 8  # train.micro_batch_size auto without a GPU budget to size it from
LOGITS_WORKSPACE = (1 << 27) * 6  # kernels/logprobs.py: one chunk of bf16 logits and its fp32 temporaries


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def plan_waves(num_prompts: int, n: int, max_rows: int) -> list[tuple[int, int, int]]:
    """Waves of at most `max_rows` rows -> [(first prompt, prompts, samples per prompt)]: whole groups of `n`
    when a group fits, else each prompt's samples split over consecutive waves."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if n <= max_rows:
        per = max_rows // n
        return [(p, min(per, num_prompts - p), n) for p in range(0, num_prompts, per)]
    return [(p, 1, min(max_rows, n - done)) for p in range(num_prompts) for done in range(0, n, max_rows)]


def _host_rows(row_bytes: int) -> int | None:
    """Rows of `row_bytes` each that fit in half the host memory available now (a power of two, at least one);
    None where the kernel does not say (no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(1, _floor_pow2(kb * 1024 // 2 // max(row_bytes, 1)))


def _wave_seed(params, first: int, part: int) -> int | None:
    """A wave's sampling seed: from the step's, its first prompt's index in the whole step's batch and, for a
    group split over waves, the part; the whole batch in one wave on one rank keeps the step's seed."""
    if params.seed is None:
        return None
    return params.seed + 7919 * first + 104729 * part


def activation_bytes_per_token(config, mode: str, element_bytes: int) -> int:
    """Training memory per token of a micro-batch, by activation policy: a Llama-family layer keeps for its
    backward the two norms' inputs and outputs, q, k, v, the attention output, gate, up and their product."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    layer = (4 * h + 2 * q + 2 * kv + 3 * i) * element_bytes
    head = 2 * h * element_bytes + 4 * h  # final hidden states, their gradient (fp32 in the chunked head)
    if mode == "none":
        return config.num_hidden_layers * layer + head
    working = 2 * layer  # the layer being recomputed: its activations and their gradients
    if mode == "checkpoint":
        return config.num_hidden_layers * h * element_bytes + working + head
    return working + head  # offload: the layers' saved inputs are in host memory


def set_activations(model, mode: str) -> None:
    """Switch the model's activation policy (it takes effect at the next forward). Without a GPU, offload is
    plain checkpointing: the activations are in host memory already (and pinned memory needs a GPU)."""
    if mode == "none":
        model.gradient_checkpointing_disable()
        return
    on_gpu = next(model.parameters()).device.type == "cuda"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                        offload=mode == "offload" and on_gpu)


@dataclass(frozen=True)
class TrainPlan:
    micro_batch: int
    activations: str  # one of ACTIVATIONS
    tokens: int  # the longest sequence of the batch, prompt and completion
    fixed_activations: bool  # set by the user: the back-off never changes it (a fixed micro-batch it halves)

    def smaller(self) -> TrainPlan | None:
        """The next plan down after an OOM: half the micro-batch; at one sequence, the next activation policy."""
        if self.micro_batch > 1:
            return replace(self, micro_batch=self.micro_batch // 2)
        if not self.fixed_activations and self.activations != ACTIVATIONS[-1]:
            return replace(self, activations=ACTIVATIONS[ACTIVATIONS.index(self.activations) + 1])
        return None


class MemoryScheduler:
    def __init__(self, device: torch.device, budget_gb: float | None = None, margin_gb: float | None = None,
                 offload_optimizer: bool | None = None, max_rows: int | None = None):
        """offload_optimizer: before every rollout; None = on a GPU (on the CPU, True copies to separate host
        buffers: the tests' round trip). max_rows: a cap on rows per rollout wave (tests; None = what fits)."""
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # "cuda" alone: the allocator's calls below need the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.budget: int | None = None
        if self.cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            if budget_gb is not None and budget_gb * GIB > total:
                raise ConfigError(f"train.gpu_memory_gb is {budget_gb} but the card has {total / GIB:.1f} GiB; "
                                  "use at most that, or null for the whole card")
            self.budget = total if budget_gb is None else int(budget_gb * GIB)
            if budget_gb is not None:  # before the model is loaded: every allocation counts against it
                torch.cuda.set_per_process_memory_fraction(self.budget / total, device)
        elif budget_gb is not None:
            log.info("train.gpu_memory_gb has no effect without a GPU")
        budget = self.budget or 0
        self.margin = int(margin_gb * GIB) if margin_gb is not None else max(GIB // 2, budget // 20)
        self.offload_optimizer_setting = offload_optimizer
        self.max_rows = max_rows
        self.model = self.optimizer = None
        self.offloaded = False
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # (param id, state key) -> host copy, reused
        self._grads: dict[torch.nn.Parameter, torch.Tensor] = {}  # gradients waiting on the host
        self._measured: dict[str, float] = {}  # activation bytes per token, by policy, from measured peaks
        self._train_base = self._train_fixed = 0
        self.backoffs = 0  # OOM back-offs in the whole run
        self.last_waves, self.last_rows = 0, 1  # the last rollout's waves (0: none yet) and rows per wave
        self.plan: TrainPlan | None = None

    def attach(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    # ------------------------------------------------------------------------------------ accounting

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def free(self) -> int | None:
        """Bytes a phase may still allocate; None without a GPU budget."""
        if self.budget is None:
            return None
        return self.budget - self.allocated() - self.margin

    def _free_for_rollout(self, engine) -> int | None:
        """free(), counting the engine's KV cache from the last rollout as free: it is dropped before a
        larger one is made."""
        free = self.free()
        return None if free is None else free + engine.held_bytes(kv_only=True)

    def peak(self, phase: str) -> dict:
        """memory/<phase>_peak_gb since the last call (without a GPU: the process's peak RSS), and a reset."""
        if not self.cuda:
            import resource

            return {"memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        out = {f"memory/{phase}_peak_gb": torch.cuda.max_memory_allocated(self.device) / GIB}
        torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def metrics(self) -> dict:
        out = {"memory/oom_backoffs": self.backoffs}
        if self.last_waves:  # GRPO's runs; the objectives without a rollout have none
            out["rollout/waves"] = self.last_waves
        if self.budget is not None:
            out["memory/budget_gb"] = self.budget / GIB
        if self.plan is not None:
            out["memory/micro_batch_size"] = self.plan.micro_batch
            out["memory/activation_policy"] = ACTIVATIONS.index(self.plan.activations)  # 0 none, 1 ckpt, 2 offload
        return out

    def _release_cached(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------ optimizer state

    def optimizer_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)

    def offload_optimizer(self) -> None:
        """AdamW's moments and any gradients to host memory (pinned on CUDA): queued copies, then the device
        copies are dropped (the allocator orders their reuse after the copies, on the same stream)."""
        if self.offloaded or self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                tensors = {k: t for k, t in state.items() if torch.is_tensor(t) and t.dim() > 0}
                if p.grad is not None:
                    tensors["grad"] = p.grad
                for key, t in tensors.items():
                    host = self._host.get((id(p), key))
                    if host is None or host.shape != t.shape or host.dtype != t.dtype:
                        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
                        self._host[(id(p), key)] = host
                    host.copy_(t, non_blocking=self.cuda)
                    if key == "grad":  # a parameter's .grad must be on its device: kept aside until the step
                        self._grads[p] = host
                        p.grad = None
                    else:
                        state[key] = host
        self.offloaded = True

    def before_optimizer_step(self) -> None:
        """The offloaded state back on the parameters' device (fresh copies: the host buffers are reused)."""
        if not self.offloaded:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                for key, t in list(state.items()):
                    if torch.is_tensor(t) and t.dim() > 0:
                        state[key] = t.to(p.device, non_blocking=self.cuda, copy=True)
                if p in self._grads:  # gradients from before the rollout, added to those accumulated since
                    grad = self._grads.pop(p).to(p.device, non_blocking=self.cuda, copy=True)
                    p.grad = grad if p.grad is None else p.grad.add_(grad)
        self.offloaded = False

    # ------------------------------------------------------------------------------------ rollout

    def generate(self, engine, prompts: list[list[int]], params, prompt_offset: int = 0):
        """engine.generate within the budget: room made, rows per wave from what is free, one retry on OOM.
        prompt_offset: the first prompt's index in the whole step's batch (data parallelism: the rank's
        share starts there); waves are seeded by it, so a prompt alone in its wave draws the same samples
        on whichever rank, and in whichever wave, it lands."""
        if self.offload_optimizer_setting or (self.offload_optimizer_setting is None and self.cuda):
            self.offload_optimizer()  # a few ms for LoRA's moments; their room goes to the KV cache
        per_row = getattr(engine, "bytes_per_row", None)
        rows = len(prompts) * params.n
        length = engine.rollout_length(max(map(len, prompts)), params.max_tokens) if per_row else 0
        row_bytes = per_row(length) if per_row else 0
        # without a GPU budget, host memory bounds the rollout (its KV cache lives there): a held-out evaluation
        # of hundreds of prompts x n samples would otherwise ask for more than the machine has
        host_rows = _host_rows(row_bytes) if per_row and not self.cuda and self.budget is None else None
        cap = host_rows if host_rows is not None and host_rows < rows else None  # only when the whole won't fit
        if per_row is None or (self.budget is None and self.max_rows is None and cap is None):
            self.last_waves = 1  # vLLM sizes and schedules its own KV cache
            return engine.generate(prompts, replace(params, seed=_wave_seed(params, prompt_offset, 0)))
        self.last_rows = rows
        need = row_bytes * (1 << max(0, rows - 1).bit_length())  # the engine rounds rows up to a power of two
        while True:
            try:
                return self._generate_in_waves(engine, prompts, params, prompt_offset, need, row_bytes, length, cap)
            except torch.OutOfMemoryError:
                pass  # handled after the except block, whose traceback still holds the failed wave's tensors
            engine.release()
            self._release_cached()
            if cap is not None or self.last_rows == 1:
                raise self._rollout_error(row_bytes, length, f"with waves of {self.last_rows} rows")
            cap = self.last_rows // 2
            self.backoffs += 1
            log.warning("rollout: CUDA out of memory with waves of %d rows; retrying with %d", self.last_rows, cap)

    def _generate_in_waves(self, engine, prompts, params, prompt_offset: int, need: int, row_bytes: int,
                           length: int, cap: int | None):
        free_memory = lambda: self._free_for_rollout(engine)  # noqa: E731
        if hasattr(engine, "prepare"):  # working weights only if they fit beside the whole batch's KV cache
            engine.prepare(len(prompts) * params.n, free_memory=free_memory, reserve=need)
        free = free_memory()
        max_rows = len(prompts) * params.n if free is None else _floor_pow2(max(0, free) // row_bytes)
        for limit in (self.max_rows, cap):
            max_rows = min(max_rows, limit) if limit is not None else max_rows
        if max_rows < 1:
            raise self._rollout_error(row_bytes, length, "before it started")
        waves = plan_waves(len(prompts), params.n, max_rows)
        # the rows of the largest wave run, not the plan's room: an out-of-memory retry halves what ran
        self.last_waves, self.last_rows = len(waves), min(max_rows, len(prompts) * params.n)
        if len(waves) > 1:
            room = "half the host's available memory" if free is None else f"{free / GIB:.2f} GiB free"
            log.info("rollout: %d rows in %d waves of at most %d (%.2f GiB of KV cache per row, %s)",
                     len(prompts) * params.n, len(waves), max_rows, row_bytes / GIB, room)
        prepared = {"refresh_weights": False} if hasattr(engine, "prepare") else {}
        groups: list[list] = [[] for _ in prompts]
        parts = [0] * len(prompts)  # waves so far that began at each prompt (a split group's parts)
        for first, count, n in waves:
            wave_params = replace(params, n=n, seed=_wave_seed(params, prompt_offset + first, parts[first]))
            parts[first] += 1
            for j, group in enumerate(engine.generate(prompts[first:first + count], wave_params, **prepared)):
                groups[first + j].extend(group)
        return groups

    def _rollout_error(self, row_bytes: int, length: int, when: str) -> TrainingError:
        message = (f"rollout: out of GPU memory {when}: one row of {length} tokens needs {row_bytes / GIB:.2f} GiB "
                   "(KV cache and sampling buffers)")
        if self.budget is not None:
            free = max(0, self.free())
            message += (f", and {free / GIB:.2f} GiB of the {self.budget / GIB:.1f} GiB budget are free beside the "
                        f"weights: rows of about {int(free / max(row_bytes / length, 1))} tokens would fit")
        return TrainingError(message + ". Lower rollout.max_tokens or rollout.max_prompt_tokens, raise "
                             "train.gpu_memory_gb, or load the base in 4 bits (model.load_in_4bit)")

    # ------------------------------------------------------------------------------------ training

    def bytes_per_token(self, mode: str) -> float:
        if mode in self._measured:
            return self._measured[mode]
        return activation_bytes_per_token(self.model.config, mode, self._element_bytes())

    def _element_bytes(self) -> int:
        return next(p for p in self.model.parameters() if p.is_floating_point()).element_size() \
            if self.model is not None else 2

    def _fixed_bytes(self, tokens: int) -> int:
        """What training takes besides activations: the gradients of the trainable parameters, the optimizer
        state when it comes back for the step, and the chunked head's logits."""
        grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        state = self.optimizer_bytes() if self.offloaded else 0
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return grads + state + min(LOGITS_WORKSPACE, tokens * vocab * 6)

    def plan_training(self, engine, tokens: int, sequences: int, micro_batch: int | None = None,
                      activations: str | None = None) -> TrainPlan:
        """The first (activation policy, engine kept or released) in which a micro-batch fits, and the largest
        such micro-batch (`micro_batch` when the user set it); applied to the model and the engine."""
        modes = [activations] if activations is not None else list(ACTIVATIONS if self.cuda else ACTIVATIONS[:1])
        free = self.free()
        chosen = None
        if free is None:
            chosen = (modes[0], micro_batch or min(CPU_MICRO_BATCH, sequences), False)
        else:
            held = engine.held_bytes() if engine is not None and hasattr(engine, "held_bytes") else 0
            fixed = self._fixed_bytes(tokens)
            for mode in modes:
                per_sequence = tokens * self.bytes_per_token(mode)
                for release, room in ((False, free - fixed), (True, free + held - fixed)):
                    fits = int(max(0, room) // per_sequence)
                    if fits >= (micro_batch or 1):
                        chosen = (mode, micro_batch or min(fits, sequences), release)
                        break
                if chosen:
                    break
            if chosen is None:
                chosen = (modes[-1], micro_batch or 1, True)
                log.warning("train: by the estimate, one sequence of %d tokens does not fit in the %.2f GiB left; "
                            "trying anyway", tokens, max(0, free + held - fixed) / GIB)
        mode, mb, release = chosen
        if release and engine is not None and hasattr(engine, "release"):
            engine.release()
            self._release_cached()
        plan = TrainPlan(mb, mode, tokens, activations is not None)
        self._apply(plan)
        return plan

    def _apply(self, plan: TrainPlan) -> None:
        if self.plan is None or self.plan.activations != plan.activations:
            set_activations(self.model, plan.activations)
        self.plan = plan
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._train_base = self.allocated()
            self._train_fixed = self._fixed_bytes(plan.tokens)  # with the optimizer state still out, if it is

    def observe_training(self) -> None:
        """Replace the estimate for the plan's activation policy with what this step's peak measured."""
        plan = self.plan
        if not self.cuda or plan is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device) - self._train_base - self._train_fixed
        per_token = peak / (plan.micro_batch * plan.tokens)
        if per_token > 0:
            self._measured[plan.activations] = max(per_token, self._measured.get(plan.activations, 0.0))

    def run_with_backoff(self, phase: str, fn, reset=None):
        """fn(plan) under the current plan; on a CUDA OOM: reset(), free, the next plan down, one retry."""
        failed = None
        while True:
            try:
                return fn(self.plan)
            except torch.OutOfMemoryError:
                pass  # handled after the except block, whose traceback still holds the failed pass's tensors
            if reset is not None:
                reset()
            self._release_cached()
            smaller = self.plan.smaller() if failed is None else None
            if smaller is None:
                raise self._train_error(phase, failed or self.plan, self.plan if failed else None)
            failed = self.plan
            self.backoffs += 1
            log.warning("%s: CUDA out of memory with micro-batches of %d sequences (activations: %s); retrying "
                        "with %d (%s)", phase, failed.micro_batch, failed.activations, smaller.micro_batch,
                        smaller.activations)
            self._apply(smaller)

    def _train_error(self, phase: str, failed: TrainPlan, retried: TrainPlan | None) -> TrainingError:
        tried = f"micro-batches of {failed.micro_batch} ({failed.activations})" + (
            f" and of {retried.micro_batch} ({retried.activations})" if retried else "")
        message = f"{phase}: out of GPU memory with {tried}, sequences of up to {failed.tokens} tokens"
        free = self.free()
        if free is not None:
            room = free - self._fixed_bytes(failed.tokens)
            per_token = self.bytes_per_token(ACTIVATIONS[-1])
            message += (f", in a budget of {self.budget / GIB:.1f} GiB. By the estimate, sequences of up to "
                        f"{max(0, int(room / per_token))} tokens fit one at a time with model.gradient_checkpointing "
                        "offload")
        return TrainingError(message + ": lower rollout.max_tokens or train.micro_batch_size, or raise "
                             "train.gpu_memory_gb. No update was applied in this step.")
