"""Inspect a quantized checkpoint: what it holds (format, bits, bytes, what stayed dense and why,
scale-code and ScaleSearch-offset histograms) and whether it is intact (index <-> files,
config <-> tensors, scale bytes, fused partners). Problems are collected as one line each so a
script or the CLI can report all of them rather than the first."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import engines
from .checkpoint.dialects import Dialect
from .checkpoint.manifest import verify_folder
from .checkpoint.report import REPORT_NAME
from .checkpoint.safetensors_io import TensorInfo, list_shards, read_header
from .errors import MxptqError
from .formats import Format
from .scales import absmax_code
from .validate import (
    Layer,
    check_config,
    check_tensors,
    checkpoint_tensors,
    dense_nan_problems,
    fused_scale_problems,
    global_problem,
    read_config,
    scale_problems,
    tensor_roles,
)

_FLOAT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FLOAT_NAMES = ("F32", "BF16", "F16")


@dataclass
class Inspection:
    folder: Path
    dialect: str = ""
    fmt: Format | None = None
    selector: str | None = None
    layers: list[Layer] = field(default_factory=list)
    dense_bytes: int = 0
    original_dtype: str | None = None
    original_bytes: int | None = None
    kept: dict[str, str] = field(default_factory=dict)  # dense Linear -> reason
    offsets: Counter | None = None
    problems: list[str] = field(default_factory=list)
    engines: list[engines.Verdict] = field(default_factory=list)  # per serving engine
    layout: engines.Layout | None = None  # what the engines see (module names)
    warnings: list[str] = field(default_factory=list)  # not a defect, but worth knowing

    @property
    def packed_bytes(self) -> int:
        return sum(lay.bytes for lay in self.layers)

    @property
    def weights(self) -> int:
        return sum(lay.shape[0] * lay.shape[1] for lay in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.packed_bytes / self.weights if self.weights else 0.0

    @property
    def histogram(self) -> Counter:
        return sum((lay.codes for lay in self.layers), Counter())

    @property
    def ratio(self) -> float | None:
        total = self.packed_bytes + self.dense_bytes
        return self.original_bytes / total if self.original_bytes and total else None

    def to_json(self, layers: bool = False) -> dict:
        f = self.fmt
        out = {
            "folder": str(self.folder),
            "ok": not self.problems,
            "problems": self.problems,
            "dialect": self.dialect,
            "format": f and f.name,
            "scale_codec": f and f.scale.name,
            "block_size": f and f.block_size,
            "global_scale": f and f.has_global,
            "selector": self.selector,
            "quantized_layers": len(self.layers),
            "quantized_weights": self.weights,
            "bits_per_weight": self.bits_per_weight,
            "packed_bytes": self.packed_bytes,
            "dense_bytes": self.dense_bytes,
            "original_dtype": self.original_dtype,
            "original_bytes": self.original_bytes,
            "compression_ratio": self.ratio,
            "kept_dense": self.kept,
            "scale_code_histogram": {str(c): n for c, n in sorted(self.histogram.items())},
            "offset_histogram": None if self.offsets is None
            else {str(o): n for o, n in sorted(self.offsets.items())},
            "engines": {v.engine: {"status": v.status, "why": v.why} for v in self.engines},
            "warnings": self.warnings,
        }
        if layers:
            out["layers"] = [
                {"name": lay.name, "shape": list(lay.shape), "bytes": lay.bytes,
                 "bits_per_weight": 8 * lay.bytes / (lay.shape[0] * lay.shape[1]),
                 "global_scale": lay.global_scale}
                for lay in self.layers
            ]
        return out


def _read_values(folder, tensors, layers, fmt, dialect, ins) -> None:
    """Scale codes (histogram and validity) and global scales of every usable layer."""
    handles = {}
    globals_ = {}
    for lay in layers:
        scale_name = f"{lay.name}.{dialect.scales_name}"
        for role, name in (("scales", scale_name), ("global", lay.global_name)):
            info = tensors.get(name or "")
            if info is None:
                continue
            if info.shard not in handles:
                handles[info.shard] = safe_open(str(folder / info.shard), "pt")
            t = handles[info.shard].get_tensor(info.name)
            if role == "scales":
                b = t.view(torch.uint8).flatten()
                ins.problems.extend(scale_problems(info.name, b, fmt))
                counts = torch.bincount(b.long(), minlength=256).tolist()
                lay.codes = Counter({c: n for c, n in enumerate(counts) if n})
            else:
                lay.global_scale = float(t.float().reshape(()))
                globals_[lay.name] = lay.global_scale
                if (p := global_problem(info.name, lay.global_scale)) is not None:
                    ins.problems.append(p)
    ins.problems.extend(fused_scale_problems(globals_))


def _original(folder, tensors, ins: Inspection, config: dict) -> None:
    """Bytes of the original checkpoint: the quantized weights at the original dtype."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype not in _FLOAT_SIZES:  # else the dtype of the dense float tensors
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        floats = Counter(names[i.dtype] for i in tensors.values() if i.dtype in names)
        dtype = floats.most_common(1)[0][0] if floats else None
    ins.original_dtype = dtype
    if dtype:
        ins.original_bytes = ins.dense_bytes + ins.weights * _FLOAT_SIZES[dtype]


def _offsets(original: Path, layers: list[Layer], q: dict, ins: Inspection) -> None:
    """ScaleSearch offsets: chosen code minus the abs-max code of the original weights."""
    where = {}
    for p in list_shards(Path(original)):
        for t in read_header(p):
            where[t] = p
    ins.offsets = Counter()
    for lay in layers:
        qt = q.get(lay.name)
        p = where.get(f"{lay.name}.weight")
        if qt is None or p is None:
            continue
        with safe_open(str(p), "pt") as f:
            w = f.get_tensor(f"{lay.name}.weight").float()
        if tuple(w.shape) != lay.shape:
            ins.problems.append(f"{lay.name}: shape {list(lay.shape)} but the original weight "
                                f"is {list(w.shape)}")
            continue
        fmt = qt.format
        bmax = w.view(w.shape[0], -1, fmt.block_size).abs().amax(-1)
        g = qt.global_scale if qt.global_scale is not None else torch.ones(())
        off = qt.scale_codes() - absmax_code(fmt, bmax, g.float())
        ins.offsets.update(Counter(off.flatten().tolist()))


def _layout(tensors: dict[str, TensorInfo], packed: set[str], dialect: Dialect,
            config: dict) -> engines.Layout:
    """The checkpoint as the engines see it (checkpoint/engines.py), from tensor names."""
    lay = engines.Layout(packed=set(packed), model_type=config.get("model_type") or "")
    inputs = {"input_global_scale", "input_scale"}
    for t, info in tensors.items():
        mod, _, leaf = t.rpartition(".")
        if leaf in inputs and mod in packed:
            lay.input_scaled.add(mod)
        elif info.dtype in _FLOAT_NAMES and len(info.shape) == 3 and mod.endswith(".experts"):
            lay.fused_experts.add(mod)
        elif leaf == "weight" and mod not in packed and len(info.shape) == 2 \
                and info.dtype in _FLOAT_NAMES:
            lay.dense.add(mod)
    lay.lm_head = {m for m in lay.packed | lay.dense if engines.is_lm_head(m)}
    return lay


def _w4a4(dialect: Dialect, qc: dict) -> bool:
    """Whether the config declares static activation scales (W4A4)."""
    if dialect.name == "modelopt":
        return str(qc.get("quant_algo", "")).upper() == "NVFP4"
    groups = (qc.get("config_groups") or {}).values()
    return any(g.get("input_activations") for g in groups)


def inspect_checkpoint(folder: str | Path, original: str | Path | None = None,
                       verify: bool = False) -> Inspection:
    """Summarize and check `folder`; `original` (the unquantized model) enables offsets;
    `verify` re-reads every byte against the manifest written with the checkpoint."""
    folder = Path(folder)
    ins = Inspection(folder)
    try:
        config = read_config(folder)
        qc = config.get("quantization_config")
        dialect, fmt, problems = check_config(qc)
    except MxptqError as e:
        ins.problems.append(str(e) if str(e).startswith("config.json") else f"config.json: {e}")
        return ins
    ins.problems.extend(problems)
    ins.dialect, ins.fmt = dialect.name, fmt
    tensors, problems = checkpoint_tensors(folder)
    ins.problems.extend(problems)
    layers, mods, problems = check_tensors(tensors, dialect, fmt, qc)
    ins.problems.extend(problems)
    ins.layers = layers
    packed = {f"{m}.{s}" for m in mods for s in tensor_roles(dialect, True).values()}
    ins.dense_bytes = sum(i.nbytes for t, i in tensors.items() if t not in packed)
    _read_values(folder, tensors, layers, fmt, dialect, ins)
    ins.problems.extend(dense_nan_problems(folder, tensors, packed))
    _original(folder, tensors, ins, config)
    ins.layout = layout = _layout(tensors, set(mods), dialect, config)
    ins.engines = engines.verdicts(dialect.name, fmt, qc, layout, _w4a4(dialect, qc))
    if dialect.name in ("modelopt", "native"):
        ins.warnings.append(
            f"transformers loads this {dialect.name} checkpoint only with mxptq imported "
            "(mxptq.load, or `import mxptq` before from_pretrained); without it, it refuses "
            + ("the config (no quant_method)" if dialect.name == "native" else
               "with a size-mismatch RuntimeError (transformers has no ModelOpt loader)"))
    report = folder / REPORT_NAME
    try:
        rep = json.loads(report.read_text()) if report.is_file() else {}
    except ValueError:
        rep = {}
        ins.problems.append(f"{REPORT_NAME}: not valid JSON")
    rep = rep if isinstance(rep, dict) else {}
    ins.selector = rep.get("scale") or qc.get("scale")
    ignore = [m for m in qc.get("ignore") or [] if isinstance(m, str)] \
        if isinstance(qc.get("ignore"), list) else []
    kept = rep.get("kept")
    if not isinstance(kept, dict):
        kept = {f"{m}.weight": "listed in quantization_config ignore" for m in ignore}
    ins.kept = {k: v for k, v in kept.items() if v != "not a Linear weight"}
    if verify:
        ins.problems.extend(verify_folder(folder))
    if original is not None and not ins.problems:
        from .checkpoint.reader import read_checkpoint

        _offsets(Path(original), layers, read_checkpoint(folder), ins)
    return ins
