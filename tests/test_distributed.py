"""Data-parallel GRPO and DPO through torchrun, on the CPU (gloo, 2 processes), against one process.

With rollout.max_rows = G every prompt is its own rollout wave, seeded by its index in the step's batch,
so 2 ranks x 1 prompt draw exactly the completions of 1 rank x 2 prompts; the LoRA update must then agree
within fp32 tolerance (only the order of the gradient sums differs).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
REWARD = ROOT / "tests" / "reward_fns.py"


def _config(tmp_path: Path, name: str, prompts_per_rank: int, steps: int, **extra) -> Path:
    cfg = {
        "model": {"name": "random:tiny", "device": "cpu"},
        "lora": {"r": 8},
        "rollout": {"engine": "native", "max_tokens": 8, "max_prompt_tokens": 64, "max_rows": 4},
        "grpo": {"num_generations": 4, "prompts_per_step": prompts_per_rank},
        "data": {"task": "arithmetic", "num_examples": 16},
        "rewards": {"functions": [f"{REWARD}:token_reward"]},
        "train": {"max_steps": steps, "learning_rate": 1e-2, "micro_batch_size": 4, "save_every": 1,
                  "output_dir": str(tmp_path / name), "num_threads": 1},
        "tracking": {"progress": False},
    }
    for section, values in extra.items():
        cfg[section].update(values)
    path = tmp_path / f"{name}.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(cfg))
    return path


def _run(args: list[str], processes: int = 1, module: str = "rl.grpo"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(processes)] if processes > 1 else [sys.executable]
    out = subprocess.run([*launcher, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 ranks x 1 prompt for 2 steps; 1 rank x 2 prompts for 3 steps; the first resumed on 1 rank to step 3."""
    tmp = tmp_path_factory.mktemp("dp")
    two = _config(tmp, "two", 1, 2)
    _run(["--config", str(two)], processes=2)
    one = _config(tmp, "one", 2, 3)
    _run(["--config", str(one)])
    _run(["--config", str(two), "--resume", "--train.max_steps", "3", "--grpo.prompts_per_step", "2"])
    return tmp


def test_two_ranks_train_as_one_rank_with_both_prompts(runs):
    # the 2-rank run's adapter after step 2 is in its checkpoint
    two = load_file(runs / "two" / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    one = load_file(runs / "one" / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    assert two.keys() == one.keys() and two
    moved = [k for k in two if "lora_B" in k and two[k].abs().sum() > 0]  # lora_B starts at zero: it trained
    assert moved
    for k in two:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_a_two_rank_run_writes_one_metrics_file_of_means_over_ranks(runs):
    two, one = _metrics(runs / "two"), _metrics(runs / "one")
    assert [r["step"] for r in two] == [1, 2, 3]  # steps 1-2 from 2 ranks, step 3 from the 1-rank resume
    assert not list((runs / "two").glob("metrics*.jsonl"))[1:]  # one file, written by rank 0
    for a, b in zip(two[:2], one[:2]):
        for key in ("reward", "reward_std", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        # the gradient itself, before Adam (whose update would hide a wrong scale)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), "grad_norm"


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs):
    """Resumed on 1 rank with 2 prompts a step, step 3 is the uninterrupted 1-rank run's step 3: the data
    position, the optimizer state and the adapter all carried over."""
    two, one = _metrics(runs / "two"), _metrics(runs / "one")
    assert two[2]["reward"] == pytest.approx(one[2]["reward"], rel=1e-6)
    final_two, final_one = _adapter(runs / "two"), _adapter(runs / "one")
    for k in final_one:
        torch.testing.assert_close(final_two[k], final_one[k], rtol=1e-4, atol=1e-5)


def test_dynamic_sampling_runs_the_same_rounds_on_every_rank(tmp_path):
    """Two ranks, one prompt each, rewards without signal on most prompts: every rank runs as many resample
    rounds as the neediest one (a rank that waited on the other would hang here), so the stream's position,
    saved in the checkpoint, is 2 ranks x (1 + rounds) prompts a step."""
    cfg = _config(tmp_path, "dyn", 1, 2, grpo={"dynamic_sampling": True, "max_resample_rounds": 2},
                  rewards={"functions": [f"{REWARD}:flat_unless_multiple_of_3"]}, data={"shuffle": False})
    _run(["--config", str(cfg)], processes=2)
    rows = _metrics(tmp_path / "dyn")
    assert [r["step"] for r in rows] == [1, 2]
    rounds = [r["dynamic_sampling/rounds"] for r in rows]  # a mean over ranks: whole when they agree
    assert all(float(n).is_integer() for n in rounds) and sum(rounds) > 0
    assert all(r["dynamic_sampling/prompts"] == 1 + n for r, n in zip(rows, rounds))
    state = json.loads((tmp_path / "dyn" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["data"] == {"epoch": 0, "index": int(sum(2 * (1 + n) for n in rounds))}


# ------------------------------------------------------------------------------------ full-parameter, FSDP2

FULL = {"enabled": False}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Full-parameter GRPO: 2 ranks (FSDP2) x 1 prompt for 2 steps; 1 rank x 2 prompts for 3 steps; the
    2-rank (sharded) checkpoint resumed to step 3 on 1 rank and, from a copy, on 2 ranks."""
    tmp = tmp_path_factory.mktemp("fsdp")
    two = _config(tmp, "two", 1, 2, lora=FULL)
    _run(["--config", str(two)], processes=2)
    shutil.copytree(tmp / "two", tmp / "two-again")
    one = _config(tmp, "one", 2, 3, lora=FULL)
    _run(["--config", str(one)])
    _run(["--config", str(one), "--resume", str(tmp / "one" / "checkpoints" / "step-000002"),
          "--train.output_dir", str(tmp / "one-resumed")])  # a whole-model checkpoint of one process
    _run(["--config", str(two), "--resume", "--train.max_steps", "3", "--grpo.prompts_per_step", "2"])
    again = _config(tmp, "two-again", 1, 3, lora=FULL)
    _run(["--config", str(again), "--resume"], processes=2)
    return tmp


def test_fsdp_ranks_train_the_whole_model_as_one_process(full_runs):
    two, one = _metrics(full_runs / "two"), _metrics(full_runs / "one")
    for a, b in zip(two[:2], one[:2]):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # FSDP's reduce-scatter: the same mean
    # the sharded run, resumed on 2 ranks from its sharded checkpoint, exports the single process's model
    assert (full_runs / "two-again" / "checkpoints" / "step-000002" / "sharded").is_dir()
    final = [load_file(full_runs / name / "model" / "model.safetensors") for name in ("two-again", "one")]
    assert final[0].keys() == final[1].keys() and len(final[0]) > 10  # every weight, gathered whole
    for k in final[1]:
        torch.testing.assert_close(final[0][k], final[1][k], rtol=1e-4, atol=1e-6)


def test_a_sharded_checkpoint_resumes_on_one_rank_and_on_two(full_runs):
    """Step 3 after resuming the 2-rank run's step-2 checkpoint, on 1 rank (2 prompts) and on 2 ranks,
    equals the uninterrupted 1-rank run's step 3; the final export is a plain HF model directory."""
    one = _metrics(full_runs / "one")[2]
    for name in ("two", "two-again"):
        got = _metrics(full_runs / name)
        assert [r["step"] for r in got] == [1, 2, 3]
        assert got[2]["reward"] == pytest.approx(one["reward"], rel=1e-6)
        assert got[2]["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert (full_runs / name / "model" / "config.json").is_file()
    # the optimizer state came back too: the models after step 3's update agree (also when one process
    # resumes its own whole-model checkpoint)
    one_final = load_file(full_runs / "one" / "model" / "model.safetensors")
    for name in ("two", "one-resumed"):
        final = load_file(full_runs / name / "model" / "model.safetensors")
        for k in one_final:
            torch.testing.assert_close(final[k], one_final[k], rtol=1e-4, atol=1e-6)


def test_full_parameter_dpo_is_refused_before_loading():
    from rl.config import OfflineRunConfig, build_config
    from rl.errors import ConfigError
    from rl.offline import OfflineTrainer

    cfg = build_config(OfflineRunConfig, {"lora": {"enabled": False}, "model": {"name": "random:tiny"}})
    with pytest.raises(ConfigError, match="DPO compares the policy with its reference"):
        OfflineTrainer(cfg, "dpo")


def test_data_parallel_dpo_matches_one_process(tmp_path):
    """DPO's batch split over 2 ranks (objective.batch_size per rank) gives the single process's update."""
    base = ["--config", str(ROOT / "examples" / "dpo.yaml"), "--model.name", "random:tiny", "--model.device", "cpu",
            "--train.max_steps", "1", "--train.save_every", "0", "--train.num_threads", "1",
            "--train.micro_batch_size", "2", "--tracking.progress", "false"]
    _run([*base, "--objective.batch_size", "2", "--train.output_dir", str(tmp_path / "two")], 2, "rl.dpo")
    _run([*base, "--objective.batch_size", "4", "--train.output_dir", str(tmp_path / "one")], 1, "rl.dpo")
    two, one = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


@pytest.mark.vllm
def test_each_rank_generates_with_its_own_vllm_engine(tmp_path):
    """vLLM in every rank's process (tensor parallel 1 on the torchrun group), shut down cleanly."""
    pytest.importorskip("vllm")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:  # each CUDA rank takes its own device
        pytest.skip("two ranks on CUDA need two GPUs (one per rank); tests/test_distributed_gpu.py runs them there")
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {name: smollm2-135m-instruct, dtype: bfloat16}\n"
        "lora: {r: 8}\n"
        "rollout: {engine: vllm, max_tokens: 12, max_prompt_tokens: 128, vllm_kv_cache_gb: 0.5}\n"
        "grpo: {num_generations: 4, prompts_per_step: 1}\n"
        "data: {task: arithmetic, num_examples: 16}\n"
        "rewards: {functions: [math_accuracy]}\n"
        f"train: {{max_steps: 2, save_every: 0, micro_batch_size: 8, num_threads: 1, output_dir: {tmp_path / 'run'}}}\n"
        "tracking: {progress: false}\n")
    out = _run(["--config", str(config)], processes=2)
    assert out.stderr.count("rollout engine: vLLM") == 2
    assert "Traceback" not in out.stderr
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]


def test_full_parameter_sft_sharded_over_two_ranks_matches_one_process(tmp_path):
    """Packed SFT of the whole model: FSDP2 over 2 ranks (4 examples each) against 1 process with 8."""
    base = ["--config", str(ROOT / "examples" / "sft.yaml"), "--model.name", "random:tiny", "--model.device", "cpu",
            "--lora.enabled", "false", "--train.max_steps", "2", "--train.save_every", "0",
            "--train.num_threads", "1", "--train.learning_rate", "1e-3", "--tracking.progress", "false"]
    _run([*base, "--objective.batch_size", "4", "--train.output_dir", str(tmp_path / "two")], 2, "rl.sft")
    _run([*base, "--objective.batch_size", "8", "--train.output_dir", str(tmp_path / "one")], 1, "rl.sft")
    for a, b in zip(_metrics(tmp_path / "two"), _metrics(tmp_path / "one")):
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
