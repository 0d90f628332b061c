"""mxptq: offline FP4 (NVFP4 / MXFP4) quantization with searched block scales."""

from .formats import FORMATS, SCALE_CODECS, Format, get_format
from .scales import SELECTORS
from .tensor import QuantizedTensor, dequantize, quantize_tensor

__version__ = "0.1.0"

from .runtime.loader import PackedConfig, load  # noqa: E402  registers the loader with transformers

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
