"""mxptq: offline FP4 (NVFP4 / MXFP4) quantization with searched block scales."""

from .formats import FORMATS, SCALE_CODECS, Format, get_format
from .scales import SELECTORS
from .tensor import QuantizedTensor, dequantize, quantize_tensor

__version__ = "0.1.0"

from .runtime import hook as _hook  # noqa: E402

_hook.install()  # from_pretrained finds the packed loader; transformers is not imported here


def __getattr__(name: str):
    """`load` and `PackedConfig` import the loader (and transformers) on first use."""
    if name in ("PackedConfig", "load"):
        from .runtime import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "FORMATS",
    "SCALE_CODECS",
    "SELECTORS",
    "Format",
    "PackedConfig",
    "QuantizedTensor",
    "dequantize",
    "get_format",
    "load",
    "quantize_tensor",
]
