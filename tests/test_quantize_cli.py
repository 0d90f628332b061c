"""The command line: help, recipes and their precedence, JSON output, --overwrite."""

import json
from pathlib import Path

import pytest
from quant_helpers import tiny_llama_dir
from typer.testing import CliRunner

from mxptq.cli import app
from mxptq.recipes import DEFAULTS, load_recipe, merge

REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, ["quantize", *map(str, args)])


def test_help_documents_every_option():
    r = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in ("--model", "--format", "--scale", "--out", "--block-size", "--dialect",
                "--ignore", "--device", "--recipe", "--dry-run", "--overwrite", "--resume",
                "--json", "--quantize-lm-head"):
        assert opt in r.stdout
    text = " ".join(r.stdout.split())  # help lines wrap at the terminal's width
    for default in ("default: nvfp4", "default: search", "default: auto"):
        assert default in text


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(path, tmp_path):
    r = invoke("--model", tiny_llama_dir(), "--out", tmp_path / "o", "--recipe", path, "--dry-run",
               "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["quantize"] > 0


def test_command_line_overrides_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("format: mxfp4\nscale: absmax\nblock_size: 32\nignore: '*.o_proj'\n")
    rec = load_recipe(p)
    assert rec == {"format": "mxfp4", "scale": "absmax", "block-size": 32, "ignore": ["*.o_proj"]}
    opts = merge(rec, {"scale": "search", "format": None, "ignore": []})
    assert opts["scale"] == "search" and opts["format"] == "mxfp4"
    assert opts["ignore"] == ["*.o_proj"] and opts["device"] == DEFAULTS["device"]


def test_quantize_json_and_overwrite(tmp_path):
    out = tmp_path / "o"
    r = invoke("--model", tiny_llama_dir(), "--out", out, "--scale", "absmax", "--json",
               "--ignore", "*.layers.0.*")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["plan"]["quantize"] == 24 and res["quantization_error"]["tensors"] == 24
    assert (out / "config.json").is_file()
    assert invoke("--model", tiny_llama_dir(), "--out", out).exit_code != 0
    r = invoke("--model", tiny_llama_dir(), "--out", out, "--scale", "absmax", "--overwrite",
               "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["plan"]["quantize"] == 30
    assert not any(p.name.startswith(".o.") for p in tmp_path.iterdir())
