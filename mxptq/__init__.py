"""mxptq: offline FP4 (NVFP4 / MXFP4) quantization with searched block scales.

Exports resolve on first use, so `import mxptq` (and the `mxptq` command's start, which a
Ctrl-C may interrupt) imports neither torch nor transformers; it only registers the packed
loader to be installed when transformers loads its quantizers (mxptq.runtime.hook).
"""

from importlib import import_module

__version__ = "0.1.0"

from .runtime import hook as _hook  # noqa: E402

_hook.install()  # from_pretrained finds the packed loader; transformers is not imported here

_LAZY = {
    "FORMATS": "formats", "SCALE_CODECS": "formats", "Format": "formats",
    "get_format": "formats", "SELECTORS": "scales", "QuantizedTensor": "tensor",
    "dequantize": "tensor", "quantize_tensor": "tensor", "PackedConfig": "runtime.loader",
    "load": "runtime.loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
