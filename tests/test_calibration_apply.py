"""quantize_layer: fused sets share one global scale, widths 16 does not divide stay dense,
weights become their dequantized FP4 values, and unrouted Linears fall back to RTN."""

import torch
from torch import nn

from mxptq import dequantize, quantize_tensor
from mxptq.calibration import CalibOptions, LayerRun, LinearStats, quantize_layer


def layer_and_stats(tokens: int = 64):
    torch.manual_seed(0)
    attn = nn.Module()
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attn, n, nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        attn.k_proj.weight.mul_(4)  # k has the largest amax of the q/k/v set
    mlp = nn.Module()
    mlp.down_proj = nn.Linear(24, 32, bias=False)  # 24: not a multiple of 16
    layer = nn.Module()
    layer.self_attn, layer.mlp = attn, mlp
    stats = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            s = stats[f"p.{name}"] = LinearStats(mod.in_features, with_hessian=True)
            s.add(torch.randn(tokens, mod.in_features))
    return layer, stats


def test_fused_sets_share_the_global_scale_and_weights_are_replaced():
    layer, stats = layer_and_stats()
    orig = {n: m.weight.detach().clone() for n, m in layer.named_modules()
            if isinstance(m, nn.Linear)}
    qts = quantize_layer(LayerRun(0, "p", layer, stats), CalibOptions(algo="gptq"))
    assert set(qts) == {f"p.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    g = {n: float(qt.global_scale) for n, qt in qts.items()}
    k_amax = orig["self_attn.k_proj"].abs().max()
    shared = float(quantize_tensor(orig["self_attn.k_proj"], "nvfp4").global_scale)
    assert g["p.self_attn.q_proj"] == g["p.self_attn.k_proj"] == g["p.self_attn.v_proj"] == shared
    assert g["p.self_attn.o_proj"] != shared and k_amax > orig["self_attn.o_proj"].abs().max()
    for n, qt in qts.items():
        mod = layer.get_submodule(n[2:])
        assert torch.equal(mod.weight, dequantize(qt))
    assert torch.equal(layer.mlp.down_proj.weight, orig["mlp.down_proj"])


def test_linear_without_tokens_falls_back_to_rtn():
    layer, stats = layer_and_stats()
    stats["p.self_attn.o_proj"] = LinearStats(32, with_hessian=True)
    w = layer.self_attn.o_proj.weight.detach().clone()
    qts = quantize_layer(LayerRun(0, "p", layer, stats), CalibOptions(algo="gptq"))
    rtn = quantize_tensor(w, "nvfp4", "search")
    assert torch.equal(qts["p.self_attn.o_proj"].codes, rtn.codes)
    assert bool(layer.self_attn.o_proj.weight.abs().sum() > 0)
