"""On-disk names, dtypes, shapes and config of each dialect (docs/checkpoints.md), and
round trips through our reader."""

import json
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationConfig
from quant_helpers import quantize, tiny_llama_dir
from safetensors import safe_open

from mxptq.checkpoint import checkpoint_format, read_checkpoint, read_dense
from mxptq.tensor import dequantize, quantize_tensor

Q = "model.layers.0.self_attn.q_proj"
REPO = Path(__file__).resolve().parents[1]


def header(path):
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.loads(path.read_bytes()[8 : 8 + n])


def original(name):
    with safe_open(str(tiny_llama_dir() / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def test_compressed_tensors_layout_and_config(tmp_path):
    out = tmp_path / "ct"
    quantize(tiny_llama_dir(), out, "--scale", "absmax")
    h = header(out / "model.safetensors")
    assert h["__metadata__"] == {"format": "pt"}
    assert h[f"{Q}.weight_packed"]["dtype"] == "U8" and h[f"{Q}.weight_packed"]["shape"] == [64, 32]
    sc = h[f"{Q}.weight_scale"]
    assert (sc["dtype"], sc["shape"]) == ("F8_E4M3", [64, 4])
    assert h[f"{Q}.weight_global_scale"] == {**h[f"{Q}.weight_global_scale"], "dtype": "F32",
                                              "shape": [1]}
    assert f"{Q}.weight" not in h and "model.layers.0.mlp.down_proj.weight" in h
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # what the installed loader validates
    assert parsed.quantization_status == "compressed"
    assert qc["config_groups"]["group_0"]["format"] == "nvfp4-pack-quantized"
    assert "model.layers.4.mlp.down_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(h) - {"__metadata__"}
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_llama_dir() / f).read_bytes()
    rep = json.loads((out / "mxptq_report.json").read_text())
    assert rep["flags"]["scale"] == "absmax" and len(rep["tensors"]) == 30
    assert 0 < rep["quantization_error"]["rel_mse_mean"] < 0.05
    # g = 2688 / amax over q, k, v (one fused set), and the bytes are quantize_tensor's
    w = {x: original(f"model.layers.0.self_attn.{x}_proj.weight") for x in "qkv"}
    amax = max(float(t.abs().max()) for t in w.values())
    qt = read_checkpoint(out)[Q]
    assert torch.isclose(qt.global_scale, torch.tensor(2688.0 / amax), rtol=1e-6)
    ref = quantize_tensor(w["q"], "nvfp4", "absmax", global_amax=amax)
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scales.view(torch.uint8),
                                                            ref.scales.view(torch.uint8))


def test_mxfp4_compressed_tensors_config(tmp_path):
    out = tmp_path / "mx"
    quantize(tiny_llama_dir(), out, "--format", "mxfp4", "--scale", "absmax")
    h = header(out / "model.safetensors")
    assert h[f"{Q}.weight_scale"]["dtype"] == "U8" and h[f"{Q}.weight_scale"]["shape"] == [64, 2]
    assert f"{Q}.weight_global_scale" not in h
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert QuantizationConfig.model_validate(qc).format == "mxfp4-pack-quantized"


def test_modelopt_layout_and_roundtrip(tmp_path):
    ct, mo = tmp_path / "ct", tmp_path / "mo"
    quantize(tiny_llama_dir(), ct, "--scale", "search")
    quantize(tiny_llama_dir(), mo, "--scale", "search", "--dialect", "modelopt")
    h = header(mo / "model.safetensors")
    assert h[f"{Q}.weight"]["dtype"] == "U8" and h[f"{Q}.weight"]["shape"] == [64, 32]
    sc = h[f"{Q}.weight_scale"]
    assert (sc["dtype"], sc["shape"]) == ("F8_E4M3", [64, 4])
    assert h[f"{Q}.weight_scale_2"]["dtype"] == "F32" and h[f"{Q}.weight_scale_2"]["shape"] == []
    cfg = json.loads((mo / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "W4A16_NVFP4"
    assert "lm_head" in cfg["ignore"]
    hq = json.loads((mo / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "modelopt"
    assert hq["quantization"]["group_size"] == 16
    assert "model.layers.0.mlp.down_proj" in hq["quantization"]["exclude_modules"]
    assert checkpoint_format(mo)[0] == "modelopt"
    a, b = read_checkpoint(ct), read_checkpoint(mo)
    assert a.keys() == b.keys() and len(a) == 30
    for m in a:
        assert torch.equal(a[m].codes, b[m].codes)
        assert torch.equal(a[m].scales.view(torch.uint8), b[m].scales.view(torch.uint8))
        with safe_open(str(mo / "model.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor(f"{m}.weight_scale_2"),
                               (1.0 / a[m].global_scale).reshape(()))
        torch.testing.assert_close(dequantize(a[m]), dequantize(b[m]), rtol=1e-6, atol=0)
    dense = read_dense(mo)
    assert torch.equal(dense["model.embed_tokens.weight"], original("model.embed_tokens.weight"))


def test_native_ue5m3_block8_roundtrip(tmp_path):
    out = tmp_path / "nat"
    quantize(tiny_llama_dir(), out, "--recipe", str(REPO / "recipes" / "nvfp4-ue5m3-b8.yaml"))
    name, fmt = checkpoint_format(out)
    assert (name, fmt.name, fmt.scale.name, fmt.block_size, fmt.has_global) == (
        "native", "nvfp4-ue5m3", "ue5m3", 8, False)
    h = header(out / "model.safetensors")
    assert h[f"{Q}.weight_scale"]["dtype"] == "U8" and h[f"{Q}.weight_scale"]["shape"] == [64, 8]
    q = read_checkpoint(out)
    # block 8 does not divide K=172 either: down_proj stays dense
    assert len(q) == 30 and "model.layers.0.mlp.down_proj" not in q
    ref = quantize_tensor(original(f"{Q}.weight"), fmt, "search")
    assert torch.equal(q[Q].codes, ref.codes) and torch.equal(q[Q].scales, ref.scales)
    assert q[Q].global_scale is None


def test_native_block4_quantizes_down_proj(tmp_path):
    out = tmp_path / "b4"
    quantize(tiny_llama_dir(), out, "--format", "nvfp4", "--block-size", "4", "--scale", "absmax")
    q = read_checkpoint(out)
    assert checkpoint_format(out)[0] == "native" and len(q) == 35  # 172 = 4 * 43
    assert q["model.layers.0.mlp.down_proj"].scales.dtype == torch.float8_e4m3fn


def test_streaming_shard_writer_gives_safetensors_bytes(tmp_path):
    from safetensors.torch import save_file

    from mxptq.checkpoint.safetensors_io import TORCH_DTYPES, ShardWriter

    st = {v: k for k, v in TORCH_DTYPES.items()}
    ts = {"b.w": torch.randn(3, 5, dtype=torch.bfloat16), "a.p": torch.arange(21).to(torch.uint8),
          "a.s": torch.rand(7, 1).to(torch.float8_e4m3fn), "z.g": torch.rand(()),
          "c.g": torch.rand(1), "i": torch.arange(5), "h": torch.rand(3).half(),
          "e": torch.zeros(0, 4)}
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    w = ShardWriter(tmp_path / "mine.safetensors",
                    {k: (st[v.dtype], tuple(v.shape)) for k, v in ts.items()})
    for k in reversed(list(ts)):  # arrival order does not matter
        w.put(k, ts[k])
    w.close()
    assert (tmp_path / "mine.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors").read_bytes()
