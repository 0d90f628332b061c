"""Source dialects: FP8 (block, per-channel, per-tensor), MXFP4 and NVFP4 inputs are decoded
exactly before quantization. Each decoder equals its client's dequantization bit for bit, and
quantizing a source checkpoint writes the same bytes as quantizing its decoded weights."""

import hashlib
import json
import os

import pytest
import torch
from quant_helpers import quantize
from source_writers import (
    BF16,
    block_args,
    ct_fp8_decode,
    ct_fp8_encode,
    fp8_block_encode,
    make_ct_fp8,
    make_fp4,
    make_fp8_block,
    make_gptoss_mxfp4,
    make_modelopt_fp8,
    write_reference,
)
from typer.testing import CliRunner

from mxptq.checkpoint.dialects import get_dialect
from mxptq.checkpoint.sources import decode_fp4, decode_fp8, decode_gptoss
from mxptq.cli import app
from mxptq.errors import MxptqError
from mxptq.formats import get_format
from mxptq.plan import build_plan
from mxptq.tensor import dequantize, quantize_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


def heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(0.6 * torch.randn(shape, generator=g))
    return (0.02 * x).to(BF16)


# -- the decoders against their clients ------------------------------------------------------


def test_fp8_block_decode_equals_transformers_and_compressed_tensors():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = heavy((256, 384))
    q, s = fp8_block_encode(w, 128, 128)
    ours = decode_fp8(q, s, (128, 128))
    hf = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    assert ours.dtype == torch.float32 and torch.equal(ours.view(torch.int32), hf.view(torch.int32))
    w = heavy((100, 70), 1)  # partial edge blocks (DeepSeek: the pad is zero)
    q, s = fp8_block_encode(w, 32, 48)
    assert s.shape == (4, 2)
    ref = ct_fp8_decode(q, s, block_args(32, 48))
    assert torch.equal(decode_fp8(q, s, (32, 48)).view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_ct_fp8_decode_equals_compressed_tensors(strategy):
    w = heavy((40, 72), 2)
    q, s, scheme = ct_fp8_encode(w, strategy)
    n, k = w.shape
    block = {"tensor": (n, k), "channel": (1, k), "block": (16, 24)}[strategy]
    ref = ct_fp8_decode(q, s, scheme.weights)
    ours = decode_fp8(q, s, block)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    if strategy != "block":  # bf16 scales: the fp32 product is exact (equals the float64 one)
        assert torch.equal(ours.double(), q.double() * s.double())


def test_fp8_e8m0_scales_are_powers_of_two():
    q = heavy((4, 8)).float().div(0.02).to(torch.float8_e4m3fn)
    e = torch.tensor([[120], [127], [130], [0]], dtype=torch.uint8)
    out = decode_fp8(q, e, (1, 8))
    assert torch.equal(out, q.float() * torch.tensor([[2.0**-7], [1.0], [8.0], [2.0**-127]]))


def test_gptoss_decode_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (3, 40, 4), dtype=torch.uint8, generator=g)
    ours = decode_gptoss(blocks, scales)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=BF16)
    assert ours.shape == (3, 128, 40) and ours.dtype == BF16
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_decode_equals_compressed_tensors_and_mxptq(fmt):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    f = get_format(fmt)
    qt = quantize_tensor(heavy((48, 128), 4), f, "search")
    ours = decode_fp4(qt.codes, qt.scales, qt.global_scale, f)
    assert torch.equal(ours, dequantize(qt))
    if fmt == "nvfp4":  # CT `_dequantize`: x_q * (scale / global_scale)
        args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group",
                                group_size=16)
        x = unpack_fp4_from_uint8(qt.codes, 48, 128, dtype=torch.float32)
        ref = ct_dequantize(x, qt.scales.float(), args=args, dtype=torch.float32,
                            global_scale=qt.global_scale.reshape(1))
        assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


# -- quantizing a source == quantizing its decoded weights -----------------------------------


def plan_of(src, *ignore):
    return build_plan(src, get_format("nvfp4"), "search", get_dialect("compressed-tensors"),
                      list(ignore))


def outputs_equal(a, b):
    """Same files, same bytes, except the two records of the run itself: the report (timings)
    and the manifest (its signature covers the input)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n not in ("mxptq_report.json", "mxptq_manifest.json"):
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


CASES = {
    "fp8-block-deepseek": (lambda t: make_fp8_block(t), "model.layers.0.mlp.down_proj", ()),
    "fp8-block-qwen3-moe": (lambda t: make_fp8_block(t, "qwen3_moe", (32, 32)),
                            "model.layers.1.mlp.experts.2.down_proj", ()),
    "fp8-tensor": (lambda t: make_fp8_block(t, "llama", None), "model.layers.0.mlp.up_proj",
                   ()),
    "ct-fp8-tensor": (lambda t: make_ct_fp8(t, "tensor"), "model.layers.1.self_attn.o_proj", ()),
    "ct-fp8-channel": (lambda t: make_ct_fp8(t, "channel"), "model.layers.0.mlp.down_proj", ()),
    "ct-fp8-block": (lambda t: make_ct_fp8(t, "block"), "model.layers.0.mlp.down_proj", ()),
    "modelopt-fp8": (lambda t: make_modelopt_fp8(t, "FP8"), "model.layers.0.mlp.down_proj", ()),
    "modelopt-fp8-channel": (lambda t: make_modelopt_fp8(t, "FP8_PER_CHANNEL_PER_TOKEN"),
                             "model.layers.1.mlp.gate_proj", ()),
    "modelopt-fp8-pb-wo": (lambda t: make_modelopt_fp8(t, "FP8_PB_WO"),
                           "model.layers.0.mlp.down_proj", ()),
    "gpt-oss-mxfp4": (make_gptoss_mxfp4, "model.layers.0.mlp.experts", ()),
    "ct-nvfp4-to-mxfp4": (lambda t: make_fp4(t, "compressed-tensors"),
                          "model.layers.0.mlp.down_proj", ("--format", "mxfp4")),
    "modelopt-nvfp4": (lambda t: make_fp4(t, "modelopt"), "model.layers.0.mlp.down_proj", ()),
    "native-nvfp4-ue5m3": (lambda t: make_fp4(t, "native", "nvfp4-ue5m3"),
                           "model.layers.0.mlp.down_proj", ()),
    "ct-mxfp4-to-nvfp4": (lambda t: make_fp4(t, "compressed-tensors", "mxfp4"),
                          "model.layers.0.mlp.down_proj", ()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_source_quantizes_to_the_bytes_of_its_decoded_weights(tmp_path, case):
    make, ignored, extra = CASES[case]
    pair = make(tmp_path)
    plan = plan_of(pair.src, ignored)
    assert plan.source.name != "dense" and plan.source.packed
    kept = {it.name for it in plan.items if it.action == "keep" and it.name in pair.packed}
    assert kept, "the test must cover a decoded weight kept dense"
    ref = write_reference(pair, tmp_path / "ref", kept)
    assert plan_of(ref, ignored).source.name == "dense"
    by = {it.name: it for it in plan.items}
    for name in sorted(pair.packed):  # what the reader hands the quantizer, bit for bit
        info = by[name].info
        fd = os.open(pair.src / info.shard, os.O_RDONLY)
        try:
            got, want = plan.source.read(fd, info), pair.decoded[name]
        finally:
            os.close(fd)
        bits = {torch.float32: torch.int32, BF16: torch.int16}[want.dtype]
        assert got.dtype == want.dtype and torch.equal(got.view(bits), want.view(bits)), name
    args = ("--scale", "search", "--ignore", ignored, *extra)
    quantize(pair.src, tmp_path / "a", *args)
    quantize(ref, tmp_path / "b", *args)
    outputs_equal(tmp_path / "a", tmp_path / "b")
    # nothing of the source's quantization survives: its scales, its config
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    for name in index["weight_map"]:
        assert not name.endswith(("_scale_inv", ".input_scale", "_blocks", "_scales")), name
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] in ("compressed-tensors", "mxptq")
    assert not (tmp_path / "a" / "hf_quant_config.json").exists()
    report = json.loads((tmp_path / "a" / "mxptq_report.json").read_text())
    assert report["plan"]["source"] == plan.source.describe


def test_plan_of_a_source_reads_no_tensor_data(tmp_path, monkeypatch):
    import mxptq.checkpoint.safetensors_io as io
    import mxptq.checkpoint.sources as sources

    pair = make_fp8_block(tmp_path)

    def boom(*a, **k):
        raise AssertionError("tensor data read during planning")

    monkeypatch.setattr(io, "read_tensor", boom)
    monkeypatch.setattr(sources, "read_tensor", boom)
    p = plan_of(pair.src)
    by = {it.name: it for it in p.items}
    w = by["model.layers.1.self_attn.q_a_proj.weight"]
    assert w.action == "quantize" and w.info.dtype == "BF16" and w.info.shape == (32, 64)
    assert not any(n.endswith("_scale_inv") for n in by)
    assert p.summary()["bytes_in"] < sum(it.info.nbytes for it in p.items)  # FP8 on disk


# -- bad input: one clear line naming the tensor, the input untouched ------------------------


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run_fails(src, out, *needles, args=()):
    before = digest(src)
    r = CliRunner().invoke(app, ["quantize", "--model", str(src), "--out", str(out), *args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert digest(src) == before
    assert not out.exists()
    return lines[0]


def _edit(src, fn):
    """Rewrite the safetensors shard holding the tensors `fn` changes."""
    from safetensors.torch import load_file, save_file

    for p in sorted(src.glob("*.safetensors")):
        sd = load_file(p)
        new = fn(dict(sd))
        if set(new) != set(sd) or any(new[k] is not v for k, v in sd.items()):
            save_file(new, str(p), metadata={"format": "pt"})
            index = json.loads((src / "model.safetensors.index.json").read_text())
            for k in set(new) - set(sd):
                index["weight_map"][k] = p.name
            for k in set(sd) - set(new):
                index["weight_map"].pop(k)
            (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture
def fp8(tmp_path):
    return make_fp8_block(tmp_path, "llama")


def test_missing_fp8_scale_names_the_tensor(tmp_path, fp8):
    name = "model.layers.1.mlp.up_proj.weight_scale_inv"
    _edit(fp8.src, lambda sd: {k: v for k, v in sd.items() if k != name})
    run_fails(fp8.src, tmp_path / "o", "model.layers.1.mlp.up_proj.weight", name, "missing")


def test_wrong_shape_fp8_scale_names_the_tensor(tmp_path, fp8):
    name = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    _edit(fp8.src, lambda sd: {**sd, name: sd[name][:, :1].contiguous()} if name in sd else sd)
    run_fails(fp8.src, tmp_path / "o", name, "expected [2, 3] (16x24 blocks)")


def test_unknown_quant_method(tmp_path, fp8):
    cfg = json.loads((fp8.src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (fp8.src / "config.json").write_text(json.dumps(cfg))
    run_fails(fp8.src, tmp_path / "o", "quant_method 'gptq'", "not a source mxptq decodes")


def test_mixed_dialects_name_the_tensor(tmp_path, fp8):
    name = "model.layers.1.mlp.down_proj.weight_packed"
    _edit(fp8.src, lambda sd: {**sd, name: torch.zeros(64, 64, dtype=torch.uint8)}
          if "model.layers.1.mlp.down_proj.weight" in sd else sd)
    run_fails(fp8.src, tmp_path / "o", name, "quant_method 'fp8' does not account for it")


def test_fp8_weights_without_quantization_config(tmp_path, fp8):
    cfg = json.loads((fp8.src / "config.json").read_text())
    del cfg["quantization_config"]
    (fp8.src / "config.json").write_text(json.dumps(cfg))
    line = run_fails(fp8.src, tmp_path / "o", "no quantization_config")
    assert "tensor model." in line


def test_ct_int4_pack_quantized_is_refused(tmp_path, fp8):
    cfg = json.loads((fp8.src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format":
                                  "pack-quantized", "config_groups": {"group_0": {
                                      "targets": ["Linear"], "weights": {"num_bits": 4,
                                                                         "type": "int"}}}}
    (fp8.src / "config.json").write_text(json.dumps(cfg))
    run_fails(fp8.src, tmp_path / "o", "format 'pack-quantized'", "not a source")


def test_calibration_of_a_quantized_source_is_refused(tmp_path, fp8):
    calib = tmp_path / "c.txt"
    calib.write_text("some text " * 50)
    run_fails(fp8.src, tmp_path / "o", "--calib", "FP8 E4M3",
              args=("--calib", str(calib), "--importance", "diag"))


def test_source_error_is_raised_by_the_library_too(fp8):
    cfg = json.loads((fp8.src / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [16]
    (fp8.src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MxptqError, match="weight_block_size"):
        plan_of(fp8.src)
