"""Where a layer's weights come from while the runner visits it.

Lazy: the model is built on the meta device and each module's tensors are read from the
safetensors shards onto the device when needed, then dropped back to meta. In memory: a model
the caller already holds (or one whose checkpoint names need transformers' load-time
conversions) has each module moved to the device and back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from ..errors import MxptqError
from .layers import build, model_class


def _shard_index(model_dir: Path) -> dict[str, Path]:
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise MxptqError(f"{model_dir}: no .safetensors files")
    index = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), shard))
    return index


class WeightStore:
    """Puts modules' tensors on `device` and takes them away again."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 index: dict[str, Path] | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.index = index  # None: the model is in memory
        self.home: dict[str, tuple[torch.device, torch.dtype]] = {}

    @property
    def lazy(self) -> bool:
        return self.index is not None

    def _tensors(self, prefix: str, module: nn.Module, recurse: bool = True):
        for name, t in module.named_parameters(recurse=recurse):
            yield (f"{prefix}.{name}" if prefix else name), t
        for name, t in module.named_buffers(recurse=recurse):
            yield (f"{prefix}.{name}" if prefix else name), t

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(self.index[name], framework="pt") as f:
            return f.get_tensor(name)

    def load(self, prefix: str, module: nn.Module, recurse: bool = True) -> None:
        for name, t in list(self._tensors(prefix, module, recurse)):
            if t.device == self.device:
                continue
            self.home.setdefault(name, (t.device, t.dtype))
            value = self._read(name) if t.is_meta else t
            set_module_tensor_to_device(self.model, name, self.device, value=value,
                                        dtype=self.dtype if value.is_floating_point() else None)

    def release(self, prefix: str, module: nn.Module, recurse: bool = True) -> None:
        """Send tensors back where they were (meta for lazily read ones)."""
        for name, t in list(self._tensors(prefix, module, recurse)):
            home = self.home.pop(name, None)
            if home is None:
                continue
            device, dtype = home
            value = None if device.type == "meta" else t.to(device, dtype)
            set_module_tensor_to_device(self.model, name, device, value=value)

    def load_on_call(self, model: nn.Module, skip: nn.Module) -> list:
        """Pre-hooks that bring each module outside `skip` (the decoder layers) to the device
        the first time it runs: only what runs before the layers (embeddings) is read."""
        inside = {id(m) for m in skip.modules()}
        handles = []
        for name, mod in model.named_modules():
            if id(mod) in inside:
                continue

            def hook(m, args, name=name):
                self.load(name, m, recurse=False)

            handles.append(mod.register_forward_pre_hook(hook))
        return handles

    def release_non_layers(self, model: nn.Module, skip: nn.Module) -> None:
        inside = {id(m) for m in skip.modules()}
        for name, mod in model.named_modules():
            if id(mod) not in inside:
                self.release(name, mod, recurse=False)


@contextlib.contextmanager
def quiet_loading():
    """transformers' own loading bar off while ours is on screen."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def open_model(
    model: str | Path | nn.Module, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, WeightStore]:
    """A model and the store that feeds it: lazy when every parameter of the meta model has a
    tensor of the same name in the shards, else loaded on CPU by transformers. The class is
    `layers.model_class`: a causal LM, or the encoder class config.json names."""
    if isinstance(model, nn.Module):
        return model.eval(), WeightStore(model, device, dtype)
    model_dir = Path(model)
    config = AutoConfig.from_pretrained(model_dir)
    cls = model_class(config)
    with init_empty_weights():
        meta = build(cls, config, dtype)
    index = _shard_index(model_dir)
    out = meta.get_output_embeddings()
    out_emb = {n for n, m in meta.named_modules() if out is not None and m is out}
    tie = config.get_text_config().tie_word_embeddings
    tied = {f"{n}.weight" for n in out_emb} if tie else set()
    missing = [k for k, _ in meta.named_parameters() if k not in index and k not in tied]
    if not missing:
        return meta.eval(), WeightStore(meta, device, dtype, index)
    with quiet_loading():
        full = cls.from_pretrained(model_dir, dtype=dtype)
    return full.eval(), WeightStore(full, device, dtype)
