"""The checkout's kernels/ folder is `mxptq.kernels`; under the top-level name `kernels` (the
checkout's root first on sys.path, as under `python -m pytest` or `python -m mxptq`) it must
hand over to the PyPI `kernels` distribution that transformers imports, or, with none
installed, be an empty module that transformers' probe can import."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import kernels
print(kernels.__file__, hasattr(kernels, "quantize"))
from transformers import LlamaConfig  # transformers probes for `kernels` at import
import mxptq.kernels
print(mxptq.kernels.quantize.__module__)
"""


def test_top_level_kernels_is_the_distribution_and_mxptq_kernels_is_ours():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    top, has_ours, ours = r.stdout.split()
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert Path(top).resolve() == ROOT / "kernels" / "__init__.py" and has_ours == "False"
    else:
        assert Path(top).resolve().parent != ROOT / "kernels", top
    assert ours == "mxptq.kernels.quantize"
