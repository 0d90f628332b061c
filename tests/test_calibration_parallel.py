"""Calibration batches spread over ranks (gloo, CPU processes): every rank ends with the
statistics and layer outputs of one process, bit for bit, while running only its own batches;
with sequential GPTQ-style callbacks too."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import make

from mxptq.calibration import CalibOptions, calibrate, quantize_layer
from mxptq.calibration.parallel import Group

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH, WINDOWS = 2, 7  # 4 batches, the last one short: uneven rounds on 2 and 3 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model, group: Group | None, sequential: bool) -> dict:
    """Every statistic and the hidden states at every layer boundary."""
    torch.manual_seed(0)
    ids = torch.randint(1, 96, (WINDOWS, 12))
    opts = CalibOptions(scale="search", importance="hessian", algo="gptq")
    seen = {"hidden": []}

    def on_layer(lr):
        if sequential:
            quantize_layer(lr, opts)

    def on_boundary(k, hidden):
        seen["hidden"].append(hidden.clone())

    res = calibrate(model, ids, hessian=True, blocks=16, batch_size=BATCH, on_layer=on_layer,
                    sequential=sequential, on_boundary=on_boundary, group=group)
    out = {"hidden": seen["hidden"]}
    for name, s in sorted(res.stats.items()):
        out[name] = (s.tokens, s.amax, s.borrowed,
                     *(None if t is None else t.cpu() for t in (s.sq_sum, s.xtx, s.bxx)))
    return out


def _count_batches(model_dir, group: Group | None) -> int:
    """Forward calls of layer 0's first Linear when the runner spreads the batches."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    calls = [0]
    lin = model.model.layers[0].self_attn.q_proj
    lin.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    ids = torch.randint(1, 96, (WINDOWS, 12))
    calibrate(model, ids, batch_size=BATCH, group=group)
    return calls[0]


def _worker(rank: int, world: int, port: int, model_dir: str, sequential: bool,
            out: str) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = Group(rank, world)
        got = _run(model_dir, group, sequential)
        n = _count_batches(model_dir, group)
        torch.save((rank, got, n), f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def _spread(model_dir, world: int, sequential: bool, out) -> list:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(model_dir), sequential,
                                               str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "hidden":
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in
                                                    zip(a[k], b[k], strict=True))
            continue
        for x, y in zip(a[k], b[k], strict=True):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), k
            else:
                assert x == y, k


@pytest.mark.parametrize("arch,world,sequential", [("llama", 2, True), ("qwen3_moe", 3, True),
                                                   ("qwen3_moe", 2, False)])
def test_ranks_end_with_the_statistics_of_one_process(tmp_path, arch, world, sequential):
    src = make(tmp_path / "m", arch)
    one = _run(str(src), None, sequential)
    assert any(v[4] is not None and v[5] is not None for k, v in one.items() if k != "hidden")
    results = _spread(src, world, sequential, tmp_path)
    batches = -(-WINDOWS // BATCH)
    for rank, got, n in results:
        _same(got, one)
        # each rank pushed only its own batches (round robin) through the layer
        assert n == len(range(rank, batches, world))
