"""mxptq: offline FP4 (NVFP4 / MXFP4) quantization with searched block scales."""

from .formats import FORMATS, SCALE_CODECS, Format, get_format
from .scales import SELECTORS
from .tensor import QuantizedTensor, dequantize, quantize_tensor

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "SCALE_CODECS",
    "SELECTORS",
    "Format",
    "QuantizedTensor",
    "dequantize",
    "get_format",
    "quantize_tensor",
]
