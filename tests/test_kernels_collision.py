"""Tandem's `kernels` package shares its import name with Hugging Face's hub-kernels package.

Proven here: with ours importable, transformers does not mistake it for theirs, bitsandbytes still imports
and computes 4-bit matmuls correctly, and a 4-bit model loads and runs; and if a foreign `kernels` package
shadows ours, Tandem refuses to start with a message that says what to do.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path = ROOT):
    # `python -c` puts the working directory first on sys.path: a `kernels` package there shadows ours
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
                          cwd=cwd, timeout=300)


def test_transformers_and_bitsandbytes_work_beside_our_kernels():
    result = run_python("""
        import kernels, torch
        assert kernels.__tandem__
        from transformers.utils.import_utils import is_kernels_available
        assert not is_kernels_available(), "transformers mistook Tandem's kernels for the hub-kernels package"
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        w = torch.randn(64, 128)
        q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        x = torch.randn(3, 128)
        y = bnb.matmul_4bit(x, q.t(), quant_state=state)
        ref = x @ F.dequantize_4bit(q, state).t()
        assert torch.allclose(y, ref, atol=1e-3), (y - ref).abs().max()
        from rl.config import ModelSection, LoraSection
        from rl.model import load_policy
        policy = load_policy(ModelSection(name="random:tiny", load_in_4bit=True), LoraSection(r=4))
        assert type(policy.model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
        policy.model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert "kernels-community" not in result.stderr  # bitsandbytes' misleading notice is filtered


def test_a_foreign_kernels_package_is_refused_clearly(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel(*a, **k):\n    raise RuntimeError('hub')\n")
    for module in ("rl", "rollout", "rewards"):
        result = run_python(f"import {module}", cwd=tmp_path)
        assert result.returncode != 0
        assert "is not Tandem's" in result.stderr and "pip uninstall kernels" in result.stderr, result.stderr[-2000:]
