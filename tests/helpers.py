"""Small shared builders for the tests: tiny random policies and run configs."""

import torch

from rl.config import GRPORunConfig, LoraSection, ModelSection, build_config
from rl.model import load_policy


def tiny_policy(shape="tiny", load_in_4bit=False, lora_r=8, seed=0, perturb_lora=True, dtype="float32"):
    """A tiny random-init policy with LoRA; lora_B is made non-zero so that the adapters change outputs.

    fp32 on every device (auto would be bf16 on CUDA): the tests compare implementations token for token, and
    in bf16 two correct ones round differently and part at the first near-tie of a random model."""
    model = ModelSection(name=f"random:{shape}", load_in_4bit=load_in_4bit, kernels=False,  # tests patch explicitly
                         dtype=dtype)
    policy = load_policy(model, LoraSection(r=lora_r), seed=seed)
    if perturb_lora:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return policy


def run_config(tmp_path, **sections) -> GRPORunConfig:
    """A small, fast GRPO run on the tiny random model; `sections` override {section: {key: value}}."""
    base = {
        "model": {"name": "random:tiny"},
        "lora": {"r": 8},
        "rollout": {"engine": "native", "max_tokens": 8, "max_prompt_tokens": 128},  # vLLM's tests are their own
        "grpo": {"num_generations": 4, "prompts_per_step": 2},
        "data": {"task": "arithmetic", "num_examples": 16},
        "rewards": {"functions": [f"{__file__.rsplit('/', 1)[0]}/reward_fns.py:token_reward"]},
        "train": {"max_steps": 2, "learning_rate": 1e-2, "micro_batch_size": 4, "output_dir": str(tmp_path / "run"),
                  "save_every": 0, "num_threads": 2},
        "tracking": {"progress": False, "report": False},  # (the browser tests write reports)
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return build_config(GRPORunConfig, base)


def grpo_with_vllm(tmp_path, model_yaml: str):
    """Three steps of `python -m rl.grpo` with rollout.engine vllm, in its own process as a user runs it
    -> (the finished process, the metrics rows)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {model_yaml}\n"
        "lora: {r: 8}\n"
        "rollout: {engine: vllm, max_tokens: 12, max_prompt_tokens: 128, vllm_kv_cache_gb: 0.5}\n"
        "grpo: {num_generations: 4, prompts_per_step: 2}\n"
        "data: {task: arithmetic, num_examples: 16}\n"
        "rewards: {functions: [math_accuracy]}\n"
        f"train: {{max_steps: 3, save_every: 0, micro_batch_size: 8, output_dir: {tmp_path / 'run'}}}\n"
        "tracking: {progress: false}\n")
    result = subprocess.run([sys.executable, "-m", "rl.grpo", "--config", str(config)],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def set_lora_b(model, seed: int, scale: float = 0.1):
    """Every LoRA B matrix drawn from N(0, scale^2) with this seed: an adapter that changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))


def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(vocab,) fp32 log-probabilities of the token after `ids`, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float(), -1)


def greedy_partings(model, prompts, ours, theirs, bound: float) -> list[int]:
    """Two engines' greedy completions (one per prompt) compared token by token: wherever they part, the
    model's own top two tokens there must be within `bound` nats (a near-tie its rounding can flip). -> per
    prompt, the tokens identical before the parting (printed as a total)."""
    agreed = []
    for prompt, mine, other in zip(prompts, ours, theirs):
        a, b = mine[0].token_ids, other[0].token_ids
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreed.append(k)
        # each engine's own log-probs against the model's, teacher-forced along that engine's completion: an
        # engine whose whole distribution is shifted shows it on every token, a near-tie only at the parting
        print(f"own vs model, max |gap| over the completion: {_own_vs_model(model, prompt, mine[0])} / "
              f"{_own_vs_model(model, prompt, other[0])}")
        if k < min(len(a), len(b)):
            lp = next_token_logprobs(model, prompt + a[:k])
            gap = abs(float(lp[a[k]] - lp[b[k]]))
            assert gap < bound, (f"token {k}: the model's log-probs of the two tokens {float(lp[a[k]]):.3f} / "
                                 f"{float(lp[b[k]]):.3f} (its top {float(lp.max()):.3f}), the engines' own "
                                 f"{_own_logprob(mine[0], k)} / {_own_logprob(other[0], k)}, the logits' largest "
                                 f"magnitude there {_largest_logit(model, prompt + a[:k]):.1f}")
    total = sum(max(len(a[0].token_ids), len(b[0].token_ids)) for a, b in zip(ours, theirs))
    print(f"greedy agreement: {sum(agreed)}/{total} tokens identical before any parting")
    return agreed


def _own_vs_model(model, prompt: list[int], completion) -> str:
    logprobs = getattr(completion, "logprobs", None)
    if not logprobs or not completion.token_ids:
        return "?"
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt) + list(completion.token_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, len(prompt) - 1:-1].float()
    theirs = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion.token_ids, device=device)[:, None])
    own = torch.tensor(list(logprobs)[:len(completion.token_ids)], device=device, dtype=torch.float32)
    return f"{float((theirs[:len(own), 0] - own).abs().max()):.3f}"


def _largest_logit(model, ids: list[int]) -> float:
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().abs().max())


def _own_logprob(completion, k: int) -> str:
    logprobs = getattr(completion, "logprobs", None)
    return f"{logprobs[k]:.3f}" if logprobs is not None and k < len(logprobs) else "?"


def crash_at(trainer, step: int) -> None:
    """Run `trainer` until it is about to start `step`, then stop it as a crash would (after the checkpoints
    written so far)."""
    import pytest

    run_step = trainer.train_step

    def crashing(n):
        if n == step:
            raise KeyboardInterrupt(f"stopped before step {step}")
        return run_step(n)

    trainer.train_step = crashing
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
