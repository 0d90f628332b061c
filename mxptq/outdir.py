"""The output folder's life cycle: one run at a time per --out (a lock), a hidden partial folder
that holds finished shards and a checksummed record of each, and the decision, before any heavy
work, between starting, resuming, refusing and "already finished".

Beside `--out X` (all hidden): `.X.mxptq-lock` while a run holds X, `.X.mxptq-partial/` while
a run writes (with `.mxptq-state.json` and `.mxptq-records/<shard>.json` inside), and
`.X.mxptq-old/` for the moment an --overwrite swaps a finished folder for the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint.durable import event, fsync_dir, write_atomic
from .checkpoint.manifest import read_manifest, verify_shard
from .errors import MxptqError

STATE_NAME = ".mxptq-state.json"
RECORDS = ".mxptq-records"
CALIB_STATE_DIR = ".mxptq-calibration"  # calibration's resumable state (calibration/state.py)
STATE_VERSION = 2


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.mxptq-partial"


def old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.mxptq-old"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.mxptq-lock"


class OutputLock:
    """An exclusive flock on `.X.mxptq-lock` for as long as a run uses --out X. The file holds
    the holder's pid, host, start time and command for the refusal message. The kernel drops
    the lock when the process dies, even by SIGKILL, so a stale file never blocks a new run.
    flock works across processes of one host (and on NFS, where Linux maps it to fcntl locks).
    Re-entrant within a process: `mxptq quantize` holds it from before calibration, and the
    pipeline takes it again."""

    _held: dict[Path, int] = {}  # lock file -> nesting depth in this process

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, lock_path(out), -1

    def __enter__(self) -> OutputLock:
        if self.path in OutputLock._held:
            OutputLock._held[self.path] += 1
            return self
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MxptqError(f"--out {self.out}: cannot write there ({e.strerror or e})") from e
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise MxptqError(f"--out {self.out}: cannot write there ({e.strerror or e})") \
                    from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise MxptqError(
                    f"--out {self.out} is in use by another mxptq run ({holder}); wait for it to "
                    "finish or choose another --out"
                ) from None
            # the holder before us may have removed the file after we opened it: retry then
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        OutputLock._held[self.path] = 1
        return self

    def __exit__(self, *exc) -> None:
        OutputLock._held[self.path] -= 1
        if OutputLock._held[self.path] == 0:
            del OutputLock._held[self.path]
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: a waiting run then retries
            os.close(self.fd)
            self.fd = -1


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _sealed(body: dict) -> bytes:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"sha256": hashlib.sha256(canon.encode()).hexdigest(), "body": body},
                      sort_keys=True).encode()


def _unseal(path: Path) -> dict:
    """The body of a checksummed JSON file; ValueError when it is damaged."""
    outer = json.loads(path.read_bytes())
    body = outer["body"]
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(canon.encode()).hexdigest() != outer["sha256"]:
        raise ValueError("checksum mismatch")
    return body


def save_record(tmp: Path, shard: str, record: dict) -> None:
    """Record a finished output shard (after its rename): what --resume trusts, once checked."""
    (tmp / RECORDS).mkdir(exist_ok=True)
    write_atomic(tmp / RECORDS / f"{record['file']}.json", _sealed(dict(record, shard=shard)))


@dataclass
class Prepared:
    """What a run starts from."""

    tmp: Path
    done: dict[str, dict] = field(default_factory=dict)  # input shard -> record
    notes: list[str] = field(default_factory=list)
    finished: bool = False  # --out already holds this very checkpoint
    complete: bool = False  # the partial folder is whole; only its move into place is left


def _non_empty(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def _signature_of(folder: Path) -> str | None:
    """The run signature in a finished folder's manifest, if it has a readable one."""
    try:
        return read_manifest(folder).get("signature")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _records(tmp: Path) -> list[dict]:
    out = []
    for p in sorted((tmp / RECORDS).glob("*.json")) if (tmp / RECORDS).is_dir() else []:
        try:
            out.append(_unseal(p))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _start(out: Path, sig: str, overwrite: bool, n_shards: int) -> None:
    """A fresh partial folder holding only the run's state (removed again if that fails)."""
    tmp = partial_dir(out)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp / STATE_NAME, _sealed({
            "version": STATE_VERSION, "signature": sig, "overwrite": overwrite,
            "shards": n_shards, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MxptqError(f"--out {out}: cannot write there ({e.strerror or e})") from e


def _clear(tmp: Path, keep: set[str]) -> None:
    """Remove everything in the partial folder but `keep` (and the state, calibration's
    included): leftovers of an interrupted shard or finalize, redone by this run."""
    for p in tmp.iterdir():
        if p.name in keep or p.name in (STATE_NAME, RECORDS, CALIB_STATE_DIR):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_output(out: Path, overwrite: bool, resume: bool, sig: str,
                   names: dict[str, str]) -> Prepared:
    """Decide how this run starts (the lock is held): refuse, start, resume or report done.
    `names` maps input shards to output files."""
    if out.exists() and not out.is_dir():
        raise MxptqError(f"--out {out}: exists and is not a folder")
    tmp = partial_dir(out)
    if not tmp.exists() and old_dir(out).exists() and _signature_of(out) is not None:
        shutil.rmtree(old_dir(out))  # left by an --overwrite killed after its final rename
    if not resume:
        if tmp.exists():
            if not overwrite:
                n = len(_records(tmp))
                raise MxptqError(
                    f"--out {out}: an interrupted run left {n} of {len(names)} shards in {tmp}; "
                    "pass --resume to continue it, or --overwrite to discard it and start over"
                )
            shutil.rmtree(tmp)
        if _non_empty(out) and not overwrite:
            same = _signature_of(out) == sig
            raise MxptqError(
                f"--out {out}: already holds this checkpoint (same flags and input); pass "
                "--overwrite to redo it" if same else
                f"--out {out}: folder is not empty (pass --overwrite to replace it)"
            )
        _start(out, sig, overwrite, len(names))
        return Prepared(tmp)
    if not tmp.exists():
        found = _signature_of(out)
        if found == sig:
            return Prepared(tmp, finished=True)
        if found is not None:
            raise MxptqError(f"--resume: {out} holds a finished checkpoint of another run (other "
                             "flags or input); drop --resume and pass --overwrite to replace it")
        if _non_empty(out) and not overwrite:
            raise MxptqError(f"--resume: no interrupted run for --out {out}, and the folder is "
                             "not empty (pass --overwrite to replace it)")
        _start(out, sig, overwrite, len(names))
        return Prepared(tmp, notes=[f"no interrupted run for --out {out}: starting a new one"])
    try:
        state = _unseal(tmp / STATE_NAME) if (tmp / STATE_NAME).exists() else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MxptqError(
            f"--resume: the state file {tmp / STATE_NAME} is damaged ({type(e).__name__}: {e}); "
            "drop --resume and pass --overwrite to discard the partial output and start over"
        ) from e
    if state is None:
        if _signature_of(tmp) == sig:  # finalize ran to its last step before the move
            if _non_empty(out) and not overwrite:
                raise MxptqError(f"--out {out}: folder is not empty (pass --overwrite to "
                                 "replace it)")
            return Prepared(tmp, complete=True)
        _clear(tmp, set())
        shutil.rmtree(tmp / RECORDS, ignore_errors=True)
        _start(out, sig, overwrite, len(names))
        return Prepared(tmp, notes=[f"{tmp} recorded no finished shard: starting over"])
    if state.get("version") != STATE_VERSION or state.get("signature") != sig:
        raise MxptqError(f"--resume: {tmp} holds a run with other flags or input; drop --resume "
                         "and pass --overwrite to start over")
    if _non_empty(out) and not (overwrite or state.get("overwrite")):
        raise MxptqError(f"--out {out}: folder is not empty (pass --overwrite to replace it)")
    prep = Prepared(tmp)
    for rec in _records(tmp):
        shard = rec.get("shard")
        if names.get(shard) != rec.get("file"):
            continue
        problem = verify_shard(tmp / rec["file"], rec)
        if problem:
            prep.notes.append(f"finished shard {rec['file']} failed its check ({problem}): "
                              "redoing it")
            (tmp / RECORDS / f"{rec['file']}.json").unlink(missing_ok=True)
            continue
        prep.done[shard] = rec
    _clear(tmp, {r["file"] for r in prep.done.values()})
    fsync_dir(tmp)
    return prep


def drop_state(tmp: Path) -> None:
    """The partial folder is whole (its manifest written): remove what only a resume needs."""
    (tmp / STATE_NAME).unlink(missing_ok=True)
    shutil.rmtree(tmp / RECORDS, ignore_errors=True)
    shutil.rmtree(tmp / CALIB_STATE_DIR, ignore_errors=True)
    fsync_dir(tmp)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the whole partial folder to --out, swapping out an existing folder (--overwrite).
    A crash between the two renames leaves the old folder hidden beside --out and the new one
    whole in the partial folder; --resume then finishes the move."""
    old = old_dir(out)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        event("finalize-old-moved")
    os.replace(tmp, out)
    fsync_dir(out.parent)
    event("finalize-renamed")
    shutil.rmtree(old, ignore_errors=True)

