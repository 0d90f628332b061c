"""Every mistake a user can make ends in one clear line, a non-zero exit, the input untouched and
nothing in --out that looks like a finished checkpoint."""

import hashlib
import json
import shutil

import pytest
import torch
from quant_helpers import tiny_llama_dir
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mxptq.cli import app


def run(*args, env=None):
    r = CliRunner().invoke(app, ["quantize", *map(str, args)], env=env)
    return r.exit_code, r.stderr.strip(), r.stdout


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def model(tmp_path):
    """A writable copy of the tiny Llama."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir(), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def check_failed(code, err, out_dir, *needles):
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (out_dir / "config.json").exists()
    assert not (out_dir / "model.safetensors.index.json").exists()


def test_missing_folder(tmp_path):
    code, err, _ = run("--model", tmp_path / "nope", "--out", tmp_path / "o")
    check_failed(code, err, tmp_path / "o", "no such folder")


def test_hub_id_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code, err, _ = run("--model", "nobody/no-such-model", "--out", tmp_path / "o", env=env)
    check_failed(code, err, tmp_path / "o", "offline", "local model folder")


def test_only_bin_weights(tmp_path, model):
    sd = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(sd, model / "pytorch_model.bin")
    before = digest(model)
    code, err, _ = run("--model", model, "--out", tmp_path / "o")
    check_failed(code, err, tmp_path / "o", "pytorch_model.bin", "safetensors")
    assert digest(model) == before


def test_corrupt_header(tmp_path, model):
    p = model / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:20] = b"{not json!!!"
    p.write_bytes(bytes(data))
    before = digest(model)
    code, err, _ = run("--model", model, "--out", tmp_path / "o")
    check_failed(code, err, tmp_path / "o", "model.safetensors", "corrupt safetensors")
    assert digest(model) == before


@pytest.mark.parametrize(
    "args,needle",
    [(["--format", "fp4"], "unknown --format 'fp4'"),
     (["--scale", "mse"], "unknown --scale 'mse'"),
     (["--dialect", "gguf"], "unknown dialect 'gguf'"),
     (["--format", "nvfp4-ue5m3", "--dialect", "compressed-tensors"],
      "dialect compressed-tensors cannot express nvfp4-ue5m3"),
     (["--block-size", "8", "--dialect", "compressed-tensors"],
      "compressed-tensors cannot express nvfp4 with e4m3 scales and block 8"),
     (["--format", "mxfp4", "--dialect", "modelopt"], "modelopt cannot express mxfp4"),
     (["--block-size", "12"], "block size 12 not supported"),
     (["--format", "mxfp4", "--scale", "4over6"], "4over6 needs a scale format")],
)
def test_unknown_or_inexpressible_options(tmp_path, args, needle):
    code, err, _ = run("--model", tiny_llama_dir(), "--out", tmp_path / "o", *args)
    check_failed(code, err, tmp_path / "o", needle)


def test_non_empty_out_without_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, err, _ = run("--model", tiny_llama_dir(), "--out", out)
    check_failed(code, err, out, "not empty", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"


def test_unwritable_out(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("")  # root ignores permissions: then use a path under a file
            probe.unlink()
            target = tmp_path / "file.txt"
            target.write_text("x")
            out = target / "o"
        except PermissionError:
            out = locked / "o"
        code, err, _ = run("--model", tiny_llama_dir(), "--out", out)
        check_failed(code, err, out, "cannot write")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_tensor(tmp_path, model, bad):
    p = model / "model.safetensors"
    sd = load_file(p)
    sd["model.layers.3.self_attn.o_proj.weight"][5, 7] = bad
    save_file(sd, p, metadata={"format": "pt"})
    before = digest(model)
    out = tmp_path / "o"
    code, err, _ = run("--model", model, "--out", out, "--scale", "absmax")
    check_failed(code, err, out, "model.layers.3.self_attn.o_proj.weight",
                 "NaN" if bad != bad else "Inf")
    assert digest(model) == before
    assert not out.exists()
    assert not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_out_inside_input_is_refused(tmp_path, model):
    code, err, _ = run("--model", model, "--out", model / "q")
    check_failed(code, err, model / "q", "inside it")


def test_bad_recipe_key(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("format: nvfp4\nwindow: 3\n")
    code, err, _ = run("--model", tiny_llama_dir(), "--out", tmp_path / "o", "--recipe", r)
    check_failed(code, err, tmp_path / "o", "unknown key 'window'")


def test_json_plan_on_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "o"
    code, _, stdout = run("--model", tiny_llama_dir(), "--out", out, "--dry-run", "--json")
    assert code == 0
    assert json.loads(stdout)["plan"]["quantize"] == 30
    assert not out.exists() and list(tmp_path.iterdir()) == []
