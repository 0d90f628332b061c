"""Inference with FP4 weights kept packed: PackedLinear and model helpers."""

from .linear import PackedLinear
from .model import LinearMemory, linear_weight_bytes, pack_linears

__all__ = ["LinearMemory", "PackedLinear", "linear_weight_bytes", "pack_linears"]
