"""`mxptq_manifest.json`: the SHA-256 of every byte mxptq wrote into an output folder, taken while
writing (each tensor as it is put, each header, each other file), and the run's signature.

`inspect --verify` re-reads every byte against it and names the first tensor that differs;
`--resume` checks each finished shard the same way before trusting it; and the signature tells a
rerun whether a finished folder already holds what it would write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .durable import write_atomic
from .report import REPORT_NAME
from .safetensors_io import parse_header, read_header_bytes

MANIFEST_NAME = "mxptq_manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 24


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, signature: str, shards: list[dict]) -> None:
    """The manifest of `folder`: the shard records (size, header and tensor SHA-256) and the
    size and SHA-256 of every other file, except hidden entries, the manifest itself and the
    report (timings differ from run to run; the manifest of a resumed run is byte-identical
    to an uninterrupted one's)."""
    names = {r["file"] for r in shards} | {REPORT_NAME}
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or rel.split("/")[0].startswith(".") or rel == MANIFEST_NAME \
                or rel in names:
            continue
        files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {
        "version": MANIFEST_VERSION,
        "hash": "sha256",
        "signature": signature,
        "shards": {r["file"]: {"size": r["size"], "header_sha256": r["header_sha256"],
                               "tensors": r["tensors"]} for r in sorted(shards,
                                                                        key=lambda r: r["file"])},
        "files": files,
    }
    write_atomic(folder / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    m = json.loads((folder / MANIFEST_NAME).read_text())
    if not isinstance(m, dict) or not isinstance(m.get("shards"), dict) \
            or not isinstance(m.get("files"), dict):
        raise ValueError(f"{MANIFEST_NAME} is not an mxptq manifest")
    return m


def _tensor_sha256(fd: int, offset: int, size: int) -> str:
    h = hashlib.sha256()
    while size > 0:
        block = os.pread(fd, min(size, _CHUNK), offset)
        if not block:
            break  # short file: the digest then differs
        h.update(block)
        offset, size = offset + len(block), size - len(block)
    return h.hexdigest()


def verify_shard(path: Path, record: dict) -> str | None:
    """None when the file holds exactly the recorded bytes, else what differs first (the
    header, then tensors in file order)."""
    try:
        size = path.stat().st_size
        if size != record["size"]:
            return f"{size} bytes, {record['size']} recorded"
        raw, _ = read_header_bytes(path)
        if hashlib.sha256(raw).hexdigest() != record["header_sha256"]:
            return "the header differs"
        infos = sorted(parse_header(raw, size, path.name).values(), key=lambda i: i.offset)
        want = record["tensors"]
        if {i.name for i in infos} != set(want):
            return "the tensor names differ"
        with open(path, "rb") as f:
            for info in infos:
                if _tensor_sha256(f.fileno(), info.offset, info.nbytes) != want[info.name]:
                    return f"tensor {info.name} differs"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e})"
    return None


def verify_folder(folder: Path) -> list[str]:
    """Problems found re-reading every byte of `folder` against its manifest (one per file)."""
    try:
        m = read_manifest(folder)
    except FileNotFoundError:
        return [f"no {MANIFEST_NAME}: --verify needs a checkpoint written by mxptq"]
    except (OSError, ValueError) as e:
        return [f"{MANIFEST_NAME}: unreadable ({e})"]
    problems = []
    for name, rec in m["shards"].items():
        p = folder / name
        if not p.is_file():
            problems.append(f"--verify: {name} is missing")
        elif (why := verify_shard(p, rec)) is not None:
            problems.append(f"--verify: {name}: {why}")
    for name, rec in m["files"].items():
        p = folder / name
        try:
            ok = p.stat().st_size == rec["size"] and file_sha256(p) == rec["sha256"]
        except OSError:
            problems.append(f"--verify: {name} is missing")
            continue
        if not ok:
            problems.append(f"--verify: {name} differs from the manifest")
    listed = set(m["shards"]) | set(m["files"]) | {MANIFEST_NAME, REPORT_NAME}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.split("/")[0].startswith(".") and rel not in listed:
            problems.append(f"--verify: {rel} is not in the manifest")
    return problems
