"""safetensors headers, shard writing and the index: the on-disk container of every dialect."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MxptqError
from .durable import event, pwrite_all, write_atomic
from .paths import member

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
METADATA = {"format": "pt"}  # what HF save_pretrained writes; some 4.x loaders require it
_MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_SIZES.get(self.dtype, 1)


_USIZE = 1 << 64  # safetensors' Rust reader holds sizes and offsets in a u64


def _strict_pairs(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _count(v: object) -> bool:
    """A JSON value safetensors reads as a usize: a non-negative integer below 2^64."""
    return type(v) is int and 0 <= v < _USIZE


def parse_header(raw: bytes, file_size: int, shard: str) -> dict[str, TensorInfo]:
    """The tensors of a safetensors header, checked at least as strictly as safetensors' own
    reader (safetensors/src/tensor.rs, `SafeTensors::read_metadata` and `Metadata::validate`):
    UTF-8 JSON object; `__metadata__` absent, null or a str -> str map; every other entry a
    known dtype, a shape of non-negative integers and two integer offsets; sorted by offset the
    entries start at 0, abut without gap or overlap, each spans exactly shape x dtype bytes, and
    the last ends at the end of the file. Beyond it: no duplicate keys, names that are valid
    UTF-8. `raw` is the whole header including its 8-byte length. Raises ValueError."""
    n = len(raw) - 8
    try:
        text = raw[8:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("header is not UTF-8") from e
    header = json.loads(text, object_pairs_hook=_strict_pairs, parse_constant=_no_constant)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ is not a map of strings to strings")
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        name.encode("utf-8")  # a lone surrogate escape raises UnicodeEncodeError
        if not isinstance(e, dict):
            raise ValueError(f"entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative "
                             "integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_count(o) for o in offs)):
            raise ValueError(f"tensor {name!r}: data_offsets {offs!r} are not two non-negative "
                             "integers")
        info = TensorInfo(name, shard, dtype, tuple(shape), 8 + n + offs[0])
        if info.nbytes >= _USIZE or offs[1] - offs[0] != info.nbytes:
            raise ValueError(f"tensor {name!r}: data_offsets {offs} do not hold {dtype} "
                             f"{shape} ({info.nbytes} bytes)")
        spans.append((offs[0], offs[1], info))
    spans.sort(key=lambda s: (s[0], s[1]))
    end = 0
    for b, t, info in spans:
        if b != end:
            raise ValueError(f"tensor {info.name!r}: data_offsets [{b}, {t}] "
                             f"{'overlap another tensor' if b < end else 'leave a gap'}")
        end = t
    if 8 + n + end != file_size:
        raise ValueError(f"tensor data ends at byte {8 + n + end} but the file has "
                         f"{file_size} bytes")
    return {info.name: info for _, _, info in spans}


def read_header_bytes(path: Path) -> tuple[bytes, int]:
    """The 8-byte length and the JSON header of a safetensors file, and the file's size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        body = f.read(n)
        if len(body) != n:
            raise ValueError("header cut short")
        return head + body, size


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading any tensor data."""
    try:
        raw, size = read_header_bytes(path)
        return parse_header(raw, size, path.name)
    except OSError as e:
        raise MxptqError(f"{path}: cannot read ({e.strerror or e})") from e
    except (ValueError, UnicodeError, RecursionError) as e:
        raise MxptqError(f"{path}: corrupt safetensors file ({e})") from e


TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
    "F64": torch.float64,
}


def read_tensor(fd: int, info: TensorInfo, pin: bool = False) -> torch.Tensor:
    """Read one tensor with positional reads (thread-safe on a shared fd) into fresh memory,
    pinned when it is headed for the GPU. Unlike a memory map, nothing of the file stays
    resident, so host memory is what the pipeline holds and no more."""
    if info.dtype not in TORCH_DTYPES:
        raise MxptqError(f"tensor {info.name}: unsupported dtype {info.dtype}")
    buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    view, off = memoryview(buf.numpy()), info.offset
    while view:
        n = os.preadv(fd, [view], off)
        if n <= 0:
            raise MxptqError(f"tensor {info.name}: {info.shard} is truncated")
        view, off = view[n:], off + n
    return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


_ST_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


# safetensors' Rust writer orders tensors by this dtype rank, descending, then by name, which
# keeps every tensor aligned to its element size; we use the same order and get its bytes.
_RANK = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
         "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


def _rank(dtype: str) -> int:
    return _RANK.index(dtype)


class ShardWriter:
    """Write a safetensors file whose tensors arrive one by one in any order.

    The layout (safetensors' own order) and the header are fixed up front from the planned
    names, dtypes and shapes, so each tensor is written at its offset as soon as it is computed
    and memory never holds a whole shard. Each tensor's SHA-256 is taken as it is written (the
    manifest that `inspect --verify` and `--resume` check). Written under a temporary name,
    fsynced and renamed by `close` once every tensor is in.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]]):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        order = sorted(specs, key=lambda n: (-_rank(specs[n][0]), n))
        header: dict = {"__metadata__": METADATA}
        self.slots: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        off = 0
        for n in order:
            dtype, shape = specs[n]
            size = TensorInfo(n, "", dtype, tuple(shape)).nbytes
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + size]}
            self.slots[n] = (dtype, tuple(shape), off, size)
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        head = struct.pack("<Q", len(raw)) + raw
        self.base, self.size = len(head), len(head) + off
        self.header_sha256 = hashlib.sha256(head).hexdigest()
        self.digests: dict[str, str] = {}
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(self.fd, head, 0, self.tmp)
        os.ftruncate(self.fd, self.size)
        self.missing = set(order)
        self._half = len(order) // 2
        event("shard-open")

    def put(self, name: str, t: torch.Tensor) -> None:
        dtype, shape, off, size = self.slots[name]
        if _ST_NAMES.get(t.dtype) != dtype or tuple(t.shape) != shape:
            raise RuntimeError(
                f"{name}: planned {dtype}{list(shape)}, got {t.dtype}{list(t.shape)}"
            )
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.digests[name] = hashlib.sha256(data).hexdigest()
        if size:
            pwrite_all(self.fd, data, self.base + off, self.tmp)
        self.missing.discard(name)
        if len(self.missing) == self._half:
            event("mid-shard")

    def close(self) -> dict:
        """Finish the file (every planned tensor must have arrived): fsync, rename, and return
        its record (size, header and per-tensor SHA-256). The folder's fsync is the caller's."""
        if self.missing:
            raise RuntimeError(f"{self.path.name}: {len(self.missing)} tensors never written")
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.tmp)) from e
        finally:
            os.close(self.fd)
            self.fd = -1
        event("shard-synced")
        os.replace(self.tmp, self.path)
        event("shard-renamed")
        return {"file": self.path.name, "size": self.size, "header_sha256": self.header_sha256,
                "tensors": dict(sorted(self.digests.items()))}

    def abort(self) -> None:
        """Drop the unfinished file; safe to call after close or twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(folder / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map, checked to be a map of tensor names to file names."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except OSError as e:
        raise MxptqError(f"{index}: cannot read ({e.strerror or e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise MxptqError(f"{index}: unreadable index ({type(e).__name__}: {e})") from e
    if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise MxptqError(f"{index}: weight_map is not a map of tensor names to file names")
    return wm


def list_shards(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint folder holds, from its index when there is one; every
    one inside the folder (mxptq.checkpoint.paths)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_weight_map(index)
        names = sorted(set(weight_map.values()))
        paths = [member(folder, n, str(index)) for n in names]
        missing = [n for n, p in zip(names, paths, strict=True) if not p.is_file()]
        if missing:
            raise MxptqError(f"{index}: names a missing shard {missing[0]}")
        return paths
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if files:
        return [member(folder, p.name, str(folder)) for p in files]
    bins = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if bins:
        raise MxptqError(
            f"{folder}: only PyTorch pickle weights ({bins[0]}); convert them to safetensors "
            "first, e.g. AutoModel.from_pretrained(dir).save_pretrained(new_dir)"
        )
    raise MxptqError(f"{folder}: no *.safetensors weights found")
