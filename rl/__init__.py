"""Tandem's trainer: config, model loading, objectives, the GRPO loop, checkpoints, tracking and CLIs."""

import kernels as _kernels

if not getattr(_kernels, "__tandem__", False):
    raise ImportError(
        f"the `kernels` package imported from {getattr(_kernels, '__file__', '?')} is not Tandem's. Hugging "
        "Face's hub-kernels package uses the same import name and shadows Tandem's: remove it from this "
        "environment (`pip uninstall kernels`) or install Tandem in a virtual environment of its own.")

