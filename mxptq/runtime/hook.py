"""Register the packed loader with transformers when transformers loads its quantizers.

`import mxptq` must make `from_pretrained` load our checkpoints, but importing the loader means
importing transformers' model-loading code, seconds of start-up that `mxptq quantize` does not
need. So `import mxptq` registers right away only when transformers' quantizer registry is
already imported, and otherwise installs a meta-path finder that registers the moment it is
(transformers imports the registry before any `from_pretrained` can run).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    importlib.import_module("mxptq.runtime.loader")  # importing it registers the loader


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of the registry module so that
    registration runs right after that module has executed."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module) -> None:
            real_exec(module)
            sys.modules[name] = module  # the loader below imports from it
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it loads."""
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
