"""Triton kernels for mxptq, installed as `mxptq.kernels` (a top-level `kernels` package would
clash with the PyPI package of that name, which transformers 5.25 requires and imports).

Run from a checkout (`python -m pytest`, `python -m mxptq`), the checkout's root is first on
sys.path and this folder answers `import kernels`. Imported under that name, it is never
mxptq's (mxptq imports `mxptq.kernels`), so it loads the installed distribution in its place,
or, with none installed, stays an empty module: transformers (5.24) then imports it to read a
version, finds none, and treats `kernels` as unavailable.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
else:
    from .amax import tensor_amax
    from .dequantize import dequantize
    from .quantize import quantize

    __all__ = ["dequantize", "quantize", "tensor_amax"]
