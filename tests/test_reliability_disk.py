"""A full disk (a write wrapper that raises ENOSPC after N bytes, at points from the first shard
to the manifest) ends in one error line naming the file, keeps the finished shards, and --resume
then writes the same bytes as an uninterrupted run; the input is never modified."""

from __future__ import annotations

import errno
import os

import pytest
from reliability_helpers import (
    cli,
    digest,
    one_error,
    output_bytes,
    same_output,
    siblings,
    tiny_llama,
)

import mxptq.checkpoint.durable as durable
import mxptq.checkpoint.safetensors_io as sio
from mxptq.outdir import partial_dir

ARGS = ["--scale", "absmax"]


def _limit(monkeypatch, budget: list[int], real=durable.pwrite_all) -> list[int]:
    """Every output write goes through pwrite_all: count its bytes, fail past the budget."""
    written = [0]

    def pwrite_all(fd, data, offset, path):
        n = memoryview(data).nbytes
        if budget[0] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        budget[0] -= n
        written[0] += n
        real(fd, data, offset, path)

    monkeypatch.setattr(durable, "pwrite_all", pwrite_all)
    monkeypatch.setattr(sio, "pwrite_all", pwrite_all)
    return written


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("disk") / "src")


@pytest.mark.slow
def test_full_disk_stays_resumable(model, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    with monkeypatch.context() as m:
        total = _limit(m, [1 << 62])
        code, err, _ = cli("quantize", "--model", model, "--out", ref, *ARGS)
        assert code == 0, err
    want, before = output_bytes(ref), digest(model)
    tried = 0
    for frac in (0.0, 0.02, 0.2, 0.45, 0.7, 0.9, 0.97, 0.999):
        out = tmp_path / f"o{frac}"
        with monkeypatch.context() as m:
            _limit(m, [int(total[0] * frac)])
            code, err, _ = cli("quantize", "--model", model, "--out", out, *ARGS)
        line = one_error(code, err, "No space left on device")
        if partial_dir(out).exists():
            assert "--resume" in line, line
        assert not out.exists()
        code, err, _ = cli("quantize", "--model", model, "--out", out, *ARGS, "--resume")
        assert code == 0, (frac, err)
        assert same_output(output_bytes(out), want) is None, frac
        assert siblings(out) == []
        assert digest(model) == before
        tried += 1
    assert tried == 8
