"""Every byte mxptq writes into an output folder goes through here: positional writes that finish
or raise, files replaced atomically (temporary name, fsync, rename, directory fsync), and the
named event points at which the reliability tests kill a run.

A power cut or SIGKILL can then leave an output file either absent, or complete under its
temporary name, or complete under its final name; never a file that is shorter than it claims.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

# Test hook: MXPTQ_TEST_KILL_AT="EVENT[#N][@ACTION]" sends ACTION (a signal name such as SIGKILL,
# SIGINT or SIGTERM, default SIGKILL; or "raise" for an OSError) to this process the Nth time
# (default 1st) EVENT happens. MXPTQ_TEST_EVENTS=FILE appends every event name to FILE, which is
# how the tests enumerate the events of a run. Both are read at each event: unset, an event costs
# one environment lookup.
KILL_ENV = "MXPTQ_TEST_KILL_AT"
EVENTS_ENV = "MXPTQ_TEST_EVENTS"
_seen: dict[str, int] = {}


def event(name: str) -> None:
    """Mark a point between two durable steps of a run (see KILL_ENV)."""
    log, spec = os.environ.get(EVENTS_ENV), os.environ.get(KILL_ENV)
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    if not spec:
        return
    _seen[name] = _seen.get(name, 0) + 1
    target, _, action = spec.partition("@")
    want, _, nth = target.partition("#")
    if want != name or _seen[name] != int(nth or 1):
        return
    action = action or "SIGKILL"
    if action == "raise":
        raise OSError(f"{KILL_ENV}={spec}: simulated failure")
    os.kill(os.getpid(), getattr(signal, action))


def reset_events() -> None:
    """Forget event counts (the in-process tests run several quantizations per process)."""
    _seen.clear()


def pwrite_all(fd: int, data, offset: int, path: Path | str) -> None:
    """Write all of `data` at `offset`; an OSError names `path` (os.pwrite's does not)."""
    view = memoryview(data).cast("B")
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (new names, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, data, 0, tmp)
        os.fsync(fd)
    finally:
        os.close(fd)
    event(f"write:{path.name}")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def copy_atomic(src: Path, dst: Path, chunk: int = 1 << 24) -> None:
    """Copy the bytes of `src` (a regular file) to `dst` atomically, with default permissions."""
    tmp = dst.with_name(dst.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with open(src, "rb") as f:
            off = 0
            while block := f.read(chunk):
                pwrite_all(fd, block, off, tmp)
                off += len(block)
        os.fsync(fd)
    finally:
        os.close(fd)
    event(f"copy:{dst.name}")
    os.replace(tmp, dst)
