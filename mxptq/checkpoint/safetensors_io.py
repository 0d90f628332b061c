"""safetensors headers, shard writing and the index: the on-disk container of every dialect."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MxptqError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
METADATA = {"format": "pt"}  # what HF save_pretrained writes; some 4.x loaders require it
_MAX_HEADER = 100 * 1024 * 1024

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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading any tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out: dict[str, TensorInfo] = {}
        end = 0
        for name, e in header.items():
            if name == "__metadata__":
                continue
            b, t = e["data_offsets"]
            shape = tuple(int(d) for d in e["shape"])
            info = TensorInfo(name, path.name, e["dtype"], shape, 8 + n + int(b))
            if e["dtype"] not in DTYPE_SIZES or t - b != info.nbytes or b < 0:
                raise ValueError(f"bad entry for {name}")
            end = max(end, t)
            out[name] = info
        if 8 + n + end > size:
            raise ValueError("tensor data runs past the end of the file")
        return out
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
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

    The layout (safetensors' own order) and the header are fixed up
    front from the planned names, dtypes and shapes, so each tensor is written at its offset as
    soon as it is computed and memory never holds a whole shard. Written under a temporary
    name and renamed by `close` once every tensor is in.
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
        self.base = 8 + len(raw)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.base + off)
        self.missing = set(order)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def put(self, name: str, t: torch.Tensor) -> None:
        dtype, shape, off, size = self.slots[name]
        if _ST_NAMES.get(t.dtype) != dtype or tuple(t.shape) != shape:
            raise RuntimeError(
                f"{name}: planned {dtype}{list(shape)}, got {t.dtype}{list(t.shape)}"
            )
        if size:
            self._pwrite(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                         self.base + off)
        self.missing.discard(name)

    def close(self) -> int:
        """Finish the file (every planned tensor must have arrived); returns its size."""
        os.close(self.fd)
        if self.missing:
            raise RuntimeError(f"{self.path.name}: {len(self.missing)} tensors never written")
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def list_shards(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint folder holds, from its index when there is one."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise MxptqError(f"{index}: unreadable index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MxptqError(f"{index}: names a missing shard {missing[0]}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if bins:
        raise MxptqError(
            f"{folder}: only PyTorch pickle weights ({bins[0]}); convert them to safetensors "
            "first, e.g. AutoModel.from_pretrained(dir).save_pretrained(new_dir)"
        )
    raise MxptqError(f"{folder}: no *.safetensors weights found")
