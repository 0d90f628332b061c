"""Inference with FP4 weights kept packed: PackedLinear, model helpers and the loader."""

from .linear import PackedLinear
from .loader import PackedConfig, PackedHfQuantizer, load, packed_config
from .model import LinearMemory, linear_weight_bytes, pack_linears

__all__ = [
    "LinearMemory",
    "PackedConfig",
    "PackedHfQuantizer",
    "PackedLinear",
    "linear_weight_bytes",
    "load",
    "pack_linears",
    "packed_config",
]
