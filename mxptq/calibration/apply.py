"""Quantize one calibrated decoder layer: the `on_layer` callback of `calibrate`.

Each Linear whose input width the block size divides is quantized by RTN (optionally
importance-weighted) or GPTQ, fused partners (q/k/v, gate/up, ...) sharing the amax behind one
global scale; its weight is replaced in place by the dequantized result, so the next layer is
calibrated on what the quantized model computes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import get_format
from ..plan import FUSED_SETS
from ..tensor import (
    QuantizedTensor,
    dequantize,
    quantize_tensor,
    search_global_norm,
    tensor_amax,
)
from .gptq import gptq_quantize
from .hooks import in_out_layout, is_fused_experts
from .runner import LayerRun

ALGOS = ("rtn", "gptq")
# What the selectors weight their block error by: nothing, E[x_k²] per input channel, or the
# block covariance E[x_b x_bᵀ] of each block of input channels (the quadratic form).
IMPORTANCE = ("none", "diag", "hessian")
# Fused expert parameters and the per-expert Linears their rows hold, in order.
EXPERT_PARAMS = (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))


@dataclass(frozen=True)
class CalibOptions:
    """The calibration-side flags of `mxptq quantize` (docs/calibration.md)."""

    format: str = "nvfp4"
    scale: str = "search"
    block_size: int | None = None
    importance: str = "none"  # one of IMPORTANCE (True / False: "diag" / "none")
    algo: str = "rtn"
    gptq_scales: str = "lazy"
    damp: float = 0.01
    act_order: bool = False
    global_search: bool = False  # search each fused set's global scale (tensor.search_global_norm)

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"unknown --algo {self.algo!r} (one of {', '.join(ALGOS)})")
        if isinstance(self.importance, bool):
            object.__setattr__(self, "importance", "diag" if self.importance else "none")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"unknown --importance {self.importance!r} "
                             f"(one of {', '.join(IMPORTANCE)})")

    @property
    def needs_hessian(self) -> bool:
        return self.algo == "gptq"

    @property
    def covariance_block(self) -> int:
        """Block size whose input covariances calibration must collect (0: none)."""
        if self.importance != "hessian":
            return 0
        return get_format(self.format, self.block_size).block_size


def importance_of(stats, importance: str) -> torch.Tensor | None:
    """The selector weights a Linear's statistics give for an --importance mode."""
    if importance == "diag":
        return stats.second_moment()
    if importance == "hessian":
        return stats.block_covariance()
    return None


# Checkpoint expert names that transformers renames when it fuses experts at load time
# (its conversion mapping, e.g. Mixtral's `block_sparse_moe.experts.E.w1/w3/w2`), as the
# names the calibrated model's statistics carry.
_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)$")
_EXPERT_LEAF = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def model_names(checkpoint_names: Collection[str]) -> dict[str, str]:
    """Calibrated-model module name -> checkpoint module name, for every checkpoint name (the
    identity except for renamed experts), so that statistics and GPTQ results computed on the
    model find the checkpoint tensors they belong to."""
    out = {}
    for name in checkpoint_names:
        m = _EXPERT.match(name)
        out[f"{m[1]}.mlp.experts.{m[2]}.{_EXPERT_LEAF[m[3]]}" if m else name] = name
    return out


def fused_partners(name: str, names: list[str]) -> list[str]:
    """The members of `names` in the same fused set as `name` (itself included)."""
    parent, _, leaf = name.rpartition(".")
    for members in FUSED_SETS:
        if leaf in members:
            return [n for n in (f"{parent}.{m}" for m in members) if n in names]
    return [name]


def fused_groups(names: list[str]) -> list[list[str]]:
    """`names` partitioned into fused sets (singletons for unfused Linears)."""
    seen: dict[tuple[str, ...], None] = {}
    for n in names:
        seen.setdefault(tuple(fused_partners(n, names)), None)
    return [list(g) for g in seen]


def quantize_linear(
    w: torch.Tensor, stats, opts: CalibOptions, global_amax: torch.Tensor | None = None,
    global_norm: float | None = None,
) -> QuantizedTensor:
    """One weight by the chosen algorithm, with the calibration statistics of its input. A
    Linear that saw no calibration token (an unrouted expert) falls back to plain RTN: GPTQ
    would zero all its columns. `global_norm` overrides the selector's (global-scale search)."""
    if stats.tokens == 0:
        return quantize_tensor(w, opts.format, opts.scale, opts.block_size,
                               global_amax=global_amax, global_norm=global_norm)
    imp = importance_of(stats, opts.importance)
    if opts.algo == "gptq":
        return gptq_quantize(
            w, stats.hessian().to(w.device), opts.format, opts.scale, opts.block_size,
            scales=opts.gptq_scales,
            percdamp=opts.damp, act_order=opts.act_order, importance=imp,
            global_amax=global_amax, global_norm=global_norm,
        ).qt
    return quantize_tensor(w, opts.format, opts.scale, opts.block_size, imp,
                           global_amax=global_amax, global_norm=global_norm)


def searched_norm(ws: list[torch.Tensor], stats: list, opts: CalibOptions,
                  global_amax: torch.Tensor) -> float | None:
    """With --global-search, the global_norm of a fused set chosen on its original weights by
    the set's total (importance-weighted) block error; else None (the selector's default)."""
    if not opts.global_search:
        return None
    imps = [importance_of(s, opts.importance) if s.tokens else None for s in stats]
    imps = [None if i is None else i.to(w.device) for i, w in zip(imps, ws, strict=True)]
    return search_global_norm(ws, opts.format, opts.scale, opts.block_size, imps,
                              global_amax=global_amax)


def quantize_layer(
    run: LayerRun, opts: CalibOptions, include: Collection[str] | None = None
) -> dict[str, QuantizedTensor]:
    """Quantize the dense Linears of one layer in place; returns their QuantizedTensors (by
    full module name). Linears whose input width the block does not divide stay dense, and so
    do those not in `include` when given (what a quantize plan keeps must stay exact for the
    layers calibrated after it)."""
    block = get_format(opts.format, opts.block_size).block_size
    linears = {
        f"{run.prefix}.{n}": m for n, m in run.layer.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % block == 0
        and (include is None or f"{run.prefix}.{n}" in include)
    }
    names = list(linears)
    own = {n: tensor_amax(m.weight.detach()) for n, m in linears.items()}  # before any change
    out: dict[str, QuantizedTensor] = {}
    norms: dict[str, float | None] = {}
    for group in fused_groups(names):
        amax = max(own[p] for p in group)
        norm = searched_norm([linears[p].weight.detach() for p in group],
                             [run.stats[p] for p in group], opts, amax)
        norms.update(dict.fromkeys(group, norm))
    for name, mod in linears.items():
        amax = max(own[p] for p in fused_partners(name, names))
        qt = quantize_linear(mod.weight.detach(), run.stats[name], opts, amax, norms[name])
        out[name] = qt
        mod.weight.data = dequantize(qt).to(mod.weight.dtype)
    for name, mod in run.layer.named_modules():
        if is_fused_experts(mod):
            full = f"{run.prefix}.{name}" if name else run.prefix
            out.update(_quantize_experts(full, mod, run, opts, block, include))
    return out


def _quantize_experts(full: str, mod: nn.Module, run: LayerRun, opts: CalibOptions, block: int,
                      include: Collection[str] | None) -> dict[str, QuantizedTensor]:
    """Fused 3-D experts, one expert at a time: its gate and up rows together (one input, one
    Hessian, one shared global scale, as the writer quantizes them) and its down rows, each
    by `quantize_linear`; results under the per-expert names the plan and the hooks use
    (`{full}.{e}.gate_proj` / `.up_proj` / `.down_proj`), weights replaced in place."""
    in_out = in_out_layout(mod)
    out: dict[str, QuantizedTensor] = {}
    for e in range(mod.gate_up_proj.shape[0]):
        for pname, parts in EXPERT_PARAMS:
            names = [f"{full}.{e}.{p}" for p in parts]
            if include is not None and not all(n in include for n in names):
                continue
            param = getattr(mod, pname)
            w = param.data[e].t() if in_out else param.data[e]  # [out, in]
            if w.shape[1] % block:
                continue
            st, amax = run.stats[names[0]], tensor_amax(w)
            qt = quantize_linear(w, st, opts, amax, searched_norm([w], [st], opts, amax))
            rows = w.shape[0] // len(parts)
            for j, n in enumerate(names):
                sl = slice(j * rows, (j + 1) * rows)
                out[n] = QuantizedTensor(qt.codes[sl], qt.scales[sl], qt.global_scale, qt.format)
            deq = dequantize(qt).to(param.dtype)
            param.data[e] = deq.t() if in_out else deq
    return out


def layer_units(run: LayerRun, opts: CalibOptions,
                include: Collection[str] | None = None) -> list[tuple[list[str], int]]:
    """The independent pieces of `quantize_layer`'s work, in a fixed order, each with a cost
    (weights x input width): a fused set of Linears (they share the amax behind one global
    scale), or one expert's gate and up rows, or its down rows. Ranks split a layer by these."""
    block = get_format(opts.format, opts.block_size).block_size
    linears = {
        f"{run.prefix}.{n}": m for n, m in run.layer.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % block == 0
        and (include is None or f"{run.prefix}.{n}" in include)
    }
    units = [(g, sum(linears[n].weight.numel() * linears[n].in_features for n in g))
             for g in fused_groups(list(linears))]
    for mod, in_out, _, pname, names in _expert_slices(run):
        if include is not None and not all(n in include for n in names):
            continue
        shape = getattr(mod, pname).shape[1:]
        out_f, in_f = (shape[1], shape[0]) if in_out else (shape[0], shape[1])
        if in_f % block == 0:
            units.append((names, out_f * in_f * in_f))
    return units


def _expert_slices(run: LayerRun) -> Iterator[tuple[nn.Module, bool, int, str, list[str]]]:
    """Every fused-experts slice of the layer in quantize_layer's order: (module, in_out
    layout, expert, parameter, the per-expert names of its rows)."""
    for name, mod in run.layer.named_modules():
        if not is_fused_experts(mod):
            continue
        full = f"{run.prefix}.{name}" if name else run.prefix
        in_out = in_out_layout(mod)
        for e in range(mod.gate_up_proj.shape[0]):
            for pname, parts in EXPERT_PARAMS:
                yield mod, in_out, e, pname, [f"{full}.{e}.{p}" for p in parts]


def apply_results(run: LayerRun, qts: dict[str, QuantizedTensor]) -> None:
    """Replace the layer's weights by the dequantized `qts` (computed by another rank), as
    `quantize_layer` does with those it computes: the next layer then sees the same model."""
    for n, m in run.layer.named_modules():
        full = f"{run.prefix}.{n}"
        if isinstance(m, nn.Linear) and full in qts:
            m.weight.data = dequantize(qts[full].to(m.weight.device)).to(m.weight.dtype)
    for mod, in_out, e, pname, names in _expert_slices(run):
        if not all(n in qts for n in names):
            continue
        param = getattr(mod, pname)
        ps = [qts[n] for n in names]
        qt = QuantizedTensor(torch.cat([p.codes for p in ps]),
                             torch.cat([p.scales for p in ps]), ps[0].global_scale,
                             ps[0].format).to(param.device)
        deq = dequantize(qt).to(param.dtype)
        param.data[e] = deq.t() if in_out else deq
