"""--resume after a crash continues from the last finished shard and writes the same bytes as an
uninterrupted run; a rerun without --resume never discards a partial output silently, and
--resume on a finished output says so."""

import json

import torch
from quant_helpers import quantize
from typer.testing import CliRunner

from mxptq.checkpoint.durable import KILL_ENV
from mxptq.cli import app
from mxptq.outdir import RECORDS, partial_dir


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


def crash_after(monkeypatch, n_shards):
    """Fail (an OSError in the writer) right after the n-th shard is recorded."""
    monkeypatch.setenv(KILL_ENV, f"shard-recorded#{n_shards}@raise")


def test_resume_after_crash_is_byte_identical(tmp_path, monkeypatch):
    src = sharded_model(tmp_path)
    n = len(list(src.glob("*.safetensors")))
    assert n >= 4
    full = tmp_path / "full"
    quantize(src, full, "--scale", "search")

    out = tmp_path / "out"
    args = ["quantize", "--model", str(src), "--out", str(out), "--scale", "search"]
    crash_after(monkeypatch, 2)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--resume" in r.stderr, r.stderr
    assert not out.exists()
    part = partial_dir(out)
    records = sorted((part / RECORDS).glob("*.json"))
    assert len(records) == 2
    first = {p.name[:-5]: (part / p.name[:-5]).stat().st_mtime_ns for p in records}

    monkeypatch.delenv(KILL_ENV)
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
    crash_after(monkeypatch, 1)
    assert CliRunner().invoke(app, [*args, "--scale", "absmax"]).exit_code == 2
    monkeypatch.delenv(KILL_ENV)
    r = CliRunner().invoke(app, [*args, "--scale", "search", "--resume"])
    assert r.exit_code == 2 and "other flags" in r.stderr


def test_rerun_without_resume_keeps_the_partial_output(tmp_path, monkeypatch):
    src = sharded_model(tmp_path)
    out = tmp_path / "out"
    args = ["quantize", "--model", str(src), "--out", str(out)]
    crash_after(monkeypatch, 2)
    assert CliRunner().invoke(app, args).exit_code == 2
    monkeypatch.delenv(KILL_ENV)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.stderr
    assert r.stderr.count("\n") == 1
    assert "left 2 of" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert len(list((partial_dir(out) / RECORDS).glob("*.json"))) == 2  # nothing discarded
    r = CliRunner().invoke(app, [*args, "--overwrite"])  # discards it on request
    assert r.exit_code == 0, r.stderr
    assert not partial_dir(out).exists()


def test_resume_on_a_finished_output(tmp_path):
    src = sharded_model(tmp_path)
    out = tmp_path / "out"
    quantize(src, out)
    before = checkpoint_bytes(out)
    args = ["quantize", "--model", str(src), "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.stderr
    said = " ".join(r.stdout.split())
    assert "holds this checkpoint" in said and "nothing left to do" in said
    assert checkpoint_bytes(out) == before
    r = CliRunner().invoke(app, args)  # a plain rerun names the way to redo it
    assert r.exit_code == 2 and "already holds this checkpoint" in r.stderr
    r = CliRunner().invoke(app, [*args, "--scale", "absmax", "--resume"])
    assert r.exit_code == 2 and "finished checkpoint of another run" in r.stderr
