"""Inference with FP4 weights kept packed: PackedLinear, model helpers and the loader.

Exports resolve on first use, so `import mxptq` (which registers the loader with transformers)
does not import Triton: its kernels are built at import and read TRITON_INTERPRET only then.
"""

from importlib import import_module

_EXPORTS = {
    "LinearMemory": ".model",
    "PackedConfig": ".loader",
    "PackedExperts": ".experts",
    "PackedHfQuantizer": ".loader",
    "PackedLinear": ".linear",
    "linear_weight_bytes": ".model",
    "load": ".loader",
    "pack_experts": ".model",
    "pack_linears": ".model",
    "packed_config": ".loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
