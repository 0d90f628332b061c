"""`mxptq quantize --gpus 0,1,...|all`: the same command started once per GPU of this machine
through torch.distributed's elastic launcher (what `torchrun --standalone` runs), so that the
run is exactly the torchrun one (mxptq.distributed) without typing its command line."""

from __future__ import annotations

import logging
import os
import sys
import uuid

from .errors import MxptqError


def parse_gpus(value: str, available: int) -> list[int]:
    """`all`, or a comma-separated list of distinct GPU indices below `available`."""
    if available < 1:
        raise MxptqError("--gpus: no CUDA device is available (torch sees none)")
    if value.strip() == "all":
        return list(range(available))
    try:
        ids = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise MxptqError(f"--gpus {value!r}: expected a list such as 0,1,2 or all") from None
    if not ids or len(set(ids)) != len(ids) or any(not 0 <= i < available for i in ids):
        raise MxptqError(f"--gpus {value!r}: expected distinct indices of this machine's "
                         f"{available} GPU(s) (0-{available - 1}), or all")
    return ids


def without_gpus(argv: list[str]) -> list[str]:
    """The command line less its --gpus option: what every process runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def launch(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run `python -m mxptq ARGV` in `nproc` processes joined as one torch.distributed job
    (c10d rendezvous on a free local port); returns the exit status the ranks agreed on (their
    own error line was printed by rank 0)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.update(env or {})
    # one process per GPU: the host threads of each are few (reading, packing)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                       monitor_interval=0.1)
    try:
        elastic_launch(cfg, sys.executable)("-m", "mxptq", *argv)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0


def run_on_gpus(value: str, argv: list[str]) -> int | None:
    """`--gpus VALUE` for the command line `argv` (without the program name): the exit status
    of the launched job, or None when one GPU was named (the run continues in this process,
    on that GPU)."""
    import torch

    from .distributed import launched

    if launched():
        raise MxptqError("--gpus starts the processes itself: under torchrun, drop it (torchrun's "
                         "--nproc-per-node sets the processes)")
    ids = parse_gpus(value, torch.cuda.device_count())
    if len(ids) == 1:
        torch.cuda.set_device(ids[0])  # `cuda` from here on means that GPU
        return None
    return launch(len(ids), without_gpus(argv), {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))})
