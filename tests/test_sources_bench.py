"""The giant-shapes benchmark's logic at CPU sizes: the shapes are the releases', the generated
slice is a valid source of its kind, its output size model is exact, and the whole run works."""

import json
import subprocess
import sys

import pytest
from quant_helpers import quantize

from mxptq.bench import pipeline as B
from mxptq.checkpoint.dialects import get_dialect
from mxptq.checkpoint.safetensors_io import list_shards, read_header
from mxptq.formats import get_format
from mxptq.plan import build_plan


def test_full_models_have_the_released_parameter_counts():
    assert round(B.full_model("llama-8b")["params"] / 1e9, 2) == 8.03
    assert round(B.full_model("deepseek-v3")["params"] / 1e9) == 671  # README_WEIGHTS.md
    assert round(B.full_model("qwen3-235b")["params"] / 1e9) == 235
    ds = B.deepseek_shapes(dict(B.DEEPSEEK_V3, layers=4, dense_layers=1))
    experts = [n for n, s, _ in ds if ".experts." in n and s == (2048, 7168)]
    assert len(experts) == 3 * 256 * 2  # gate and up of 256 routed experts in 3 MoE layers


@pytest.mark.parametrize("model", ["deepseek-v3", "qwen3-235b"])
def test_generated_slice_is_a_source_whose_output_size_is_modelled(tmp_path, model):
    c = dict(B.TINY[model], layers=2, dense_layers=1)
    src = tmp_path / "src"
    B.generate(src, model, c, 3, None)
    specs = B.SHAPES[model](c)
    headers = {k: v for p in list_shards(src) for k, v in read_header(p).items()}
    assert sum(i.nbytes for i in headers.values()) == sum(
        B.nbytes(d, s) for _, d, s in B.stored(model, c, specs))
    p = build_plan(src, get_format("nvfp4"), "search", get_dialect("compressed-tensors"))
    linear = {n for n, _, kind in specs if kind == "linear"}
    assert {it.name for it in p.items if it.action == "quantize"} == linear
    if model == "deepseek-v3":
        assert p.source.name == "fp8" and len(p.source.packed) == len(linear)
        assert headers["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (
            1, 2)  # [64 + 16, 256] in 128x128 blocks: partial edges
    out = tmp_path / "out"
    quantize(src, out, "--scale", "absmax")
    written = {k: v for p in list_shards(out) for k, v in read_header(p).items()}
    assert sum(i.nbytes for i in written.values()) == B.output_bytes(specs)


@pytest.mark.slow
def test_benchmark_runs_end_to_end_at_tiny_sizes(tmp_path):
    js = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "mxptq.bench.pipeline", "--model", "deepseek-v3",
                        "--tiny", "--repeat", "1", "--dir", str(tmp_path / "d"), "--json-out",
                        str(js)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["model"] == "deepseek-v3" and res["slice"]["shards"] >= 3
    assert res["io_floor_s"] > 0 and res["ratio_to_floor"] == pytest.approx(
        res["quantize_wall_s"] / res["io_floor_s"])
    assert 0 < res["rel_mse_mean"] < 0.05 and res["peak_rss_gib"] > 0
    assert res["cuda_cpu_identical"] is None  # no GPU here
    assert res["full_model"]["bytes_in"] > 600 * 2**30
    assert not (tmp_path / "d" / "deepseek-v3-src").exists()  # removed without --keep-data
