"""Quantization over several processes (torchrun, gloo on the CPU) writes every byte a single
process writes, weight-only and with calibration (batches of windows and GPTQ split over the
ranks, GPTQ + importance); a failure in one rank stops them all with one error line; a run
interrupted on N ranks resumes on M."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from quant_helpers import quantize
from safetensors.torch import load_file, save_file
from tiny_models import calibration_text, make

from mxptq.checkpoint.dialects import get_dialect
from mxptq.checkpoint.durable import KILL_ENV
from mxptq.distributed import Dist, assign
from mxptq.errors import MxptqError
from mxptq.formats import get_format
from mxptq.launch import parse_gpus, without_gpus
from mxptq.outdir import RECORDS, partial_dir
from mxptq.pipeline import my_shards
from mxptq.plan import build_plan

pytestmark = pytest.mark.usefixtures("one_thread")
SHARD = "40KB"  # 12 input shards: every rank gets several, fused partners straddle shards


def torchrun(n: int, *args: str, env: dict | None = None,
             launcher: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node n -m mxptq quantize ... --device cpu` (a free
    port of its own), or the same through mxptq.launch (what --gpus runs), killed with its
    whole process group if it hangs."""
    argv = ["quantize", "--device", "cpu", *args]
    cmd = ([sys.executable, "-c", "import sys; from mxptq.launch import launch; "
            f"sys.exit(launch({n}, sys.argv[1:]))", *argv] if launcher else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={n}", "-m", "mxptq", *argv])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MXPTQ_DIST_TIMEOUT": "60", **(env or {})},
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun hung:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def checkpoint_bytes(folder):
    """Every file but the report (timings, memory)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name != "mxptq_report.json"}


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def failed_with(r: subprocess.CompletedProcess, code: int) -> bool:
    """torchrun itself exits 1 when a rank fails; its summary lists every rank's status."""
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)
    return r.returncode != 0 and codes and set(codes) == {str(code)}


def test_assign_balances_bytes_deterministically():
    sizes = [5, 1, 4, 2, 3, 3, 0]
    for world in (1, 2, 3, 8):
        parts = assign(sizes, world)
        assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
        assert all(p == sorted(p) for p in parts)
        loads = [sum(sizes[i] for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(sizes)
        assert parts == assign(sizes, world)
    assert assign(sizes, 2) == [[0, 1, 5, 6], [2, 3, 4]]  # 5+1+3+0 | 4+2+3 (largest first)


@pytest.mark.slow
@pytest.mark.parametrize("arch,ranks", [("llama", 2), ("qwen3_moe", 3)])
def test_ranks_write_the_bytes_of_one_process(tmp_path, arch, ranks):
    src = make(tmp_path / "src", arch, shard=SHARD)
    assert len(list(src.glob("*.safetensors"))) >= 2 * ranks
    one, many = tmp_path / "one", tmp_path / "many"
    quantize(src, one, "--device", "cpu")
    r = torchrun(ranks, "--model", str(src), "--out", str(many))
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_bytes(many) == checkpoint_bytes(one)
    rep1, repn = (json.loads((d / "mxptq_report.json").read_text()) for d in (one, many))
    assert repn["tensors"] == rep1["tensors"]
    assert not partial_dir(many).exists()


@pytest.mark.slow
def test_interrupted_on_three_ranks_resumes_on_two(tmp_path):
    src = make(tmp_path / "src", "llama", shard=SHARD)
    one, out = tmp_path / "one", tmp_path / "out"
    quantize(src, one, "--device", "cpu")
    args = ["--model", str(src), "--out", str(out)]
    r = torchrun(3, *args, env={KILL_ENV: "shard-recorded#2@raise"})  # every rank, 2nd shard
    assert failed_with(r, 2), r.stderr[-3000:]
    lines = errors(r.stderr)
    assert len(lines) == 1 and "--resume" in lines[0], r.stderr[-3000:]
    assert not out.exists()
    done = list((partial_dir(out) / RECORDS).glob("*.json"))
    assert 2 <= len(done) <= 6  # each rank kept what it finished before the stop
    r = torchrun(2, *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_bytes(out) == checkpoint_bytes(one)


@pytest.mark.slow
def test_bad_tensor_on_one_rank_stops_all_with_one_error_line(tmp_path):
    src = make(tmp_path / "src", "qwen3_moe", shard=SHARD)
    plan = build_plan(src, get_format("nvfp4"), "search", get_dialect("compressed-tensors"))
    todo = my_shards(plan, plan.shards, Dist(rank=1, world=2, local_rank=1, store=None))
    victim = next(p for p in todo if any(k.endswith("proj.weight") for k in load_file(p)))
    tensors = load_file(victim)
    name = next(k for k in tensors if k.endswith("proj.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = torch.nan
    save_file(tensors, victim, metadata={"format": "pt"})
    out = tmp_path / "out"
    r = torchrun(2, "--model", str(src), "--out", str(out), launcher=True)
    assert r.returncode == 2, r.stderr[-3000:]  # the launcher passes the ranks' status on
    assert errors(r.stderr) == r.stderr.strip().splitlines()[-1:]  # one line, nothing after
    assert name in r.stderr
    assert not out.exists() and not partial_dir(out).exists()


def test_gpus_option():
    assert parse_gpus("all", 4) == [0, 1, 2, 3]
    assert parse_gpus("2,0", 4) == [2, 0]
    for bad in ("0,0", "4", "-1", "a", ""):
        with pytest.raises(MxptqError, match="--gpus"):
            parse_gpus(bad, 4)
    with pytest.raises(MxptqError, match="no CUDA device"):
        parse_gpus("0", 0)
    assert without_gpus(["quantize", "--gpus", "0,1", "--out", "o", "--gpus=all"]) == [
        "quantize", "--out", "o"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpus_without_cuda_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from mxptq.cli import app

    r = CliRunner().invoke(app, ["quantize", "--model", str(tmp_path), "--out",
                                 str(tmp_path / "o"), "--gpus", "0,1"])
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: --gpus: no CUDA device is available (torch sees none)")


@pytest.mark.slow
@pytest.mark.parametrize("arch,ranks,importance", [("qwen3_moe", 2, "diag"),
                                                   ("llama", 3, "hessian")])
def test_calibrated_gptq_on_ranks_writes_the_bytes_of_one_process(tmp_path, arch, ranks,
                                                                  importance):
    """The batches of windows are spread over the ranks (5 windows, 2 per batch: uneven
    rounds), statistics and outputs exchanged; GPTQ of each layer is split over the ranks
    (fused sets, experts) and exchanged before the next layer."""
    src = make(tmp_path / "src", arch, shard=SHARD)
    calib = ["--calib", str(calibration_text(tmp_path / "calib.txt")), "--calib-samples", "5",
             "--calib-batch", "2", "--calib-seqlen", "32", "--algo", "gptq",
             "--importance", importance]
    one, many = tmp_path / "one", tmp_path / "many"
    quantize(src, one, "--device", "cpu", *calib)
    r = torchrun(ranks, "--model", str(src), "--out", str(many), *calib)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_bytes(many) == checkpoint_bytes(one)
    rep = json.loads((many / "mxptq_report.json").read_text())
    assert rep["calibration"]["gptq"] > 0 and rep["calibration"]["resumed_at_layer"] == 0


def test_progress_of_all_ranks_reaches_rank_0_and_a_failure_stops_the_others():
    """Two ranks on one in-memory store: rank 0's callback sees both ranks' tensors and
    bytes; once rank 1 posts a failure, rank 0's next tick raises it."""
    import time

    from torch.distributed import HashStore

    from mxptq.distributed import PeerFailed

    store = HashStore()
    r0, r1 = (Dist(rank=r, world=2, local_rank=r, store=store) for r in (0, 1))
    seen = [0, 0]

    def on_progress(n: int, b: int) -> None:
        seen[0] += n
        seen[1] += b

    with r0.show_progress(on_progress):
        t0, t1 = r0.ticker(), r1.ticker()
        t0(2, 100)
        t1(3, 1000)
        t1(1, 10)
        t0.flush()
        t1.flush()
        time.sleep(0.5)
    assert seen == [6, 1110]
    assert r0.share("start", lambda: {"done": 3}) == {"done": 3}
    assert r1.share("start", lambda: None) == {"done": 3}  # rank 0's value, not its own
    store.set("mxptq/error", json.dumps({"message": "bad tensor", "code": 2, "drop": True,
                                         "rank": 1}))
    with pytest.raises(PeerFailed, match="bad tensor"):
        time.sleep(0.25)
        t0(1, 1)


@pytest.mark.slow
def test_calibration_interrupted_in_one_process_resumes_on_two_ranks(tmp_path, monkeypatch):
    """The saved calibration state is one process's (every rank holds every output), so a run
    stopped after layer 0 in one process continues on 2 ranks to the same bytes."""
    from typer.testing import CliRunner

    from mxptq.calibration.state import STOP_ENV
    from mxptq.cli import app

    src = make(tmp_path / "src", "qwen3_moe", shard=SHARD)
    calib = ["--calib", str(calibration_text(tmp_path / "calib.txt")), "--calib-samples", "5",
             "--calib-batch", "2", "--calib-seqlen", "32", "--algo", "gptq",
             "--importance", "hessian"]
    one, out = tmp_path / "one", tmp_path / "out"
    quantize(src, one, "--device", "cpu", *calib)
    monkeypatch.setenv(STOP_ENV, "1")
    r = CliRunner().invoke(app, ["quantize", "--device", "cpu", "--model", str(src), "--out",
                                 str(out), *calib])
    assert r.exit_code == 2 and "--resume" in r.stderr, r.stderr
    monkeypatch.delenv(STOP_ENV)
    r = torchrun(2, "--model", str(src), "--out", str(out), *calib, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_bytes(out) == checkpoint_bytes(one)
    assert json.loads((out / "mxptq_report.json").read_text())["calibration"][
        "resumed_at_layer"] == 1


@pytest.mark.slow
def test_distributed_benchmark_runs_at_cpu_sizes(tmp_path):
    """`python -m mxptq.bench.distributed --tiny --counts 2`: both process counts write the
    same bytes, weight-only and with calibration + GPTQ + hessian, and the floor is measured."""
    res = tmp_path / "d.json"
    p = subprocess.run([sys.executable, "-m", "mxptq.bench.distributed", "--tiny", "--counts",
                        "2", "--dir", str(tmp_path / "w"), "--json-out", str(res)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(res.read_text())
    assert [r["processes"] for r in d["runs"]] == [1, 2]
    assert d["calibration"]["importance"] == "hessian" and d["calibration"]["batch"] == 2
    for r in d["runs"]:
        assert r["weight_identical"] and r["calib_identical"] and r["io_floor_s"] > 0
