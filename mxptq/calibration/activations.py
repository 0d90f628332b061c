"""W4A4: static activation global scales from calibration, and NVFP4 activation fake-quant.

At inference NVFP4 activations get dynamic per-16-block E4M3 scales and one static fp32
global scale per Linear input, g = 2688/amax_x (shared across a fused set). The fake-quant
here reproduces that on any machine, so W4A4 accuracy can be measured without FP4 hardware.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import E2M1_MAX, E4M3
from ..scales import global_encode_scale
from ..tensor import dequantize, quantize_tensor
from .stats import LinearStats

ACT_GLOBAL_NORM = E4M3.max_value  # 448: g = 448·6/amax = 2688/amax


@dataclass(frozen=True)
class ActivationScale:
    """The calibrated input amax of one Linear (or of its fused set)."""

    amax: float

    @property
    def global_scale(self) -> torch.Tensor:
        """Encode multiplier g = 2688/amax (fp32 0-d), as `quantize_tensor` would compute."""
        return global_encode_scale(torch.tensor(self.amax), ACT_GLOBAL_NORM)

    def compressed_tensors(self) -> dict[str, torch.Tensor]:
        """compressed-tensors tensors: `input_global_scale` F32 [1] = 2688/amax."""
        return {"input_global_scale": self.global_scale.reshape(1)}

    def modelopt(self) -> dict[str, torch.Tensor]:
        """ModelOpt tensors: `input_scale` F32 0-d = amax/2688 (the decode multiplier)."""
        return {"input_scale": torch.tensor(self.amax / (ACT_GLOBAL_NORM * E2M1_MAX))}


def activation_scales(
    stats: dict[str, LinearStats], fused_sets: Iterable[Iterable[str]] = ()
) -> dict[str, ActivationScale]:
    """Per-Linear activation scales; every member of a fused set (full module names) gets the
    max of the set's amaxes, since serving stacks run the set as one GEMM on one input."""
    out = {name: ActivationScale(s.amax) for name, s in stats.items()}
    for members in fused_sets:
        members = [m for m in members if m in stats]
        if members:
            shared = ActivationScale(max(stats[m].amax for m in members))
            out.update(dict.fromkeys(members, shared))
    return out


def fake_quantize_activation(
    x: torch.Tensor, amax: float | torch.Tensor | None = None, scale: str = "absmax",
    block_size: int = 16,
) -> torch.Tensor:
    """NVFP4 quantize-dequantize of `x` along its last dim: per-block E4M3 scales chosen by
    `scale` (absmax is what serving kernels do) under the static global scale 2688/amax
    (`amax=None`: the tensor's own amax, i.e. dynamic). The last dim is zero-padded to a
    multiple of the block; the result has x's shape and dtype."""
    shape, k = x.shape, x.shape[-1]
    x2 = x.reshape(-1, k).float()
    pad = (-k) % block_size
    if pad:
        x2 = nn.functional.pad(x2, (0, pad))
    if amax is None:
        amax = x2.abs().amax()
    qt = quantize_tensor(x2, "nvfp4", scale, block_size, global_amax=amax, backend="torch")
    return dequantize(qt)[:, :k].reshape(shape).to(x.dtype)


def attach_activation_fake_quant(
    model: nn.Module, scales: dict[str, ActivationScale], scale: str = "absmax"
) -> list:
    """Forward pre-hooks that fake-quantize the input of every Linear named in `scales`;
    returns the handles (remove them to restore the model)."""
    handles = []
    for name, mod in model.named_modules():
        if name in scales and isinstance(mod, nn.Linear):
            amax = scales[name].amax

            def hook(m, args, amax=amax):
                return (fake_quantize_activation(args[0], amax, scale), *args[1:])

            handles.append(mod.register_forward_pre_hook(hook))
    return handles
