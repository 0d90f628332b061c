"""Global-scale search (`--global-search`): each tensor's or fused set's global_norm is the
candidate with the least total block error, shared across the set, ties keeping the default."""

import pytest
import torch
from quant_helpers import tiny_llama_dir
from typer.testing import CliRunner

from mxptq import dequantize, quantize_tensor
from mxptq.checkpoint import read_checkpoint
from mxptq.cli import app
from mxptq.tensor import global_norm_candidates, search_global_norm, tensor_amax


def sse64(ws, norm, amax, imps=None):
    imps = imps or [None] * len(ws)
    out = 0.0
    for w, h in zip(ws, imps, strict=True):
        d = (w - dequantize(quantize_tensor(w, "nvfp4", "search", importance=h, global_amax=amax,
                                            global_norm=norm))).double()
        out += float((d * d * (1.0 if h is None else h.double())).sum())
    return out


@pytest.fixture(scope="module")
def fused():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 64, generator=g) * torch.linspace(0.1, 1.0, 64)
    b = torch.randn(8, 64, generator=g) ** 3
    return [a, b]


def test_the_searched_norm_is_the_best_candidate(fused):
    amax = torch.stack([tensor_amax(w) for w in fused]).amax()
    imps = [torch.linspace(0.5, 2.0, 64)] * 2
    norm = search_global_norm(fused, "nvfp4", "search", importances=imps)
    errs = {n: sse64(fused, n, amax, imps) for n in global_norm_candidates(448.0)}
    assert norm in errs
    best = min(errs.values())
    assert errs[norm] <= best * (1 + 1e-6)  # fp32 block errors vs this float64 sum
    assert errs[norm] < errs[448.0]  # here the search moves off the default


def test_ties_keep_the_default_and_mxfp4_has_no_global_scale():
    z = torch.zeros(4, 32)
    assert search_global_norm([z], "nvfp4", "search") == 448.0
    assert search_global_norm([z], "nvfp4", "4over6") == 256.0
    assert search_global_norm([z], "mxfp4", "search") is None


def test_cli_shares_the_searched_scale_across_fused_sets(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "gs"
    r = CliRunner().invoke(app, ["quantize", "--model", str(tiny_llama_dir()), "--out", str(out),
                                 "--scale", "absmax", "--global-search"])
    assert r.exit_code == 0, r.output + r.stderr
    gs = read_checkpoint(out)
    orig = {}
    for f in tiny_llama_dir().glob("*.safetensors"):
        orig.update(load_file(f))
    layer = "model.layers.0.self_attn"
    parts = [f"{layer}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    g = [gs[m].global_scale for m in parts]
    assert g[0] == g[1] == g[2]
    amax = torch.stack([orig[f"{m}.weight"].abs().amax().float() for m in parts]).amax()
    norm = search_global_norm([orig[f"{m}.weight"] for m in parts], "nvfp4", "absmax")
    want = quantize_tensor(orig[f"{parts[0]}.weight"], "nvfp4", "absmax", global_amax=amax,
                           global_norm=norm)
    assert torch.equal(g[0], want.global_scale)
    assert torch.equal(gs[parts[0]].codes, want.codes)
    assert '"global-search": true' in (out / "mxptq_report.json").read_text()


def test_gptq_layers_search_one_norm_per_fused_set():
    """quantize_layer with GPTQ: the set's norm is searched on the original weights (RTN
    objective) and every member gets the same global scale."""
    from torch import nn

    from mxptq.calibration import CalibOptions, LinearStats, quantize_layer
    from mxptq.calibration.runner import LayerRun

    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    got = {}
    for gs in (False, True):
        torch.manual_seed(2)
        layer = nn.ModuleDict({p: nn.Linear(64, 32, bias=False) for p in ("q_proj", "k_proj",
                                                                          "v_proj", "o_proj")})
        for i, m in enumerate(layer.values()):
            w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3 + i))
            m.weight.data = w * torch.linspace(0.05, 1.0, 64) * (1 + i)
        stats = {}
        for p in layer:
            stats[f"l.{p}"] = LinearStats(64, True, block=16)
            stats[f"l.{p}"].add(x)
        opts = CalibOptions(algo="gptq", importance="hessian", global_search=gs)
        got[gs] = quantize_layer(LayerRun(0, "l", layer, stats), opts)
    g = [got[True][f"l.{p}"].global_scale for p in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(v, g[0]) for v in g)
    assert any(not torch.equal(got[True][m].global_scale, got[False][m].global_scale)
               for m in got[True])
