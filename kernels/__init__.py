"""Triton kernels for mxptq, installed as `mxptq.kernels` (a top-level `kernels` package would
clash with the PyPI package of that name that transformers probes for)."""
