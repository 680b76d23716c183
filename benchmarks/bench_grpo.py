"""The GRPO step side by side: Tandem, TRL's GRPOTrainer and Unsloth on the same model files and settings.

    python benchmarks/bench_grpo.py [--shapes qwen2.5-0.5b,qwen2.5-1.5b] [--impls tandem,trl,unsloth]
        [--steps 4] [--completions 8] [--tokens 256] [--micro-batch N] [--json out.json] [--logs DIR]
    python benchmarks/bench_grpo.py --smoke      # tiny model, CPU, no 4-bit: checks that every path runs
    python benchmarks/bench_grpo.py --cap-gb 16 --tokens 8192 --shapes llama-3.1-8b   # a 16 GiB card
    python benchmarks/bench_grpo.py --shapes qwen2.5-1.5b --impls tandem --ranks 1,2  # weak scaling, torchrun

`--cap-gb` caps every implementation's CUDA caching allocator (torch.cuda.set_per_process_memory_fraction,
before anything is allocated; Tandem through train.gpu_memory_gb, which sets the same cap and plans within
it) and turns on each one's memory savers: TRL's gradient checkpointing, Unsloth's offloaded checkpointing,
Tandem's automatic micro-batch and activation policy. benchmarks/bench_memory.py sweeps it.

`tandem-4bit` is Tandem with rollout.native_decode_4bit (decode batches read the NF4 codes). The vLLM paths,
each in its fastest configuration on the same vLLM: `tandem-vllm` (rollout.engine vllm: the 4-bit base shared
with vLLM), `trl-vllm` (use_vllm, vllm_mode "colocate") and `unsloth-vllm` (fast_inference=True); vLLM takes
0.3 of the card in each.

Each (shape, implementation) runs in a fresh process (Unsloth patches TRL when imported, and peak memory
must be each one's own). The setting is the one the peers were measured in: random-init Qwen2.5 shapes
(vocabulary cut to the SmolLM2 tokenizer's 49,152), saved once in bf16 and loaded 4-bit (NF4, double
quantization), LoRA r16 / alpha 32 on q, k, v, o, gate, up, down; one prompt x `--completions` completions
x `--tokens` tokens per step; loss dapo, beta 0; a reward that varies across completions. Reported: the
median seconds per step over steps 2.. (the first pays one-time costs), split into the rollout (generation
and rewards; for TRL and Unsloth, TRL's generate-and-score call) and the rest of the step (training), and the
peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Write a short story about a robot who learns to paint. Make it vivid."
VLLM_SHARE = 0.3  # of the card, for every implementation's vLLM (weights + KV cache)
PHASES: dict[str, float] = {}  # Tandem's per-phase memory metrics, the largest over the steps
ROLLOUT_S: list[float] = []  # each step's rollout time (generation and rewards), for the per-phase split


def token_reward(prompts, completions, completion_ids=None, **kwargs):
    """Varies across completions of a random model, so that advantages are non-zero."""
    if completion_ids is None:
        return [float(len(c)) % 97 / 97 for c in completions]
    return [sum(ids) % 97 / 97 for ids in completion_ids]


def model_dir(shape: str) -> str:
    from rl.model import _random_hf_dir

    return str(_random_hf_dir(shape, 0))


def peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0


# ------------------------------------------------------------------ one implementation, in this process

def run_tandem(path: str, a) -> list[float]:
    from rl.config import load_config
    from rl.trainer import GRPOTrainer

    # random:<shape> loads the same files (written once by model_dir) and pairs them with the tokenizer
    overrides = ["--model.name", f"random:{a.shape}", "--model.load_in_4bit", str(not a.smoke).lower(),
                 "--lora.r", "16", "--lora.alpha", "32",
                 "--rollout.engine", "vllm" if a.impl == "tandem-vllm" else "native",
                 "--rollout.vllm_gpu_memory_utilization", str(VLLM_SHARE),
                 "--rollout.max_tokens", str(a.tokens),
                 "--grpo.num_generations", str(a.completions), "--grpo.prompts_per_step", "1",
                 "--grpo.loss_type", "dapo", "--grpo.beta", "0",
                 "--train.micro_batch_size", "auto" if a.cap_gb else str(a.micro_batch or a.completions),
                 "--train.gpu_memory_gb", str(a.cap_gb) if a.cap_gb else "null",
                 "--train.max_steps", str(a.steps), "--train.output_dir", f"/tmp/bench-grpo-tandem-{os.getpid()}",
                 "--train.save_every", "0", "--tracking.progress", "false",
                 "--rewards.functions", f"{ROOT / 'benchmarks' / 'bench_grpo.py'}:token_reward",
                 "--rollout.native_decode_4bit", str(a.impl == "tandem-4bit").lower()]
    cfg = load_config(str(ROOT / "examples" / "arithmetic.yaml"), overrides)
    trainer = GRPOTrainer(cfg)
    times = []
    for step in range(1, a.steps + 1):
        trainer.step = step
        metrics = trainer.train_step(step)
        times.append(metrics["timing/step"])
        ROLLOUT_S.append(metrics["timing/rollout"] + metrics["timing/rewards"])
        for key, value in metrics.items():  # the phases' peaks, and the plan the scheduler chose
            if key.startswith(("memory/", "rollout/waves")):
                PHASES[key] = max(PHASES.get(key, value), value)
    return times


def _trl_config(a, **extra):
    from trl import GRPOConfig

    micro = a.micro_batch or a.completions  # one optimizer step per generation batch of `completions`
    if a.completions % micro:
        raise SystemExit(f"--micro-batch {micro} must divide --completions {a.completions}")
    return GRPOConfig(output_dir=f"/tmp/bench-grpo-trl-{os.getpid()}", per_device_train_batch_size=micro,
                      gradient_accumulation_steps=a.completions // micro,
                      num_generations=a.completions, max_completion_length=a.tokens, loss_type="dapo", beta=0.0,
                      max_steps=a.steps, learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[],
                      bf16=not a.smoke, use_cpu=a.smoke, gradient_checkpointing=bool(a.cap_gb), **extra)


class _StepTimer:
    """A transformers callback recording each optimizer step's wall time."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)

        self.times: list[float] = []
        self.callback = Callback()

    def time_rollouts(self, trainer):
        """Times TRL's generation and scoring (with Unsloth too, whose GRPOTrainer is TRL's, patched): one call
        a step (it generates the whole batch of `completions` once, for every accumulated micro-batch), its
        rollout phase; the rest of the step is training."""
        generate = trainer._generate_and_score_completions

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            ROLLOUT_S.append(time.perf_counter() - t0)
            return out

        trainer._generate_and_score_completions = timed


def _dataset(a):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": PROMPT} for _ in range(a.steps * 2)])


def run_trl(path: str, a) -> list[float]:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import GRPOTrainer

    init = {"dtype": torch.float32 if a.smoke else torch.bfloat16}
    if not a.smoke:
        init["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16)
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=VLLM_SHARE,
                vllm_max_model_length=a.tokens + 64) if a.impl == "trl-vllm" else {}
    timer = _StepTimer()
    trainer = GRPOTrainer(model=path, reward_funcs=[token_reward],
                          args=_trl_config(a, model_init_kwargs=init, **vllm),
                          train_dataset=_dataset(a), processing_class=_tokenizer(),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"),
                          callbacks=[timer.callback])
    timer.time_rollouts(trainer)
    trainer.train()
    return timer.times


def run_unsloth(path: str, a) -> list[float]:
    from unsloth import FastLanguageModel  # first: it patches transformers and TRL

    from trl import GRPOTrainer

    fast = a.impl == "unsloth-vllm"  # its vLLM path, sharing its 4-bit base with vLLM
    model, tokenizer = FastLanguageModel.from_pretrained(
        path, max_seq_length=a.tokens + 64, load_in_4bit=True, fast_inference=fast,
        **(dict(gpu_memory_utilization=VLLM_SHARE, max_lora_rank=16) if fast else {}))
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth" if a.cap_gb else False)
    timer = _StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[token_reward], args=_trl_config(a, use_vllm=fast),
                          train_dataset=_dataset(a),
                          processing_class=_tokenizer(), callbacks=[timer.callback])
    timer.time_rollouts(trainer)
    trainer.train()
    return timer.times


def _tokenizer():
    from rl.model import load_tokenizer

    return load_tokenizer(None, None)


# ------------------------------------------------------------------ the sweep, one process per cell

def child(a) -> int:
    path = model_dir(a.shape)
    if a.cap_gb:
        import torch

        if torch.cuda.is_available():  # before anything is allocated, as on a card of this size
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gb * 2**30 / total))
    run = {"tandem": run_tandem, "tandem-4bit": run_tandem, "tandem-vllm": run_tandem, "trl": run_trl,
           "trl-vllm": run_trl, "unsloth": run_unsloth, "unsloth-vllm": run_unsloth}[a.impl]
    times = run(path, a)
    timed = times[1:] or times
    rollout = ROLLOUT_S[1:len(times)] or ROLLOUT_S[:1]
    split = dict(rollout_s=statistics.median(rollout),
                 train_s=statistics.median(t - r for t, r in zip(timed, rollout))) if rollout else {}
    # Tandem's scheduler resets the allocator's peak at every phase (it plans from each phase's own): the
    # process's peak is then the largest phase peak, not what the allocator reports at the end
    peak = max([peak_gb(), *(v * 2**30 / 1e9 for k, v in PHASES.items() if k.endswith("_peak_gb"))])
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun: rank 0 reports (its steps wait for every rank's gradients)
    print(json.dumps(dict(shape=a.shape, impl=a.impl, ranks=int(os.environ.get("WORLD_SIZE", "1")),
                          tokens=a.tokens, steps=len(times),
                          s_per_step=statistics.median(timed), step_times=times, **split, peak_gb=peak,
                          **PHASES)))
    return 0


def _run_cell(cmd: list[str], env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """One cell's process, in a session of its own: at the timeout the whole group goes (vLLM's engine core
    and torchrun's ranks are children that would otherwise keep their GPU memory)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()  # what it printed so far tells how far it got
        stderr += f"\nerror: timed out after {timeout:.0f} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--impls", default="tandem,trl,unsloth")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="completions per forward/backward, accumulated to one step (default: all of them)")
    parser.add_argument("--json", help="write all rows here (after every row)")
    parser.add_argument("--timeout", type=float, help="stop a cell's process after this many seconds (reported)")
    parser.add_argument("--logs", help="keep each cell's whole output in this directory (<shape>-<impl>.log)")
    parser.add_argument("--cap-gb", type=float, default=0, help="cap each implementation's GPU memory (GiB)")
    parser.add_argument("--ranks", default="1", help="Tandem under torchrun with these process counts, e.g. 1,2 "
                        "(one prompt per rank: the weak scaling)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, no 4-bit, 2 steps of 8 tokens")
    parser.add_argument("--shape", help=argparse.SUPPRESS)  # set for the child process
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.impl:  # a child: the parent passes every size explicitly
        return child(a)
    if a.smoke:
        a.shapes, a.steps, a.tokens, a.completions = "tiny", 2, 8, 4
        a.impls = ",".join(i for i in a.impls.split(",") if not i.startswith("unsloth"))  # Unsloth needs a GPU
    rows = []
    cells = [(shape, impl, ranks) for shape in a.shapes.split(",") for impl in a.impls.split(",")
             for ranks in (map(int, a.ranks.split(",")) if impl.startswith("tandem") else [1])]
    for shape, impl, ranks in cells:
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                        str(ranks)] if ranks > 1 else [])
        cmd = launcher + [__file__, "--shape", shape, "--impl", impl, "--steps", str(a.steps),
                          "--completions", str(a.completions), "--tokens", str(a.tokens),
                          "--micro-batch", str(a.micro_batch),
                          "--cap-gb", str(a.cap_gb)] + (["--smoke"] if a.smoke else [])
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        if a.smoke:  # TRL's log-prob kernels are Triton: on a CPU, through Triton's interpreter
            env["TRITON_INTERPRET"] = "1"
        started = time.perf_counter()
        out = _run_cell(cmd, env, a.timeout)
        wall_s = round(time.perf_counter() - started, 1)  # the cell's process: loading, engine start, every step
        if a.logs:  # a peer that fails says why somewhere in its output, not always on its last error line
            Path(a.logs).mkdir(parents=True, exist_ok=True)
            name = f"{shape}-{impl}-{a.completions}x{a.tokens}" + (f"-{ranks}ranks" if ranks > 1 else "")
            (Path(a.logs) / f"{name}.log").write_text(out.stdout + out.stderr)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            errors = [line for line in out.stderr.splitlines() if "rror" in line] or out.stderr.splitlines()
            row = dict(shape=shape, impl=impl, ranks=ranks, error=(errors or ["?"])[-1][:300], wall_s=wall_s)
        else:
            row = {**json.loads(lines[-1]), "wall_s": wall_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print("| shape | implementation | processes | s/step (median of steps 2..) | rollout s | train s | peak GB "
          "| process s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['impl']} | {r['ranks']} | error: {r['error']} | | | | {r['wall_s']} |")
        else:
            phases = " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ("rollout_s", "train_s"))
            print(f"| {r['shape']} | {r['impl']} | {r['ranks']} | {r['s_per_step']:.2f} | {phases} | "
                  f"{r['peak_gb']:.2f} | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
