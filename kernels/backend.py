"""Which implementation an operator runs: the Triton kernel or its pure-PyTorch twin.

    TANDEM_KERNELS=auto    (default) Triton for CUDA tensors, the twin elsewhere
    TANDEM_KERNELS=triton  Triton always; on CPU this needs Triton's interpreter (TRITON_INTERPRET=1, set
                           before the first import of triton), which is how the test suite runs the kernels
    TANDEM_KERNELS=torch   the twin always
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("TANDEM_KERNELS", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"TANDEM_KERNELS={mode!r}; use auto, triton or torch")
    if mode == "torch" or not HAVE_TRITON:
        if mode == "triton":
            raise RuntimeError("TANDEM_KERNELS=triton but triton is not installed; pip install triton")
        return False
    if t.is_cuda:
        return True
    if mode == "triton":
        if not interpreting():
            raise RuntimeError("TANDEM_KERNELS=triton on a CPU tensor needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before Python starts")
        return True
    return False
