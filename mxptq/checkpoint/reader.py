"""Read any checkpoint mxptq writes back into QuantizedTensors, one per quantized Linear."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import MxptqError
from ..formats import Format
from ..tensor import QuantizedTensor
from .dialects import dialect_of_config, get_dialect
from .safetensors_io import list_shards


def checkpoint_format(folder: Path) -> tuple[str, Format]:
    """(dialect name, Format) from config.json's quantization_config."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not qc:
        raise MxptqError(f"{folder}: config.json has no quantization_config")
    d = dialect_of_config(qc)
    return d.name, d.format_from_config(qc)


def read_checkpoint(folder: str | Path) -> dict[str, QuantizedTensor]:
    """Every quantized Linear of the checkpoint as {module name: QuantizedTensor} (on CPU)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    dialect = dialect_of_config(cfg.get("quantization_config") or {})
    fmt = dialect.format_from_config(cfg["quantization_config"])
    handles = {p.name: safe_open(str(p), "pt") for p in list_shards(folder)}
    where = {k: h for h in handles.values() for k in h.keys()}  # noqa: SIM118 - safe_open has no __iter__

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise MxptqError(f"{folder}: tensor {name} is missing")
        return where[name].get_tensor(name)

    marker = f".{dialect.marker}"
    modules = [k[: -len(marker)] for k in where if k.endswith(marker)]
    return {m: dialect.read(m, get, fmt) for m in sorted(modules)}


def read_dense(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors kept dense, by name: everything but the packed tensors of the quantized
    Linears and their W4A4 input scales."""
    folder = Path(folder)
    q = read_checkpoint(folder)
    name, fmt = checkpoint_format(folder)
    dialect = get_dialect(name)
    taken = {t for m, qt in q.items()
             for t in (*dialect.specs(m, fmt, *qt.shape), *dialect.input_specs(m))}
    out = {}
    for p in list_shards(folder):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                if k not in taken:
                    out[k] = f.get_tensor(k)
    return out
