"""Kill matrix: a multi-shard run is killed at every event boundary it passes (SIGKILL: mid-shard,
after each fsync and rename, during each state and record write, at every step of finalize;
plus SIGINT and SIGTERM), then resumed; every resume is byte-identical to an uninterrupted run,
--out never looks finished before it is, and the input is never modified. Also: two runs into
one --out (a lock), and a rerun after an --overwrite killed between its two renames."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    Children,
    cli,
    digest,
    one_error,
    output_bytes,
    same_output,
    siblings,
    tiny_llama,
)

from mxptq.checkpoint.durable import EVENTS_ENV

ARGS = ["--scale", "absmax"]
FIGURES: dict = {}  # what docs/reliability.md quotes, printed at the end of the module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The model, an uninterrupted reference output and the events that run passes."""
    root = tmp_path_factory.mktemp("kill")
    src = tiny_llama(root / "src")
    assert len(list(src.glob("*.safetensors"))) >= 4
    ref = root / "ref"
    log = root / "events.txt"
    code, err, _ = cli("quantize", "--model", src, "--out", ref, *ARGS,
                       env={EVENTS_ENV: str(log)})
    assert code == 0, err
    events, seen = [], {}
    for name in log.read_text().split():
        seen[name] = seen.get(name, 0) + 1
        events.append(f"{name}#{seen[name]}")
    return {"root": root, "src": src, "ref": output_bytes(ref), "events": events,
            "input": digest(src), "children": Children()}


def _kill_and_resume(world, tag: str, kill_at: str, expect_exit: int, overwrite: bool = False):
    root, src = world["root"], world["src"]
    out = root / f"out-{tag}"
    extra = []
    if overwrite:  # an older, different checkpoint is being replaced
        code, err, _ = cli("quantize", "--model", src, "--out", out, "--scale", "4over6")
        assert code == 0, err
        extra = ["--overwrite"]
        before = output_bytes(out)
    log = root / f"log-{tag}.txt"
    argv = ["quantize", "--model", src, "--out", out, *ARGS, *extra]
    code = world["children"].run(argv, log, kill_at)
    assert code == expect_exit, (kill_at, code, log.read_text()[-3000:])
    if expect_exit > 0:  # SIGINT / SIGTERM: one line naming --resume
        one_error(code, log.read_text(), "interrupted", "--resume", exit_code=expect_exit)
    # --out is either absent, the old checkpoint untouched, or the whole new one
    if out.exists():
        now = output_bytes(out)
        assert now == world["ref"] or (overwrite and now == before), kill_at
    code, err, _ = cli(*argv, "--resume")
    assert code == 0, (kill_at, err)
    assert same_output(output_bytes(out), world["ref"]) is None, \
        (kill_at, same_output(output_bytes(out), world["ref"]))
    assert siblings(out) == [], (kill_at, siblings(out))
    assert digest(src) == world["input"], kill_at


@pytest.mark.slow
def test_sigkill_at_every_event_boundary(world):
    points = world["events"]
    assert len(points) >= 30
    for i, ev in enumerate(points):
        _kill_and_resume(world, f"k{i}", f"{ev}@SIGKILL", -signal.SIGKILL)
    FIGURES["sigkill points"] = len(points)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_sigint_and_sigterm(world, sig, code):
    points = [p for p in world["events"] if p.startswith(("mid-shard#2", "shard-renamed#3",
                                                           "write:model-00001", "finalize-start"))]
    assert len(points) == 4
    for i, ev in enumerate(points):
        _kill_and_resume(world, f"{sig}{i}", f"{ev}@{sig}", code)
    FIGURES[f"{sig} points"] = len(points)


@pytest.mark.slow
@pytest.mark.parametrize("event", ["finalize-old-moved#1", "finalize-renamed#1",
                                   "write:mxptq_manifest.json#1", "shard-renamed#2"])
def test_sigkill_while_overwriting(world, event):
    _kill_and_resume(world, f"ow-{event}", f"{event}@SIGKILL", -signal.SIGKILL, overwrite=True)


def test_two_runs_into_one_out(world, tmp_path):
    """The second run is refused while the first holds --out (paused by SIGSTOP mid-run); the
    first then finishes alone and its output is the reference."""
    src, out = world["src"], tmp_path / "o"
    argv = ["quantize", "--model", src, "--out", out, *ARGS]
    first = world["children"].start(argv, tmp_path / "a.txt", "mid-shard#2@SIGSTOP")
    deadline = time.time() + 120
    while not (tmp_path / ".o.mxptq-lock").exists() or not list(
            (tmp_path / ".o.mxptq-partial").glob("*.tmp")):
        assert time.time() < deadline and first.is_alive(), (tmp_path / "a.txt").read_text()
        time.sleep(0.05)
    time.sleep(0.3)  # the child stops itself at the event
    try:
        for other in (ARGS, ["--format", "mxfp4"]):
            code, err, _ = cli("quantize", "--model", src, "--out", out, *other, "--overwrite")
            one_error(code, err, "in use by another mxptq run", f"pid {first.pid}")
            code, err, _ = cli("quantize", "--model", src, "--out", out, *other, "--resume")
            one_error(code, err, "in use by another mxptq run")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.join(120)
    assert first.exitcode == 0, (tmp_path / "a.txt").read_text()
    assert output_bytes(out) == world["ref"]
    assert siblings(out) == []
    code, err, _ = cli(*argv)  # and the lock is gone with its holder
    one_error(code, err, "already holds this checkpoint")


def test_zz_figures(world):
    """Print the figures docs/reliability.md quotes (run with -s to see them)."""
    FIGURES["events in a 4-shard run"] = len(world["events"])
    print(json.dumps(FIGURES))
    assert Path(world["src"]).is_dir()
