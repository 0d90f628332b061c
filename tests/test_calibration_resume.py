"""Calibration in `mxptq quantize`: progress bar, clean Ctrl-C, resume from a layer boundary to
the bytes of an uninterrupted run, the window clamped to the model's context, and wall time
that counts calibration (a tiny random Llama and text written here; CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_llama import tiny_llama, tiny_text
from typer.testing import CliRunner

from mxptq.calibration.state import SAVE_EVERY_ENV, STOP_ENV, CalibState
from mxptq.calibration.stats import LinearStats
from mxptq.checkpoint.durable import KILL_ENV
from mxptq.cli import app
from mxptq.formats import get_format
from mxptq.outdir import CALIB_STATE_DIR, partial_dir
from mxptq.tensor import quantize_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return tiny_text(tmp_path_factory.mktemp("text") / "calib.txt")


def calib(text, *extra):
    return ["--calib", str(text), "--calib-samples", "6", "--calib-seqlen", "32", *extra]


def invoke(model, out, *args):
    return CliRunner().invoke(app, ["quantize", "--model", str(model), "--out", str(out),
                                    *map(str, args)])


def ok(r):
    assert r.exit_code == 0, r.output + r.stderr
    return r


def weights(out):
    return (out / "model.safetensors").read_bytes()


def report(out):
    return json.loads((out / "mxptq_report.json").read_text())


@pytest.mark.parametrize("mode", [("--algo", "gptq", "--importance", "diag"),
                                  ("--scheme", "w4a4")])
def test_interrupt_at_a_layer_boundary_then_resume_gives_the_same_bytes(
        model, text, tmp_path, monkeypatch, mode):
    args = calib(text, *mode)
    ok(invoke(model, tmp_path / "ref", *args))
    out = tmp_path / "o"
    monkeypatch.setenv(STOP_ENV, "2")  # Ctrl-C once layers 0 and 1 are done
    r = invoke(model, out, *args)
    assert r.exit_code == 2, r.output + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted during calibration; "
                                                   "layers 0-1 of 4 are kept"), r.stderr
    assert "--resume" in lines[0] and "layer 2" in lines[0]
    assert not out.exists()
    state = partial_dir(out) / CALIB_STATE_DIR
    assert (state / "hidden.safetensors").is_file()  # saved by the interrupt, not the timer
    monkeypatch.delenv(STOP_ENV)
    ok(invoke(model, out, *args, "--resume"))
    assert weights(out) == weights(tmp_path / "ref")
    rep = report(out)
    assert rep["calibration"]["resumed_at_layer"] == 2
    assert rep["calibration"] == {**report(tmp_path / "ref")["calibration"],
                                  "resumed_at_layer": 2, "seconds": rep["calibration"]["seconds"]}
    assert not (out / CALIB_STATE_DIR).exists() and not partial_dir(out).exists()


def test_a_crash_after_calibration_does_not_calibrate_again(model, text, tmp_path, monkeypatch):
    args = calib(text, "--algo", "gptq")
    ok(invoke(model, tmp_path / "ref", *args))
    out = tmp_path / "o"
    monkeypatch.setenv(KILL_ENV, "shard-recorded#1@raise")  # crash once the shard is written
    assert invoke(model, out, *args).exit_code != 0
    monkeypatch.delenv(KILL_ENV)
    monkeypatch.setattr("mxptq.calibration.calibrate",
                        lambda *a, **k: pytest.fail("calibrated again"))
    ok(invoke(model, out, *args, "--resume"))
    assert weights(out) == weights(tmp_path / "ref")
    assert report(out)["calibration"]["resumed_at_layer"] == 4


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_saved_boundary(model, text, tmp_path):
    """SIGKILL right after the boundary of layer 3 is on disk: nothing runs at exit, and the
    folder alone must carry the run on."""
    args = calib(text, "--algo", "gptq")
    ok(invoke(model, tmp_path / "ref", *args))
    out = tmp_path / "o"
    env = {**os.environ, STOP_ENV: "3:kill", SAVE_EVERY_ENV: "0"}
    cmd = [sys.executable, "-m", "mxptq.cli", "quantize", "--model", str(model), "--out",
           str(out), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr
    ok(invoke(model, out, *args, "--resume"))
    assert weights(out) == weights(tmp_path / "ref")
    assert report(out)["calibration"]["resumed_at_layer"] == 3


def test_resume_with_other_calibration_flags_is_refused(model, text, tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv(STOP_ENV, "1")
    assert invoke(model, out, *calib(text, "--importance", "diag")).exit_code == 2
    monkeypatch.delenv(STOP_ENV)
    r = invoke(model, out, *calib(text, "--importance", "diag", "--seed", "7"), "--resume")
    assert r.exit_code == 2 and "other flags" in r.stderr, r.stderr
    assert (partial_dir(out) / CALIB_STATE_DIR / "state.json").is_file()  # left for a resume


def test_window_is_clamped_to_the_context_with_a_note_and_time_counts_calibration(
        model, text, tmp_path):
    out = tmp_path / "o"
    r = ok(invoke(model, out, "--calib", text, "--calib-samples", "3", "--calib-seqlen", "100",
                  "--importance", "diag"))
    assert "exceeds the model's context (max_position_embeddings 64)" in " ".join(r.output.split())
    rep = report(out)
    assert rep["calibration"]["windows"] == [3, 64]
    assert any("max_position_embeddings 64" in n for n in rep["calibration"]["notes"])
    assert rep["timings"]["total_s"] >= rep["calibration"]["seconds"] > 0


def test_progress_bar_on_a_terminal_only(model, text, tmp_path, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    r = ok(invoke(model, tmp_path / "a", *calib(text, "--importance", "diag")))
    assert "calibrate" in r.output and "4/4 layers" in r.output
    r = ok(invoke(model, tmp_path / "b", *calib(text, "--importance", "diag"), "--json"))
    assert "calibrate" not in r.stderr + r.stdout
    json.loads(r.stdout)


def test_state_round_trip_is_exact(tmp_path):
    """Statistics (a Linear without tokens too) and QuantizedTensors come back bit for bit."""
    torch.manual_seed(0)
    seen = LinearStats(32)
    seen.add(torch.randn(5, 32))
    stats = {"a.q_proj": seen, "a.k_proj": seen, "a.e.0.up_proj": LinearStats(32)}
    qt = quantize_tensor(torch.randn(8, 32), "nvfp4", "search")
    st = CalibState(tmp_path / "s", "sig", 2)
    st.start(torch.arange(12).reshape(3, 4))
    st.save_layer(0, stats, {"a.q_proj": qt})
    got, qts = st.load_layer(0, "nvfp4", None)
    for name, s in stats.items():
        g = got[name]
        assert (g.tokens, g.amax, g.in_features) == (s.tokens, s.amax, s.in_features)
        assert (g.sq_sum is None) == (s.sq_sum is None)
        assert s.sq_sum is None or torch.equal(g.sq_sum, s.sq_sum)
    q = qts["a.q_proj"]
    assert q.format == get_format("nvfp4") and torch.equal(q.codes, qt.codes)
    assert torch.equal(q.scales.view(torch.uint8), qt.scales.view(torch.uint8))
    assert torch.equal(q.global_scale, qt.global_scale)
    assert st.resume_point() == 0  # no boundary saved yet
    st.boundary(1, torch.ones(3, 4, 8), force=True)
    assert CalibState(tmp_path / "s", "sig", 2).resume_point() == 1
    with pytest.raises(Exception, match="other flags"):
        CalibState(tmp_path / "s", "other", 2).resume_point()
