"""Run configuration: one dataclass per section, filled from a YAML file and `--section.key value` overrides.

Both sources go through the same schema: values are coerced to the field's declared type, unknown keys are
errors that name the closest valid key, and each section validates itself in `__post_init__` with a message
that says how to fix the value. `GRPORunConfig` is the full schema of `python -m rl.grpo`.

    cfg = load_config("examples/arithmetic.yaml", ["--train.max_steps", "5"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl.errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(section: str, key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{section}.{key} is {value!r}; choose one of: {', '.join(map(str, choices))}")


def _one_source(task, path, tasks: str) -> None:
    _check((task is None) != (path is None),
           f"give exactly one of data.task ({tasks}) and data.path (a file or hub name)"
           + ("; to replace a task set in the YAML from the command line, add --data.task null"
              if task is not None else ""))


@dataclass
class ModelSection:
    # HF directory | hub name | path/to/file.gguf | smollm2-135m-instruct | random:<shape>
    name: str = "smollm2-135m-instruct"
    load_in_4bit: bool = False  # NF4 base with double quantization (bitsandbytes); LoRA stays in `dtype`
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    tokenizer: str | None = None  # tokenizer directory; default: the model's own (random models: SmolLM2's)
    # auto: chosen each step from the memory budget (none, checkpointed layers, or checkpointed layers whose
    # saved inputs wait in host memory) | true | false | offload
    gradient_checkpointing: bool | str = "auto"
    trust_remote_code: bool = False
    kernels: bool = True  # Tandem's Triton kernels in Llama/Qwen2/Qwen3/Mistral modules (CUDA only)

    def __post_init__(self):
        _check(bool(self.name), "model.name is empty; give an HF directory, a hub name, a .gguf file, "
               "smollm2-135m-instruct or random:<shape>")
        _one_of("model", "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"model.device is {self.device!r}; use auto, cpu, cuda or cuda:N")
        _check(self.gradient_checkpointing in (True, False, "auto", "offload"),
               f"model.gradient_checkpointing is {self.gradient_checkpointing!r}; use auto, true, false or offload")

    @property
    def activation_policy(self) -> str | None:
        """rollout/scheduler.py's name for the setting; None = chosen from the budget."""
        return {"auto": None, True: "checkpoint", False: "none", "offload": "offload"}[self.gradient_checkpointing]


@dataclass
class LoraSection:
    # false: full-parameter training of every weight (a 16/32-bit base; under torchrun, sharded with FSDP2)
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" = every attention and MLP projection (never the LM head), or a list of module names
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self):
        _check(self.r > 0, f"lora.r is {self.r}; the LoRA rank must be a positive integer such as 16")
        _check(self.alpha > 0, f"lora.alpha is {self.alpha}; use a positive value, usually 2 * lora.r")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout is {self.dropout}; use a value in [0, 1)")


@dataclass
class RolloutSection:
    engine: str = "auto"  # auto (vLLM when installed, else native) | native | vllm
    max_tokens: int = 256  # completion length cap
    # rows (completions) decoded at once; 0 = as many as fit the memory budget. G makes every prompt its own
    # wave, seeded by its index in the step: samples then do not depend on how prompts are split over ranks
    max_rows: int = 0
    max_prompt_tokens: int = 512  # longer prompts are refused with the row that has them
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: list[int] | None = None  # tokens that also end a completion, besides the model's EOS
    # Truncated importance sampling: per-token weights exp(old_logps - sampling_logps) clipped at this cap
    # correct for the engine's numerics differing from the trainer's. 0 turns it off.
    importance_sampling_cap: float = 2.0
    vllm_kv_cache_gb: float = 1.0  # vLLM on CPU: memory for its KV cache
    vllm_gpu_memory_utilization: float = 0.3  # vLLM on CUDA: its share of the card (weights + KV cache)
    vllm_share_weights: bool = True  # policy's base = vLLM's tensors; false: vLLM keeps its own (CPU: packed)
    # vLLM on CUDA without torch.compile or CUDA graphs: starts in seconds rather than a minute or more, decodes
    # slower. On the CPU vLLM always runs eager.
    vllm_enforce_eager: bool = False
    # native engine, QLoRA on CUDA: decode batches of up to 16 rows by reading the NF4 codes (no merged bf16
    # copy of the projections for them: less memory); off until its kernel is measured faster than merged
    native_decode_4bit: bool = False
    # multi-turn rollouts (rollout/environment.py): an environment class, pkg.module:Class or path/file.py:Class
    # (built-ins rollout.tools:Calculator, rollout.tools:PythonTool), one instance per completion; null = one turn
    environment: str | None = None
    max_turns: int = 4  # model turns per conversation; rollout.max_tokens caps all its tokens after the prompt
    environment_timeout_s: float = 10.0  # an environment's reset() or step() taking longer ends that conversation

    def __post_init__(self):
        _one_of("rollout", "engine", self.engine, ("auto", "native", "vllm"))
        _check(self.environment is None or (isinstance(self.environment, str) and ":" in self.environment),
               f"rollout.environment is {self.environment!r}; use pkg.module:Class or path/file.py:Class (e.g. "
               "rollout.tools:Calculator), or null for single-turn rollouts")
        _check(self.max_turns >= 1, f"rollout.max_turns is {self.max_turns}; use a positive count of model turns")
        _check(self.environment_timeout_s > 0,
               f"rollout.environment_timeout_s is {self.environment_timeout_s}; use a positive number of seconds")
        _check(self.max_tokens > 0, f"rollout.max_tokens is {self.max_tokens}; use a positive token count")
        _check(self.max_rows >= 0, f"rollout.max_rows is {self.max_rows}; use 0 (as many as fit) or a row count")
        _check(self.max_prompt_tokens > 0,
               f"rollout.max_prompt_tokens is {self.max_prompt_tokens}; use a positive token count")
        _check(self.temperature > 0, f"rollout.temperature is {self.temperature}; GRPO needs sampling, "
               "use a temperature > 0 (1.0 is usual)")
        _check(0.0 < self.top_p <= 1.0, f"rollout.top_p is {self.top_p}; use a value in (0, 1]")
        _check(self.top_k >= 0, f"rollout.top_k is {self.top_k}; use 0 (off) or a positive count")
        _check(self.stop_token_ids is None or all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"rollout.stop_token_ids is {self.stop_token_ids}; use a list of token ids (integers >= 0) or null")
        _check(self.vllm_kv_cache_gb > 0, f"rollout.vllm_kv_cache_gb is {self.vllm_kv_cache_gb}; use e.g. 1.0")
        _check(0 < self.vllm_gpu_memory_utilization < 1, f"rollout.vllm_gpu_memory_utilization is "
               f"{self.vllm_gpu_memory_utilization}; use a fraction in (0, 1), e.g. 0.3")
        _check(self.importance_sampling_cap >= 0,
               f"rollout.importance_sampling_cap is {self.importance_sampling_cap}; use 0 (off) or e.g. 2.0")


@dataclass
class GRPOSection:
    num_generations: int = 8  # G: completions per prompt
    prompts_per_step: int = 2
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | gspo | cispo | sapo (rl/objectives.py)
    epsilon: float = 0.2
    # None = epsilon (symmetric clipping); DAPO uses 0.28. cispo: the importance weight's cap is 1 + epsilon_high
    epsilon_high: float | None = None
    beta: float = 0.0  # KL coefficient (k3 estimator against the adapters-disabled policy)
    num_iterations: int = 1  # mu: optimizer passes over each generated batch
    scale_rewards: str = "group"  # group | batch | none (reinforce_pp normalizes over the batch itself)
    advantage: str = "group"  # group (GRPO's group mean) | rloo (leave-one-out) | reinforce_pp (batch-normalized)
    mask_truncated_completions: bool = False
    entropy_coef: float = 0.0  # entropy bonus: loss - entropy_coef * (the loss type's mean of token entropies)
    # the policy term on the highest-entropy tokens only: 0.2 keeps each micro-batch's top 20% (the 80/20 rule)
    top_entropy_quantile: float = 1.0
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature for positive advantages
    sapo_temperature_neg: float = 1.05  # ... and for the others
    # DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more prompts drawn, up to
    # max_resample_rounds extra rollouts of prompts_per_step prompts a step (then dropped groups fill the batch)
    dynamic_sampling: bool = False
    max_resample_rounds: int = 3

    def __post_init__(self):
        _check(self.num_generations >= 2, f"grpo.num_generations is {self.num_generations}; group-relative "
               "advantages need at least 2 completions per prompt (8 is usual)")
        _check(self.prompts_per_step >= 1, f"grpo.prompts_per_step is {self.prompts_per_step}; use >= 1")
        _one_of("grpo", "loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo"))
        _check(self.epsilon > 0, f"grpo.epsilon is {self.epsilon}; use a positive clip range such as 0.2")
        _check(self.epsilon_high is None or self.epsilon_high > 0,
               f"grpo.epsilon_high is {self.epsilon_high}; use a positive value (0.28 in DAPO) or null")
        _check(self.beta >= 0, f"grpo.beta is {self.beta}; use 0 (no KL term) or a positive coefficient")
        _check(self.num_iterations >= 1, f"grpo.num_iterations is {self.num_iterations}; use >= 1")
        _one_of("grpo", "scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        _one_of("grpo", "advantage", self.advantage, ("group", "rloo", "reinforce_pp"))
        _check(self.max_resample_rounds >= 0, f"grpo.max_resample_rounds is {self.max_resample_rounds}; use >= 0 "
               "(extra rollouts a step may take to replace groups whose rewards are all equal)")
        _check(self.entropy_coef >= 0 and math.isfinite(self.entropy_coef),
               f"grpo.entropy_coef is {self.entropy_coef}; use 0 (off) or a small positive bonus such as 1e-3")
        _check(0 <= self.top_entropy_quantile <= 1,
               f"grpo.top_entropy_quantile is {self.top_entropy_quantile}; use a fraction in [0, 1]: 1 keeps every "
               "token, 0.2 the top 20% by entropy")
        _check(self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0,
               f"grpo.sapo_temperature_pos/neg are {self.sapo_temperature_pos}/{self.sapo_temperature_neg}; use "
               "positive temperatures (1.0 and 1.05 in the SAPO paper)")


@dataclass
class TrainSection:
    max_steps: int = 100
    learning_rate: float = 1e-5
    # sequences per forward/backward (gradients accumulate over the step's batch); auto: the most that fit in
    # the memory budget (8 without a GPU)
    micro_batch_size: int | str = "auto"
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    output_dir: str = "runs/grpo"
    seed: int = 0
    save_every: int = 50  # steps between checkpoints; 0 = only the final adapter
    keep_checkpoints: int = 2
    save_merged: bool = False  # also write the base model with the adapter merged in
    gpu_memory_gb: float | None = None  # memory budget, enforced; None = the whole card
    memory_margin_gb: float | None = None  # kept free of plans (fragmentation, workspaces); None = 5%, >= 0.5
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    max_skipped_steps: int = 5  # a non-finite loss or gradient skips the update; this many in a row stop the run

    def __post_init__(self):
        _check(self.max_steps >= 1, f"train.max_steps is {self.max_steps}; use a positive step count")
        _check(self.learning_rate > 0 and math.isfinite(self.learning_rate),
               f"train.learning_rate is {self.learning_rate}; use a positive value such as 1e-5")
        _check(self.micro_batch_size == "auto" or (isinstance(self.micro_batch_size, int)
                                                   and self.micro_batch_size >= 1),
               f"train.micro_batch_size is {self.micro_batch_size!r}; use auto or an integer >= 1")
        _one_of("train", "lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine"))
        _check(self.warmup_steps >= 0, f"train.warmup_steps is {self.warmup_steps}; use >= 0")
        _check(self.max_grad_norm >= 0, f"train.max_grad_norm is {self.max_grad_norm}; use 0 (off) or > 0")
        _check(bool(self.output_dir), "train.output_dir is empty; give a directory for metrics and checkpoints")
        _check(self.save_every >= 0, f"train.save_every is {self.save_every}; use 0 (final only) or > 0")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints is {self.keep_checkpoints}; use >= 1")
        _check(self.gpu_memory_gb is None or self.gpu_memory_gb > 0,
               f"train.gpu_memory_gb is {self.gpu_memory_gb}; use a positive number of GB or null")
        _check(self.memory_margin_gb is None or self.memory_margin_gb >= 0,
               f"train.memory_margin_gb is {self.memory_margin_gb}; use a number of GB >= 0 or null")
        _check(self.num_threads >= 0, f"train.num_threads is {self.num_threads}; use 0 (default) or > 0")
        _check(self.max_skipped_steps >= 1, f"train.max_skipped_steps is {self.max_skipped_steps}; use >= 1")

    @property
    def fixed_micro_batch(self) -> int | None:
        return None if self.micro_batch_size == "auto" else self.micro_batch_size


@dataclass
class DataSection:
    task: str | None = None  # built-in offline task: arithmetic | countdown
    path: str | None = None  # local .jsonl/.json/.parquet/.csv file, or a hub dataset name
    name: str | None = None  # hub dataset configuration (e.g. "main" for openai/gsm8k)
    split: str = "train"
    prompt_column: str = "prompt"  # text, or a list of chat messages
    system_prompt: str | None = None  # prepended as a system message to chat prompts
    chat_template: bool = True  # apply the tokenizer's chat template to text prompts too
    num_examples: int = 2000  # rows generated for a built-in task
    shuffle: bool = True

    def __post_init__(self):
        _one_source(self.task, self.path, "arithmetic | countdown")
        if self.task is not None:
            _one_of("data", "task", self.task, ("arithmetic", "countdown"))
        _check(self.num_examples >= 1, f"data.num_examples is {self.num_examples}; use >= 1")


@dataclass
class RewardsSection:
    # built-in name | pkg.module:function | path/to/file.py:function
    functions: list[str] = field(default_factory=lambda: ["math_accuracy", "format"])
    weights: list[float] | None = None  # one per function; None = all 1.0
    timeout_s: float = 60.0  # per call of one reward function on one batch
    format: str = "think_answer"  # what the `format` reward checks: think_answer | boxed | a regex
    code_timeout_s: float = 10.0  # python_tests: wall-clock seconds per program (CPU seconds likewise)
    code_memory_mb: int = 1024  # python_tests: address space per program
    code_on_error: str = "zero"  # python_tests: a program that hangs or is killed scores 0 (zero) or None (none)
    # per_function: each function's rewards centred and scaled within each group before the weighted sum (GDPO),
    # so that one reward with a wide range does not drown the others; none: the weighted sum of the raw rewards
    normalize: str = "none"

    def __post_init__(self):
        _check(len(self.functions) >= 1, "rewards.functions is empty; list at least one, e.g. [math_accuracy]")
        _check(self.weights is None or len(self.weights) == len(self.functions),
               f"rewards.weights has {len(self.weights or [])} values for {len(self.functions)} functions; "
               "give one weight per function or leave it out")
        _check(self.timeout_s > 0, f"rewards.timeout_s is {self.timeout_s}; use a positive number of seconds")
        _check(self.code_timeout_s > 0, f"rewards.code_timeout_s is {self.code_timeout_s}; use a positive number")
        _check(self.code_memory_mb >= 16, f"rewards.code_memory_mb is {self.code_memory_mb}; use at least 16")
        _one_of("rewards", "code_on_error", self.code_on_error, ("zero", "none"))
        _one_of("rewards", "normalize", self.normalize, ("none", "per_function"))
        if self.format not in ("think_answer", "boxed"):
            try:
                re.compile(self.format)
            except re.error as e:
                raise ConfigError(f"rewards.format {self.format!r} is neither think_answer, boxed nor a valid "
                                  f"regular expression ({e}); fix the pattern or use a built-in format") from None


@dataclass
class TrackingSection:
    wandb: bool = False
    wandb_project: str = "tandem"
    wandb_mode: str = "auto"  # online | offline | auto: online where wandb has credentials, offline otherwise
    run_name: str | None = None
    tensorboard: bool = False
    progress: bool = True  # progress bar on stderr
    log_completions_every: int = 10  # steps between sample completions in samples.jsonl; 0 = never
    report: bool = True  # at the end: curves.png and report.html (rl/report.py) in train.output_dir

    def __post_init__(self):
        _one_of("tracking", "wandb_mode", self.wandb_mode, ("online", "offline", "auto"))
        _check(self.log_completions_every >= 0,
               f"tracking.log_completions_every is {self.log_completions_every}; use >= 0")


@dataclass
class EvalSection:
    """Held-out evaluation during GRPO training (rl/evaluation.py): the policy answers prompts it never trains
    on, through the rollout engine, scored by the run's reward functions. Off unless eval.every is set."""
    every: int = 0  # steps between evaluations, plus one after the last step; 0 = no evaluation
    # held-out prompts taken from the training data: a fraction (< 1) or a count (>= 1) of its rows, never
    # trained on (training rows whose prompt equals a held-out one are dropped too); unused with eval.data
    split: float = 0.1
    data: str | None = None  # eval prompts from elsewhere: a .jsonl/.json/.parquet/.csv file or a hub dataset
    data_split: str = "test"  # the split of a hub dataset in eval.data
    n: int = 8  # samples per prompt at eval.temperature, for pass@k; 0 = the greedy pass only
    k: list[int] | None = None  # the k of each pass@k reported (each <= eval.n); null = 1 and eval.n
    temperature: float = 1.0  # of the eval.n samples; pass@1 of the greedy completion is reported beside them
    max_tokens: int | None = None  # completion length cap; null = rollout.max_tokens
    # what counts as correct: a completion whose score from this reward function (an entry of rewards.functions,
    # or its function name) reaches eval.threshold; total = the weighted sum; null = the first of rewards.functions
    correct: str | None = None
    threshold: float = 1.0  # the score at or above which eval.correct counts a completion correct
    # keep checkpoints/best/ at the evaluation where this metric (higher is better) was highest so far: one of
    # eval/greedy_pass@1, eval/pass@<k>, eval/reward; null = no best checkpoint
    best_metric: str | None = None

    def __post_init__(self):
        _check(self.every >= 0, f"eval.every is {self.every}; use 0 (no evaluation) or a number of steps such as 25")
        _check(self.split > 0 and (self.split < 1 or float(self.split).is_integer()),
               f"eval.split is {self.split}; use a fraction of the dataset in (0, 1), such as 0.1, or a whole "
               "number of prompts, such as 200")
        _check(self.n >= 0, f"eval.n is {self.n}; use 0 (greedy only) or a number of samples per prompt such as 8")
        for k in self.k or []:
            _check(1 <= k <= self.n, f"eval.k holds {k}, but pass@k needs 1 <= k <= eval.n ({self.n}); "
                   f"use k values up to eval.n, or raise eval.n")
        _check(self.temperature > 0, f"eval.temperature is {self.temperature}; pass@k needs sampling, use a "
               "temperature > 0 (the greedy pass is reported anyway)")
        _check(self.max_tokens is None or self.max_tokens > 0,
               f"eval.max_tokens is {self.max_tokens}; use a positive token count, or null for rollout.max_tokens")

    @property
    def ks(self) -> list[int]:
        """The k of each pass@k: eval.k, or 1 and eval.n."""
        if self.k is not None:
            return sorted(set(self.k))
        return sorted({1, self.n}) if self.n else []

    @property
    def metric_names(self) -> list[str]:
        """The metrics eval.best_metric may name (all: higher is better)."""
        return ["eval/greedy_pass@1", *[f"eval/pass@{k}" for k in self.ks], "eval/reward"]

    def scorer(self, functions: list[str]) -> int | None:
        """The index in rewards.functions of the function that decides correctness; None = the weighted sum."""
        if self.correct == "total":
            return None
        if self.correct is None:
            return 0
        for i, spec in enumerate(functions):
            if self.correct in (spec, spec.rpartition(":")[2]):
                return i
        raise ConfigError(f"eval.correct is {self.correct!r}, which is not one of rewards.functions "
                          f"({', '.join(functions)}); name one of them, or total for their weighted sum")


def check_eval(ev: EvalSection, rewards: RewardsSection) -> None:
    """The eval keys that only make sense with evaluation on, and those that name other sections' values."""
    for key in ("data", "best_metric"):
        _check(ev.every > 0 or getattr(ev, key) is None, f"eval.{key} is set but eval.every is 0, so nothing is "
               "evaluated; set eval.every to the steps between evaluations (e.g. 25), or drop eval." + key)
    ev.scorer(rewards.functions)
    _check(ev.best_metric is None or ev.best_metric in ev.metric_names,
           f"eval.best_metric is {ev.best_metric!r}; use one of {', '.join(ev.metric_names)} (the pass@k follow "
           "eval.k), or null for no best checkpoint")


@dataclass
class GRPORunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=lambda: DataSection(task="arithmetic"))
    rewards: RewardsSection = field(default_factory=RewardsSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        check_full_parameter(self.model, self.lora)
        check_eval(self.eval, self.rewards)
        _check(not (self.rollout.environment and self.eval.every), "eval.every with rollout.environment: held-out "
               "evaluation runs single-turn rollouts and would not call the environment; set eval.every 0 (the "
               "training metrics env/... and rewards show the multi-turn run's progress)")
        if not self.lora.enabled:
            _check(self.grpo.beta == 0, f"grpo.beta is {self.grpo.beta} with lora.enabled false: the KL term needs "
                   "the reference policy, which LoRA runs get by turning the adapters off; use grpo.beta 0 or LoRA")
            _check(self.rollout.engine != "vllm", "rollout.engine vllm with lora.enabled false: the vLLM engine "
                   "updates LoRA adapters, not full weights; use rollout.engine native (or auto)")


def check_full_parameter(model: ModelSection, lora: LoraSection) -> None:
    if not lora.enabled:
        _check(not model.load_in_4bit, "lora.enabled false with model.load_in_4bit true: a 4-bit base cannot be "
               "trained; load it in 16 bits (model.load_in_4bit false) or train LoRA adapters on it (QLoRA)")


# ---------------------------------------------------------------------------------------------- no rollout

OBJECTIVES = ("dpo", "orpo", "kto", "sft")


@dataclass
class OfflineDataSection:
    """Datasets of the objectives without a rollout. Columns, by objective:
    dpo / orpo: prompt, chosen, rejected;  kto: prompt, completion, label (true = desirable);
    sft: prompt, completion, or messages (a chat whose last message is the assistant's answer).
    Prompts are text or chat messages; completions are text."""
    # arithmetic: examples of each kind built from the arithmetic task (offline); calculator (sft): the
    # arithmetic questions answered through rollout.tools' calculator, its call and the reading of its answer
    task: str | None = None
    path: str | None = None  # local .jsonl/.json/.parquet/.csv file, or a hub dataset name
    name: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    system_prompt: str | None = None
    chat_template: bool = True
    num_examples: int = 256  # rows generated for a built-in task
    max_length: int = 512  # tokens per example, prompt + completion; longer rows are refused at start-up
    shuffle: bool = True

    def __post_init__(self):
        _one_source(self.task, self.path, "arithmetic | calculator")
        if self.task is not None:
            _one_of("data", "task", self.task, ("arithmetic", "calculator"))
        _check(self.num_examples >= 1, f"data.num_examples is {self.num_examples}; use >= 1")
        _check(self.max_length >= 2, f"data.max_length is {self.max_length}; use at least 2 tokens")


@dataclass
class ObjectiveSection:
    beta: float = 0.1  # dpo, orpo, kto
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # dpo sigmoid / robust
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    batch_size: int = 8  # examples (pairs, for dpo and orpo) per optimizer step
    packing: bool = True  # sft: examples end to end in rows of data.max_length tokens
    completion_only: bool = True  # sft: loss on the completion's tokens only

    def __post_init__(self):
        _check(self.beta > 0, f"objective.beta is {self.beta}; use a positive value such as 0.1")
        _one_of("objective", "loss_type", self.loss_type, ("sigmoid", "ipo", "hinge", "robust"))
        _check(0 <= self.label_smoothing < 0.5,
               f"objective.label_smoothing is {self.label_smoothing}; use a value in [0, 0.5)")
        _check(self.desirable_weight > 0 and self.undesirable_weight > 0,
               "objective.desirable_weight and objective.undesirable_weight must be positive")
        _check(self.batch_size >= 1, f"objective.batch_size is {self.batch_size}; use >= 1")


@dataclass
class OfflineRunConfig:
    """The schema of `python -m rl.dpo | rl.orpo | rl.kto | rl.sft`: GRPO's sections without rollout and
    rewards, and an `objective` section."""
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: OfflineDataSection = field(default_factory=lambda: OfflineDataSection(task="arithmetic"))
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self):
        check_full_parameter(self.model, self.lora)


# ---------------------------------------------------------------------------------------------- loading


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close and "." in key:  # a right key under the wrong section: match on the key alone
        tail = key.split(".")[-1]
        close = [v for v in valid if v.split(".")[-1] == tail][:1]
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML or command-line value to a field's annotated type, or raise a ConfigError."""
    hint = typing.get_origin(annotation)
    if hint in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and str in options and "," not in value:
            return value  # list[str] | str: one word is the string ("all-linear"), "a,b" the list
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if hint is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):  # "a,b" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key value` or `--section.key=value` pairs; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value "
                              "(e.g. --train.max_steps 10)")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value, e.g. {arg} 10")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def build_config(schema: type, data: dict[str, Any]) -> Any:
    """Build a run config from a nested dict {section: {key: value}}; unknown keys name the nearest one."""
    sections = {f.name: f for f in dataclasses.fields(schema)}
    valid = [f"{s}.{k.name}" for s, f in sections.items() for k in dataclasses.fields(f.default_factory())]
    defaults = schema()
    built = {}
    for name in data:
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}" + _suggest(name, list(sections)))
    for name in sections:
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys to values, got {values!r}")
        section_type = type(getattr(defaults, name))
        hints = typing.get_type_hints(section_type)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {name}.{key}" + _suggest(f"{name}.{key}", valid))
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        base = dataclasses.asdict(getattr(defaults, name))
        base.update(kwargs)
        if name == "data" and ("path" in kwargs) and "task" not in kwargs:
            base["task"] = None  # a dataset path replaces the default built-in task
        built[name] = section_type(**base)
    return schema(**built)


def load_config(path: str | None, overrides: list[str] | None = None, schema: type = GRPORunConfig) -> Any:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file such as "
                              "examples/arithmetic.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    for dotted, value in _parse_overrides(overrides or []).items():
        section, _, key = dotted.partition(".")
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][key] = value
    return build_config(schema, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
