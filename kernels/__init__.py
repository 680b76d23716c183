"""Tandem's compute kernels: autograd-capable operators for the hot parts of training.

Each operator has a Triton kernel with a hand-derived backward pass (derivation above the kernel) and a
pure-PyTorch twin (`<op>_torch`): the CPU path, the test oracle and the benchmark baseline. kernels/backend.py
picks between them (TANDEM_KERNELS=auto|triton|torch).

Note the name: Hugging Face's hub-kernels distribution is also imported as `kernels`. transformers and
bitsandbytes probe for it; `__tandem__` lets Tandem's packages tell ours from theirs (see rl/__init__.py),
and tests/test_kernels_collision.py proves that ours does not break them.
"""

__tandem__ = True


class _DropHubKernelsNotice:
    """bitsandbytes' CPU backend tries `from kernels import get_kernel` (a hub download of an optional fast
    path) and logs a warning when that fails. Importing this package is the first thing that attempt does, so
    the filter is in place before the warning: bitsandbytes falls back to its built-in CPU code, and the
    warning would only mislead."""

    def filter(self, record) -> bool:
        return "kernels-community" not in record.getMessage()


import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelsNotice())

from kernels.logprobs import selective_logprobs  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402
from kernels.rope import apply_rope  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402

__all__ = ["apply_rope", "rms_norm", "selective_logprobs", "swiglu"]
