"""Several processes on one job (`torchrun ... -m mxptq quantize`, or `mxptq quantize --gpus`):
which rank does what, and how the ranks agree.

Weight-only work is split by input shard, balanced by bytes. The ranks coordinate through the
key-value store that torch.distributed's rendezvous set up rather than through collectives: a
rank that finished its shards may wait hours for a slower one, longer than any collective's
timeout, and a rank that failed must stop the others at their next tensor, which a blocked
collective cannot. Rank 0 decides how the run starts (fresh, resume, refuse) and publishes it,
every rank adds its progress to shared counters, and the first failure is posted: every rank
stops at its next tensor, rank 0 prints the one error line, and all exit with its code."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

from .errors import MxptqError

_POLL = 0.02  # seconds between looks at the store while waiting
_TICK = 0.2  # seconds between a rank's progress flushes (and failure checks)
_STOP_WAIT = 120.0  # how long a failure waits for every rank to stop before exiting anyway
_K_FAILURES, _K_ERROR, _K_STOPPED, _K_RELEASED = ("mxptq/failures", "mxptq/error",
                                                  "mxptq/stopped", "mxptq/released")
_K_TENSORS, _K_BYTES = "mxptq/progress/tensors", "mxptq/progress/bytes"


class PeerFailed(MxptqError):
    """Another rank failed: this one stops; rank 0 reports the first failure."""

    def __init__(self, message: str, code: int, drop: bool):
        super().__init__(message)
        self.code, self.drop = code, drop


class DropPartial(MxptqError):
    """Bad input met while writing: like a single process, the run removes its partial
    folder, but only once every rank has stopped writing into it (rank 0 does it)."""


@dataclass
class Dist:
    """This process's place in the job and the job's shared store."""

    rank: int
    world: int
    local_rank: int
    store: object = field(repr=False)  # torch.distributed Store

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU (LOCAL_RANK) when the run is on CUDA."""
        if device.type != "cuda":
            return device
        n = torch.cuda.device_count()
        if self.local_rank >= n:
            raise MxptqError(f"rank {self.rank} has local rank {self.local_rank} but this "
                             f"machine shows {n} GPU(s): start at most {n} processes per node")
        return torch.device("cuda", self.local_rank)

    # --- waiting, with a failure elsewhere ending the wait -----------------------------------
    def check(self) -> None:
        """Raise PeerFailed when some rank has posted a failure."""
        if self.store.check([_K_ERROR]):
            e = json.loads(self.store.get(_K_ERROR))
            raise PeerFailed(e["message"], e["code"], e["drop"])

    def _wait(self, key: str) -> bytes:
        while not self.store.check([key]):
            self.check()
            time.sleep(_POLL)
        return self.store.get(key)

    def share(self, key: str, make: Callable[[], object]):
        """`make()` on rank 0, the same value on every rank."""
        if self.main:
            value = make()
            self.store.set(f"mxptq/share/{key}", pickle.dumps(value))
            return value
        return pickle.loads(self._wait(f"mxptq/share/{key}"))

    def gather(self, key: str, value) -> list | None:
        """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
        self.store.set(f"mxptq/gather/{key}/{self.rank}", pickle.dumps(value))
        if not self.main:
            return None
        return [pickle.loads(self._wait(f"mxptq/gather/{key}/{r}")) for r in range(self.world)]

    # --- progress --------------------------------------------------------------------------
    def ticker(self) -> Callable[[int, int], None]:
        """A per-tensor callback: adds to the job's counters (at most every _TICK seconds,
        and on the last call via `flush`) and stops this rank when another failed."""
        pending = [0, 0]
        last = [time.monotonic()]

        def flush() -> None:
            if pending[0] or pending[1]:
                self.store.add(_K_TENSORS, pending[0])
                self.store.add(_K_BYTES, pending[1])
                pending[:] = [0, 0]

        def tick(n_tensors: int, n_bytes: int) -> None:
            pending[0] += n_tensors
            pending[1] += n_bytes
            now = time.monotonic()
            if now - last[0] >= _TICK:
                last[0] = now
                flush()
                self.check()

        tick.flush = flush  # type: ignore[attr-defined]
        return tick

    @contextlib.contextmanager
    def show_progress(self, on_progress: Callable[[int, int], None] | None):
        """On rank 0, feed `on_progress` the whole job's progress from a watcher thread."""
        if not self.main or on_progress is None:
            yield
            return
        stop = threading.Event()
        seen = [0, 0]

        def poll() -> None:
            try:
                while True:
                    done = stop.wait(_TICK)
                    t, b = self.store.add(_K_TENSORS, 0), self.store.add(_K_BYTES, 0)
                    if t > seen[0] or b > seen[1]:
                        on_progress(t - seen[0], b - seen[1])
                        seen[:] = [t, b]
                    if done:
                        return
            except Exception:  # the store went away: the job is ending; the bar just stops
                return

        th = threading.Thread(target=poll, daemon=True, name="mxptq-progress")
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join(timeout=5)

    # --- ending ----------------------------------------------------------------------------
    def stop(self, message: str, code: int, drop: bool, partial: Path | None,
             own: bool) -> int:
        """End this rank after a failure (`own`: its own, else a peer's): post it if it is the
        first, wait (bounded) for every rank to stop; rank 0 then removes the partial folder
        when the failure asks for it and prints the first failure's line before it lets the
        others go (torchrun stops every process once one exits). Returns the exit status."""
        first = {"message": message, "code": code, "rank": self.rank}
        # from here on, torchrun's SIGTERM (sent once another rank exited) ends this rank with
        # the status the ranks agree on, not as killed by the signal
        with contextlib.suppress(ValueError):  # not the main thread: keep the default
            signal.signal(signal.SIGTERM, lambda *_: os._exit(first["code"]))
        try:
            if own and self.store.add(_K_FAILURES, 1) == 1:
                self.store.set(_K_ERROR, json.dumps(dict(first, drop=drop)))
            self.store.add(_K_STOPPED, 1)
            deadline = time.monotonic() + _STOP_WAIT
            while self.store.add(_K_STOPPED, 0) < self.world and time.monotonic() < deadline:
                time.sleep(_POLL)
            posted = self._wait_bounded(_K_ERROR, 5.0)
            if posted:
                first.update(json.loads(posted))
            if self.main:
                if first.get("drop") and partial is not None:
                    shutil.rmtree(partial, ignore_errors=True)
                _say(first["message"])
                self.store.set(_K_RELEASED, b"1")
            elif self._wait_bounded(_K_RELEASED, 30.0) is None and first["rank"] == self.rank:
                _say(first["message"])  # rank 0 is gone: the failing rank speaks
        except Exception:  # the store is gone (rank 0 ended): the failing rank speaks
            if own:
                _say(message)
        return first["code"]

    def _wait_bounded(self, key: str, seconds: float) -> bytes | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.store.check([key]):
                return self.store.get(key)
            time.sleep(_POLL)
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


_CURRENT: list[Dist] = []


def current() -> Dist | None:
    """The job this process belongs to, once `from_env` joined it."""
    return _CURRENT[0] if _CURRENT else None


def launched() -> bool:
    """Started by torchrun (or `--gpus`) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env() -> Dist | None:
    """Join the job torchrun described in the environment (None when this is the only
    process). Collectives go over NCCL for CUDA tensors and gloo for CPU tensors."""
    if not launched():
        return None
    if _CURRENT:
        return _CURRENT[0]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and tdist.is_nccl_available()
    if cuda and local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=float(os.environ.get("MXPTQ_DIST_TIMEOUT", "1800")))
    try:
        tdist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    except (RuntimeError, ValueError) as e:
        print(f"error: rank {rank}: cannot join the torch.distributed job ({e})",
              file=sys.stderr)
        sys.exit(2)
    d = Dist(rank, world, local, tdist.distributed_c10d._get_default_store())
    _CURRENT.append(d)
    return d


def assign(sizes: list[int], world: int) -> list[list[int]]:
    """Indices of `sizes` per rank: largest first to the least loaded rank (ties: plan order,
    lowest rank), each rank's list in plan order. Deterministic: every rank computes it."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += sizes[i]
        out[r].append(i)
    return [sorted(x) for x in out]
