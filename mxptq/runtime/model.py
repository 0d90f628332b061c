"""Swap a model's nn.Linear layers for PackedLinear and account for the bytes they hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..tensor import quantize_tensor
from .linear import PackedLinear


def pack_linears(
    model: nn.Module,
    format: str = "nvfp4",
    scale: str = "absmax",
    block_size: int | None = None,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace, in place, every nn.Linear whose name's last part is not in `skip` by a
    PackedLinear quantized from its weight; the dense weight is dropped with the old module."""
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, lin in targets:
        qt = quantize_tensor(lin.weight.detach(), format, scale, block_size)
        packed = PackedLinear.from_quantized(qt, lin.bias, dtype=lin.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    return model


@dataclass(frozen=True)
class LinearMemory:
    """Bytes held by linear weights (biases excluded) and what bf16 weights would take."""

    bytes: int
    bf16_bytes: int

    @property
    def ratio(self) -> float:
        return self.bytes / self.bf16_bytes if self.bf16_bytes else 0.0


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module) -> LinearMemory:
    """Sum the weight storage of every nn.Linear and PackedLinear in `model`."""
    held = bf16 = 0
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            held += sum(_nbytes(getattr(mod, n)) for n in ("codes", "scales", "global_scale"))
            bf16 += 2 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Linear):
            held += _nbytes(mod.weight)
            bf16 += 2 * mod.weight.numel()
    return LinearMemory(held, bf16)
