"""--resume after a crash continues from the last finished shard and writes the same bytes as an
uninterrupted run."""

import json

import torch
from quant_helpers import quantize
from typer.testing import CliRunner

from mxptq.cli import app
from mxptq.pipeline import FAIL_AFTER_ENV, STATE_NAME, partial_dir


def sharded_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="30KB")
    return src


def checkpoint_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.name.endswith((".safetensors", ".json")) and p.name != "mxptq_report.json"}


def test_resume_after_crash_is_byte_identical(tmp_path, monkeypatch):
    src = sharded_model(tmp_path)
    n = len(list(src.glob("*.safetensors")))
    assert n >= 4
    full = tmp_path / "full"
    quantize(src, full, "--scale", "search")

    out = tmp_path / "out"
    args = ["quantize", "--model", str(src), "--out", str(out), "--scale", "search"]
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0 and "--resume" in r.stderr
    assert not out.exists()
    part = partial_dir(out)
    state = json.loads((part / STATE_NAME).read_text())
    assert len(state["done"]) == 2
    first = {v["file"]: (part / v["file"]).stat().st_mtime_ns for v in state["done"].values()}

    monkeypatch.delenv(FAIL_AFTER_ENV)
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.stderr
    assert not part.exists()
    for f, t in first.items():  # finished shards were not redone
        assert (out / f).stat().st_mtime_ns == t
    assert checkpoint_bytes(out) == checkpoint_bytes(full)
    rep = json.loads((out / "mxptq_report.json").read_text())
    assert len(rep["tensors"]) == json.loads((full / "mxptq_report.json").read_text())[
        "quantization_error"]["tensors"]


def test_resume_with_other_flags_is_refused(tmp_path, monkeypatch):
    src = sharded_model(tmp_path)
    out = tmp_path / "out"
    args = ["quantize", "--model", str(src), "--out", str(out)]
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    assert CliRunner().invoke(app, [*args, "--scale", "absmax"]).exit_code != 0
    monkeypatch.delenv(FAIL_AFTER_ENV)
    r = CliRunner().invoke(app, [*args, "--scale", "search", "--resume"])
    assert r.exit_code != 0 and "other flags" in r.stderr
