"""Forward pre-hooks that feed a layer's Linear inputs into `LinearStats`.

Dense Linears are hooked directly. Fused MoE expert modules (3-D `gate_up_proj`/`down_proj`
parameters, as in transformers 5 Qwen3-MoE and Mixtral) are hooked on their call: each expert's
gate/up input is the hidden states of the tokens routed to it, and its down input is
act(gate)·up recomputed from those tokens, so every expert sees exactly its own tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .stats import LinearStats


def _linear_hook(stats: LinearStats):
    def hook(module, args):
        stats.add(args[0])

    return hook


def is_fused_experts(module: nn.Module) -> bool:
    p = dict(module.named_parameters(recurse=False))
    return (
        p.get("gate_up_proj") is not None
        and p["gate_up_proj"].dim() == 3
        and p.get("down_proj") is not None
        and hasattr(module, "act_fn")
    )


def in_out_layout(module: nn.Module) -> bool:
    """True for [E, in, out] expert weights (x @ W); transformers' default is [E, out, in]."""
    gu, d = module.gate_up_proj.shape, module.down_proj.shape
    return gu[1] != 2 * d[2] and gu[2] == 2 * d[1]


def _experts_hook(gate_up: list[LinearStats], down: list[LinearStats], in_out: bool):
    def hook(module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = dict(zip(names, args, strict=False)) | kwargs
        x, index = vals["hidden_states"], vals["top_k_index"]
        x = x.reshape(-1, x.shape[-1])
        w_gu = module.gate_up_proj
        with torch.no_grad():
            for e in range(w_gu.shape[0]):
                rows = (index == e).any(dim=-1).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                xe = x[rows]
                gate_up[e].add(xe)
                gu = xe @ w_gu[e] if in_out else nn.functional.linear(xe, w_gu[e])
                gate, up = gu.chunk(2, dim=-1)
                down[e].add(module.act_fn(gate) * up)

    return hook


def attach_stat_hooks(
    layer: nn.Module, prefix: str, hessian: bool, block: int = 0
) -> tuple[dict[str, LinearStats], list]:
    """Hook every Linear (and fused expert set) of `layer`; returns stats keyed by full module
    name (created up front, so a Linear that saw no token shows up with tokens == 0). `block`
    > 0 also collects block covariances of that block size."""
    stats: dict[str, LinearStats] = {}
    handles = []
    for name, mod in layer.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(mod, nn.Linear):
            s = stats[full] = LinearStats(mod.in_features, hessian, block=block)
            handles.append(mod.register_forward_pre_hook(_linear_hook(s)))
        elif is_fused_experts(mod):
            in_out = in_out_layout(mod)
            n_exp = mod.gate_up_proj.shape[0]
            k_gu = mod.gate_up_proj.shape[1 if in_out else 2]
            k_d = mod.down_proj.shape[1 if in_out else 2]
            gu = [LinearStats(k_gu, hessian, block=block) for _ in range(n_exp)]
            dn = [LinearStats(k_d, hessian, block=block) for _ in range(n_exp)]
            for e in range(n_exp):
                stats[f"{full}.{e}.gate_proj"] = gu[e]
                stats[f"{full}.{e}.up_proj"] = gu[e]
                stats[f"{full}.{e}.down_proj"] = dn[e]
            hook = _experts_hook(gu, dn, in_out)
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return stats, handles
