"""safetensors headers, shard writing and the index: the on-disk container of every dialect."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file

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


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with plain file reads into fresh memory. Unlike a memory map, nothing
    of the file stays resident, so host memory is what the pipeline holds and no more."""
    if info.dtype not in TORCH_DTYPES:
        raise MxptqError(f"tensor {info.name}: unsupported dtype {info.dtype}")
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    if info.nbytes and f.readinto(memoryview(buf.numpy())) != info.nbytes:
        raise MxptqError(f"tensor {info.name}: {info.shard} is truncated")
    return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write one shard atomically (temporary name, then rename); returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=METADATA)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path.stat().st_size


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
