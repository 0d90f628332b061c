"""`mxptq inspect` on a quantized tiny Llama (stories260K's shapes) and on deliberately corrupted
copies of it: the clean checkpoint passes with its summary, every corruption fails naming what is
wrong."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import typer
from quant_helpers import quantize, tiny_llama_dir
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mxptq.checkpoint.safetensors_io import INDEX_NAME, read_header
from mxptq.inspect_cmd import inspect_command

app = typer.Typer()
app.command("inspect")(inspect_command)
app.command("noop")(lambda: None)  # two commands, so "inspect" is a sub-command as in mxptq's CLI

SHARD = "model.safetensors"
Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ins") / "ct"
    quantize(tiny_llama_dir(), out, "--format", "nvfp4", "--scale", "search")
    return out


@pytest.fixture
def ckpt(clean, tmp_path) -> Path:
    """A fresh copy to corrupt."""
    return Path(shutil.copytree(clean, tmp_path / "copy"))


def run(folder: Path, *args: str):
    return CliRunner().invoke(app, ["inspect", str(folder), *args])


def _poke(folder: Path, tensor: str, data: bytes, at: int = 0) -> None:
    """Overwrite bytes of one tensor in place."""
    info = read_header(folder / SHARD)[tensor]
    with open(folder / SHARD, "r+b") as f:
        f.seek(info.offset + at)
        f.write(data)


def _rewrite(folder: Path, edit) -> None:
    """Rewrite the shard with `edit(tensors)` applied (safetensors' own writer)."""
    with safe_open(str(folder / SHARD), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(folder / SHARD), metadata={"format": "pt"})


def _fails(result, *words: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert any(all(w in ln for w in words) for ln in lines), result.stderr
    assert "Traceback" not in result.output


def test_clean_checkpoint_passes_with_summary(clean):
    r = run(clean, "--layers")
    assert r.exit_code == 0, r.output
    for text in ("compressed-tensors", "nvfp4", "E4M3", "block 16", "search", "4.506",
                 "2.31x", "input dim not a multiple of block 16", "quantized layers", "[64, 64]",
                 "scale codes"):
        assert text in r.stdout, text
    assert not r.stderr


def test_json_parses_and_offsets_with_original(clean):
    r = run(clean, "--json", "--original", str(tiny_llama_dir()), "--layers")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["ok"] and j["format"] == "nvfp4" and j["block_size"] == 16
    assert j["quantized_layers"] == len(j["layers"]) == 30
    assert 4.5 < j["bits_per_weight"] < 4.52 and j["compression_ratio"] > 2
    blocks = sum(j["scale_code_histogram"].values())
    assert blocks == sum(j["offset_histogram"].values()) == 171520 // 16
    offsets = {int(o) for o in j["offset_histogram"]}
    assert 0 in offsets and offsets <= set(range(-5, 7))  # the default search window


def test_deleted_shard(ckpt):
    (ckpt / SHARD).unlink()
    _fails(run(ckpt), SHARD, "does not exist")


def test_index_names_a_missing_shard(ckpt):
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"][f"{Q}.weight_scale"] = "model-00002-of-00002.safetensors"
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    r = run(ckpt)
    _fails(r, "model-00002-of-00002.safetensors", "does not exist")
    _fails(r, f"{Q}.weight_scale", "index")


def test_tensor_missing_from_index(ckpt):
    index = json.loads((ckpt / INDEX_NAME).read_text())
    del index["weight_map"]["model.norm.weight"]
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    _fails(run(ckpt), "model.norm.weight", "not in", INDEX_NAME)


@pytest.mark.parametrize("byte, words", [(0x7F, "NaN"), (0xB8, "negative")])
def test_bad_scale_byte(ckpt, byte, words):
    _poke(ckpt, f"{Q}.weight_scale", bytes([byte]), at=5)
    _fails(run(ckpt), f"{Q}.weight_scale", words)


def test_fused_partner_with_other_global_scale(ckpt):
    _poke(ckpt, "model.layers.1.self_attn.k_proj.weight_global_scale", struct.pack("<f", 1234.5))
    _fails(run(ckpt), "model.layers.1.self_attn", "different global scales", "k_proj=1234.5")


def test_dropped_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop(f"{Q}.weight_global_scale"))
    r = run(ckpt)
    _fails(r, f"{Q}.weight_global_scale", "is not in", SHARD)  # the index still names it
    _fails(r, f"{Q}.weight_global_scale", "missing")


def test_dropped_fused_partner(ckpt):
    v = "model.layers.2.self_attn.v_proj"

    def drop(t):
        for k in [k for k in t if k.startswith(v + ".")]:
            del t[k]

    _rewrite(ckpt, drop)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"] = {k: s for k, s in index["weight_map"].items() if not k.startswith(v)}
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    _fails(run(ckpt), "fused partner", v, "missing")


def test_changed_dtype(ckpt):
    def edit(t):
        t[f"{Q}.weight_packed"] = t[f"{Q}.weight_packed"].view(__import__("torch").int8)

    _rewrite(ckpt, edit)
    r = run(ckpt)
    _fails(r, f"{Q}.weight_packed", "dtype I8", "expected U8")
    assert "fused partner" not in r.stderr  # the layer is broken, not dense


def test_changed_shape(ckpt):
    def edit(t):
        t[f"{Q}.weight_scale"] = t[f"{Q}.weight_scale"][:, :2].contiguous()

    _rewrite(ckpt, edit)
    _fails(run(ckpt), Q, "scales shape [64, 2]", "expected [64, 4]")


def test_config_names_another_format(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["format"] = "mxfp4-pack-quantized"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = run(ckpt)
    _fails(r, "dtype F8_E4M3", "expected U8")
    _fails(r, "more problems (--json lists all)")
    problems = json.loads(run(ckpt, "--json").stdout)["problems"]
    config = [p for p in problems if p.startswith("quantization_config")]
    assert any("group_size is 16, but mxfp4 needs 32" in p for p in config)
    assert any("format 'nvfp4-pack-quantized' but group group_0 says" in p for p in config)
    assert len(problems) - len(config) == 2 * 30


def test_ue5m3_code_above_max(tmp_path):
    out = tmp_path / "native"
    quantize(tiny_llama_dir(), out, "--format", "nvfp4-ue5m3", "--block-size", "8",
             "--scale", "absmax")
    r = run(out, "--json", "--original", str(tiny_llama_dir()))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["offset_histogram"] == {"0": 171520 // 8}  # absmax: all c0
    _poke(out, f"{Q}.weight_scale", bytes([0xFF]))
    _fails(run(out), f"{Q}.weight_scale", "above ue5m3 max 254")


def test_not_a_checkpoint(tmp_path):
    _fails(run(tmp_path), "config.json")


def test_modelopt_fused_partner_scale(tmp_path):
    out = tmp_path / "mo"
    quantize(tiny_llama_dir(), out, "--format", "nvfp4", "--scale", "absmax",
             "--dialect", "modelopt")
    r = run(out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["dialect"] == "modelopt", r.output
    _poke(out, "model.layers.3.mlp.up_proj.weight_scale_2", struct.pack("<f", 0.5))
    _fails(run(out), "model.layers.3.mlp", "different global scales", "up_proj=0.5")
