"""Inspect a quantized checkpoint: what it holds (format, bits, bytes, what stayed dense and why,
scale-code and ScaleSearch-offset histograms) and whether it is intact (index <-> files,
config <-> tensors, scale bytes, fused partners). Problems are collected as one line each so a
script or the CLI can report all of them rather than the first."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import engines
from .checkpoint.dialects import Dialect, dialect_of_config
from .checkpoint.report import REPORT_NAME
from .checkpoint.safetensors_io import INDEX_NAME, TensorInfo, list_shards, read_header
from .errors import MxptqError
from .formats import E4M3, E8M0, Format
from .plan import FUSED_SETS, matches
from .scales import absmax_code

# Sets whose members can legitimately be absent (MLA without q LoRA has no q_a_proj).
_OPTIONAL_SETS = {("q_a_proj", "kv_a_proj_with_mqa")}
_FLOAT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FLOAT_NAMES = ("F32", "BF16", "F16")


@dataclass
class Layer:
    """One quantized Linear as stored."""

    name: str
    shape: tuple[int, int]  # [N, K] of the dense weight
    bytes: int  # codes + scales + global scale
    global_name: str | None  # its global scale tensor, if it has a usable one
    global_scale: float | None = None  # the stored value (ModelOpt: weight_scale_2 = 1/g)
    codes: Counter = field(default_factory=Counter)  # scale code -> blocks


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


def _shard_headers(folder: Path, ins: Inspection) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, checking the index against the files on the way."""
    files = {p.name for p in folder.glob("*.safetensors")}
    weight_map: dict[str, str] | None = None
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            ins.problems.append(f"{INDEX_NAME}: unreadable ({e})")
    elif len(files) > 1:
        ins.problems.append(f"{len(files)} safetensors files but no {INDEX_NAME}")
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name in sorted(files | set((weight_map or {}).values())):
        if name not in files:
            n = sum(1 for v in weight_map.values() if v == name)
            ins.problems.append(f"{INDEX_NAME}: shard {name} ({n} tensors) does not exist")
            continue
        try:
            headers[name] = read_header(folder / name)
        except MxptqError as e:
            ins.problems.append(str(e))
    tensors: dict[str, TensorInfo] = {}
    for shard, h in headers.items():
        for t, info in h.items():
            if t in tensors:
                ins.problems.append(f"tensor {t} is in both {tensors[t].shard} and {shard}")
            tensors[t] = info
            if weight_map is not None and t not in weight_map:
                ins.problems.append(f"tensor {t} in {shard} is not in {INDEX_NAME}")
            elif weight_map is not None and weight_map[t] != shard:
                ins.problems.append(f"tensor {t} is in {shard} but {INDEX_NAME} says "
                                    f"{weight_map[t]}")
    for t, shard in (weight_map or {}).items():
        if shard in headers and t not in headers[shard]:
            ins.problems.append(f"{INDEX_NAME}: tensor {t} is not in {shard}")
    if not tensors and not ins.problems:
        ins.problems.append("no safetensors weights found")
    return tensors


def _names(dialect: Dialect, has_global: bool) -> dict[str, str]:
    """Role -> tensor suffix for the dialect."""
    out = {"codes": dialect.codes_name, "scales": dialect.scales_name}
    if has_global or dialect.global_is_decode:  # ModelOpt always stores weight_scale_2
        out["global"] = dialect.global_name
    return out


def _quantized_modules(tensors: dict[str, TensorInfo], dialect: Dialect) -> list[str]:
    """Modules holding any packed tensor (a module missing some of them is still found). A
    dense ModelOpt-style `weight` is told from packed codes by its dtype."""
    mods = set()
    for t, info in tensors.items():
        mod, _, leaf = t.rpartition(".")
        if leaf in (dialect.scales_name, dialect.global_name) or (
                leaf == dialect.codes_name and (leaf != "weight" or info.dtype == "U8")):
            mods.add(mod)
    return sorted(mods)


def _check_layer(mod, tensors, fmt, dialect: Dialect, ins) -> Layer | None:
    """Names, dtypes and shapes of one quantized Linear against the format; None if unusable."""
    names = _names(dialect, fmt.has_global)
    infos = {}
    for role, suffix in names.items():
        info = tensors.get(f"{mod}.{suffix}")
        if info is None:
            ins.problems.append(f"{mod}: {mod}.{suffix} is missing")
        infos[role] = info
    if dialect.codes_name != "weight" and f"{mod}.weight" in tensors:
        ins.problems.append(f"{mod}: has a dense {mod}.weight next to its packed tensors")
    if "global" not in names and f"{mod}.{dialect.global_name}" in tensors:
        ins.problems.append(f"{mod}: {dialect.global_name} present but {fmt.name} has no global")
    want = {"codes": "U8", "scales": "F8_E4M3" if fmt.scale is E4M3 else "U8", "global": "F32"}
    bad = False
    for role, info in infos.items():
        if info is not None and info.dtype != want[role]:
            ins.problems.append(f"{info.name}: dtype {info.dtype}, expected {want[role]}")
            bad = True
    codes, scales, g = infos["codes"], infos["scales"], infos.get("global")
    if codes is None or scales is None or bad:
        return None
    if len(codes.shape) != 2 or len(scales.shape) != 2:
        ins.problems.append(f"{mod}: codes {list(codes.shape)} / scales {list(scales.shape)} "
                            "are not 2-D")
        return None
    n, k = codes.shape[0], codes.shape[1] * 2
    if scales.shape != (n, k // fmt.block_size) or k % fmt.block_size:
        ins.problems.append(
            f"{mod}: scales shape {list(scales.shape)} does not fit codes {list(codes.shape)} "
            f"(expected [{n}, {k // fmt.block_size}] for K={k}, block {fmt.block_size})")
        return None
    g_shape = dialect.global_shape
    if g is not None and g.shape != g_shape:
        ins.problems.append(f"{g.name}: shape {list(g.shape)}, expected {list(g_shape)}")
        g = None
    nbytes = sum(i.nbytes for i in infos.values() if i is not None)
    return Layer(mod, (n, k), nbytes, None if g is None else g.name)


def _bad_scale_bytes(b: torch.Tensor, fmt: Format) -> list[str]:
    """Scale bytes no encoder writes: NaN, a sign bit, codes above the codec's maximum."""
    out = []
    if fmt.scale is E4M3:
        nan = (b & 0x7F) == 0x7F
        neg = ((b & 0x80) != 0) & ~nan
        if nan.any():
            out.append(f"{int(nan.sum())} NaN scale bytes (0x7F/0xFF)")
        if neg.any():
            out.append(f"{int(neg.sum())} negative scale bytes (sign bit set)")
    elif fmt.scale is E8M0:
        if (b == 0xFF).any():
            out.append(f"{int((b == 0xFF).sum())} NaN scale bytes (0xFF)")
    else:
        high = b.int() > fmt.scale.max_code
        if high.any():
            out.append(f"{int(high.sum())} scale codes above {fmt.scale.name} max "
                       f"{fmt.scale.max_code}")
    return out


def _read_values(folder, tensors, layers, fmt, dialect: Dialect, ins) -> None:
    """Scale codes (histogram and validity) and global scales of every usable layer."""
    handles = {}
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
                for msg in _bad_scale_bytes(b, fmt):
                    ins.problems.append(f"{info.name}: {msg}")
                counts = torch.bincount(b.long(), minlength=256).tolist()
                lay.codes = Counter({c: n for c, n in enumerate(counts) if n})
            else:
                lay.global_scale = float(t.float().reshape(()))
                if not (lay.global_scale > 0 and lay.global_scale != float("inf")):
                    ins.problems.append(f"{info.name}: global scale {lay.global_scale} is not "
                                        "a positive finite number")


def _check_fused(tensors: dict[str, TensorInfo], quantized: set[str], layers: list[Layer],
                 ins: Inspection) -> None:
    """Fused partners must all be quantized, all present, and share one global scale."""
    by_name = {lay.name: lay for lay in layers}
    present = {t.rpartition(".")[0] for t in tensors}
    groups: dict[tuple[str, tuple], list[str]] = defaultdict(list)
    for mod in present:
        parent, _, leaf = mod.rpartition(".")
        for fs in FUSED_SETS:
            if leaf in fs:
                groups[(parent, fs)].append(leaf)
    for (parent, fs), leaves in sorted(groups.items()):
        mods = [f"{parent}.{leaf}" for leaf in fs if leaf in leaves]
        q = [m for m in mods if m in quantized]
        if not q:
            continue
        for m in mods:
            if m not in quantized:
                ins.problems.append(f"fused partner {m} is dense while {q[0]} is quantized")
        if fs not in _OPTIONAL_SETS:
            for leaf in fs:
                if leaf not in leaves:
                    ins.problems.append(f"fused partner {parent}.{leaf} of {q[0]} is missing")
        gs = {m: by_name[m].global_scale for m in q
              if m in by_name and by_name[m].global_scale is not None}
        if len(set(gs.values())) > 1:
            shown = ", ".join(f"{m.rpartition('.')[2]}={v:.6g}" for m, v in gs.items())
            ins.problems.append(f"fused partners of {parent} have different global scales "
                                f"({shown})")


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


def inspect_checkpoint(folder: str | Path, original: str | Path | None = None) -> Inspection:
    """Summarize and check `folder`; `original` (the unquantized model) enables offsets."""
    folder = Path(folder)
    ins = Inspection(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        qc = config.get("quantization_config")
        if not qc:
            raise MxptqError("config.json has no quantization_config")
        dialect = dialect_of_config(qc)
        fmt = dialect.format_from_config(qc)
    except (OSError, ValueError, KeyError, TypeError, MxptqError) as e:
        ins.problems.append(f"config.json: {e}")
        return ins
    ins.dialect, ins.fmt = dialect.name, fmt
    tensors = _shard_headers(folder, ins)
    mods = _quantized_modules(tensors, dialect)
    layers = [lay for m in mods if (lay := _check_layer(m, tensors, fmt, dialect, ins))]
    ins.layers = layers
    packed = {f"{m}.{s}" for m in mods for s in _names(dialect, True).values()}
    ins.dense_bytes = sum(i.nbytes for t, i in tensors.items() if t not in packed)
    ignore = qc.get("ignore") or []
    for mod in mods:
        if matches(ignore, mod):
            ins.problems.append(f"{mod}: quantized but listed in quantization_config ignore")
    _read_values(folder, tensors, layers, fmt, dialect, ins)
    _check_fused(tensors, set(mods), layers, ins)
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
    rep = json.loads(report.read_text()) if report.is_file() else {}
    ins.selector = rep.get("scale") or qc.get("scale")
    kept = rep.get("kept")
    if kept is None:
        kept = {f"{m}.weight": "listed in quantization_config ignore" for m in ignore}
    ins.kept = {k: v for k, v in kept.items() if v != "not a Linear weight"}
    if original is not None and not ins.problems:
        from .checkpoint.reader import read_checkpoint

        _offsets(Path(original), layers, read_checkpoint(folder), ins)
    return ins
