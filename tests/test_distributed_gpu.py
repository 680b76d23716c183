"""Data-parallel GRPO on 2 GPUs through torchrun and NCCL, against one GPU with both prompts: the CPU test's
equivalence (tests/test_distributed.py), with the GPU path's engine (CUDA graphs, merged weights, Triton
kernels) and NCCL's all-reduce. Every prompt is its own rollout wave in both runs (same shapes, same seeds),
so the completions agree exactly; fp32 keeps the gradients' comparison tight."""

import pytest
import torch

from tests.test_distributed import _config, _metrics, _run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def test_two_gpus_train_as_one_gpu_with_both_prompts(tmp_path):
    gpu = {"device": "auto", "dtype": "float32"}
    two = _config(tmp_path, "two", 1, 2, model=gpu)
    one = _config(tmp_path, "one", 2, 2, model=gpu)
    _run(["--config", str(two)], processes=2)
    _run(["--config", str(one)])
    for a, b in zip(_metrics(tmp_path / "two"), _metrics(tmp_path / "one")):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
