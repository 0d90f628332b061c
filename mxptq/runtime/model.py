"""Swap a model's nn.Linear layers (and fused MoE experts) for packed ones and account for the
bytes they hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..tensor import quantize_tensor
from .experts import PackedExperts, fused_experts_shape
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


def pack_experts(
    model: nn.Module, format: str = "nvfp4", scale: str = "absmax", block_size: int | None = None
) -> nn.Module:
    """Replace, in place, every transformers 5 fused-experts module (`fused_experts_shape`) by a
    PackedExperts quantized as `mxptq quantize` does: each expert's gate_up slice as one tensor
    (gate and up share its global scale), each down slice on its own."""
    targets = [(n, m) for n, m in model.named_modules() if fused_experts_shape(m) is not None]
    for name, mod in targets:
        e, _, i = fused_experts_shape(mod)
        gate, up, down = [], [], []
        for x in range(e):
            qt = quantize_tensor(mod.gate_up_proj[x].detach(), format, scale, block_size)
            for dst, rows in ((gate, slice(0, i)), (up, slice(i, 2 * i))):
                dst.append(type(qt)(qt.codes[rows], qt.scales[rows], qt.global_scale, qt.format))
            down.append(quantize_tensor(mod.down_proj[x].detach(), format, scale, block_size))
        packed = PackedExperts.from_quantized(gate, up, down, mod.act_fn)
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


def linear_weight_bytes(model: nn.Module, experts_only: bool = False) -> LinearMemory:
    """Sum the weight storage of every nn.Linear and PackedLinear in `model` and of its MoE
    experts (PackedExperts, or fused-experts modules' 3-D gate_up_proj / down_proj); with
    `experts_only`, of the experts alone."""
    held = bf16 = 0
    for mod in model.modules():
        if isinstance(mod, PackedExperts):
            held += sum(_nbytes(mod._buffers[n]) for n in mod._buffers)
            bf16 += 2 * 3 * mod.num_experts * mod.hidden_dim * mod.intermediate_dim
        elif fused_experts_shape(mod) is not None:
            for p in (mod.gate_up_proj, mod.down_proj):
                held += _nbytes(p)
                bf16 += 2 * p.numel()
        elif experts_only:
            continue
        elif isinstance(mod, PackedLinear):
            held += sum(_nbytes(getattr(mod, n)) for n in ("codes", "scales", "global_scale"))
            bf16 += 2 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Linear):
            held += _nbytes(mod.weight)
            bf16 += 2 * mod.weight.numel()
    return LinearMemory(held, bf16)
