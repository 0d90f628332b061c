"""W4A4 activations: the activation quantization a checkpoint declares, emulated on its Linears'
inputs as the serving engines run it on FP4 hardware (`mxptq eval` always; `mxptq.load` when
asked, since Hopper's engines serve such a checkpoint as W4A16).

A compressed-tensors NVFP4 (W4A4) checkpoint declares `input_activations` (4-bit float,
`strategy: tensor_group`, `group_size: 16`, `dynamic: "local"`) and stores one static
`input_global_scale` g = 2688/amax per Linear; ModelOpt stores its reciprocal `input_scale`.
Each input is then quantized at run time, per row and 16-element block b, as compressed-tensors
does it (`quantization/lifecycle/forward.py::forward_quantize` →
`utils/helpers.py::compute_dynamic_scales_and_zp` / `calculate_qparams` →
`lifecycle/forward_helpers.py::_quantize` / `_dequantize`):

    s_b = E4M3(clamp(g · max|x_b| / 6, ±448))   (0 → the E4M3 epsilon 0.125)
    x̂  = E2M1(clamp(x / (s_b / g), ±6)) · (s_b / g)

with E2M1 rounding to nearest, ties to even (`quant_args.py::FP4_E2M1_DATA.cast_to_fp4`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import MxptqError

BLOCK = 16
E4M3_MAX = 448.0
E4M3_EPS = torch.finfo(torch.float8_e4m3fn).eps  # what compressed-tensors puts for a 0 scale
# E2M1 magnitudes and the midpoints between them; ties go to the even code (0, 1, 2, 4 are
# even codes: 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4).
_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """y (already within ±6) to the nearest E2M1 value, ties to the even code."""
    a = y.abs()
    mid = (_GRID[1:] + _GRID[:-1]).to(y.device, y.dtype) / 2
    idx = torch.bucketize(a, mid)  # a == mid goes to the lower code: right for odd lower codes
    tie = (a == mid[idx.clamp(max=len(mid) - 1)]) & (idx < len(mid)) & (idx % 2 == 1)
    idx = idx + tie.long()  # a tie above an odd code rounds up to the even one
    return torch.sign(y) * _GRID.to(y.device, y.dtype)[idx]


def fake_quantize_nvfp4_input(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` [..., K] (K a multiple of 16) with the static global scale g
    (the encode multiplier 2688/amax, fp32) and dynamic per-16 E4M3 block scales, in fp32;
    returns x's dtype (the formula in the module docstring)."""
    shape, k = x.shape, x.shape[-1]
    if k % BLOCK:
        raise ValueError(f"input width {k} is not a multiple of the NVFP4 block {BLOCK}")
    xb = x.float().reshape(*shape[:-1], k // BLOCK, BLOCK)
    g = g.float().reshape(())
    s = g * (xb.abs().amax(-1, keepdim=True) / 6.0)
    s = s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.tensor(E4M3_EPS, device=s.device), s)
    step = s / g
    q = round_e2m1((xb / step).clamp(-6.0, 6.0))
    return (q * step).reshape(shape).to(x.dtype)


@dataclass
class InputQuant:
    """What a checkpoint declares for its Linears' inputs: module -> global scale g."""

    scales: dict[str, torch.Tensor]
    tensor_name: str  # input_global_scale or input_scale

    def describe(self) -> str:
        return (f"emulating W4A4 activations of {len(self.scales)} Linears as served: NVFP4, "
                f"static global scale from {self.tensor_name}, dynamic per-16 E4M3 block "
                "scales, E2M1 rounding")


def declared_activations(qc: dict) -> list[dict]:
    """The `input_activations` a quantization_config declares (none: weight-only)."""
    return [g["input_activations"] for g in (qc.get("config_groups") or {}).values()
            if isinstance(g, dict) and g.get("input_activations")]


def read_input_quant(path: str | Path) -> InputQuant | None:
    """The activation quantization `path`'s config.json declares, with each Linear's stored
    global scale; None for a weight-only checkpoint. Refuses what cannot be emulated."""
    from ..checkpoint.dialects import dialect_of_config

    folder = Path(path)
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    declared = declared_activations(qc)
    if not declared:
        return None
    for args in declared:
        if (args.get("type"), args.get("num_bits"), args.get("group_size")) != ("float", 4, 16):
            raise MxptqError(f"{path}: it declares input activations {args}; mxptq "
                             "emulates NVFP4 activations (4-bit float, group 16) only")
    dialect = dialect_of_config(qc)
    specs = dialect.input_specs("M")
    if not specs:
        raise MxptqError(f"{path}: it declares input activations, but its dialect "
                         f"{dialect.name} stores no activation scales")
    suffix = next(iter(specs))[len("M"):]
    scales = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if key.endswith(suffix):
                    v = f.get_tensor(key).float().reshape(())
                    scales[key[: -len(suffix)]] = 1.0 / v if dialect.global_is_decode else v
    if not scales:
        raise MxptqError(f"{path}: it declares input activations but stores no "
                         f"{suffix[1:]} tensor; it is incomplete")
    bad = [m for m, g in scales.items() if not (torch.isfinite(g) and g > 0)]
    if bad:
        raise MxptqError(f"{path}: {bad[0]}{suffix} is {float(scales[bad[0]])}, not "
                         "a positive finite global scale")
    return InputQuant(scales, suffix[1:])


_EXPERT = re.compile(r"^(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$")
_WHICH = {"gate_proj": "gate_up", "up_proj": "gate_up", "w1": "gate_up", "w3": "gate_up",
          "down_proj": "down", "w2": "down"}


def _module(mods: dict, name: str, prefix: str):
    mod = mods.get(name)
    if mod is None and prefix and name.startswith(f"{prefix}."):
        mod = mods.get(name[len(prefix) + 1 :])
    return mod


def attach_input_quant(model: nn.Module, iq: InputQuant) -> int:
    """Fake-quantize the inputs of the Linears `iq` names (a quantized PackedLinear or a dense
    nn.Linear, by forward pre-hooks) and of packed MoE experts (each expert's gate/up input
    with its own g, the larger of gate's and up's as the engines fuse them, and its down
    input with down's), in place; returns how many Linears. A name the model has nothing of
    is refused: leaving it out would score its input as W4A16."""
    from .experts import PackedExperts
    from .linear import PackedLinear

    mods = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    experts: dict[int, tuple[PackedExperts, dict]] = {}
    for name, g in sorted(iq.scales.items()):
        mod = _module(mods, name, prefix)
        if isinstance(mod, nn.Linear | PackedLinear):

            def hook(m, args, g=g):
                return (fake_quantize_nvfp4_input(args[0], g.to(args[0].device)), *args[1:])

            mod.register_forward_pre_hook(hook)
            continue
        m = _EXPERT.match(name)
        pe = next((x for ctx in ("mlp", "block_sparse_moe")
                   if isinstance(x := _module(mods, f"{m[1]}.{ctx}.experts", prefix),
                                 PackedExperts)), None) if m and m[3] in _WHICH else None
        if pe is None:
            raise MxptqError(
                f"{name}: the checkpoint stores its activation scale, but the loaded model has "
                f"no Linear or packed expert of that name "
                f"({type(mod).__name__ if mod is not None else 'none'}); mxptq cannot emulate it")
        key = (int(m[2]), _WHICH[m[3]])
        gs = experts.setdefault(id(pe), (pe, {}))[1]
        gs[key] = torch.maximum(gs[key], g) if key in gs else g
    for pe, gs in experts.values():
        _wrap_experts(pe, gs)
    return len(iq.scales)


def _wrap_experts(pe, gs: dict) -> None:
    """Each expert's input quantized before its weights: PackedExperts' expert loop (the path
    of every CPU call, where eval runs) calls `_expert_linear(x, e, which)` per expert."""
    inner = pe._expert_linear

    def expert_linear(x: torch.Tensor, e: int, which: str) -> torch.Tensor:
        g = gs.get((e, which))
        return inner(x if g is None else fake_quantize_nvfp4_input(x, g.to(x.device)), e, which)

    pe._expert_linear = expert_linear
