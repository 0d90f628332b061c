"""Triton kernels for mxptq, installed as `mxptq.kernels` (a top-level `kernels` package would
clash with the PyPI package of that name that transformers probes for)."""

from .amax import tensor_amax
from .dequantize import dequantize
from .quantize import quantize

__all__ = ["dequantize", "quantize", "tensor_amax"]
