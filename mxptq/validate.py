"""The checks a quantized checkpoint must pass before anything uses it, shared by `mxptq
inspect` (which lists every problem) and the packed loader (which refuses the first).

Three levels, so each caller pays only for what it can read: the config alone
(`check_config`), the safetensors headers (`checkpoint_tensors`, `check_tensors`), and values
(`scale_problems`, `global_problem`, `fused_scale_problems`, `dense_nan_problems`). Every
problem is one line naming the tensor or file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.dialects import Dialect, dialect_of_config
from .checkpoint.paths import member
from .checkpoint.safetensors_io import (
    INDEX_NAME,
    TensorInfo,
    read_header,
    read_tensor,
    read_weight_map,
)
from .errors import MxptqError
from .formats import E4M3, E8M0, Format
from .plan import FUSED_SETS, matches

# Sets whose members can legitimately be absent (MLA without q LoRA has no q_a_proj).
_OPTIONAL_SETS = {("q_a_proj", "kv_a_proj_with_mqa")}
_FLOATS = {"F32", "BF16", "F16", "F64"}


@dataclass
class Layer:
    """One quantized Linear as stored."""

    name: str
    shape: tuple[int, int]  # [N, K] of the dense weight
    bytes: int  # codes + scales + global scale
    global_name: str | None  # its global scale tensor, if it has a usable one
    global_scale: float | None = None  # the stored value (ModelOpt: weight_scale_2 = 1/g)
    codes: Counter = field(default_factory=Counter)  # scale code -> blocks


def _get(d: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ct_problems(qc: dict, fmt: Format) -> list[str]:
    """compressed-tensors: every group's weights must be what the format is (4-bit float,
    group_size = block, tensor_group with a global scale or group without), and the top-level
    and group `format` must agree (compressed-tensors' QuantizationConfig reads both)."""
    out = []
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return ["quantization_config.config_groups is missing or empty"]
    want_strategy = "tensor_group" if fmt.has_global else "group"
    top = qc.get("format")
    for gname, g in groups.items():
        w = _get(g, "weights")
        if not isinstance(w, dict):
            out.append(f"quantization_config group {gname}: no weights scheme")
            continue
        for key, want in (("num_bits", 4), ("type", "float"), ("group_size", fmt.block_size),
                          ("strategy", want_strategy)):
            if w.get(key) != want:
                out.append(f"quantization_config group {gname}: weights.{key} is "
                           f"{w.get(key)!r}, but {fmt.name} needs {want!r}")
        gf = g.get("format")
        if top is not None and gf is not None and gf != top:
            out.append(f"quantization_config: format {top!r} but group {gname} says {gf!r}")
    return out


def _modelopt_problems(qc: dict) -> list[str]:
    out = []
    algo = qc.get("quant_algo")
    if algo not in (None, "NVFP4", "W4A16_NVFP4"):
        out.append(f"quantization_config: quant_algo {algo!r} is not an NVFP4 algorithm")
    for gname, g in (qc.get("config_groups") or {}).items():
        w = _get(g, "weights")
        if isinstance(w, dict):
            for key, want in (("num_bits", 4), ("group_size", 16)):
                if key in w and w[key] != want:
                    out.append(f"quantization_config group {gname}: weights.{key} is "
                               f"{w[key]!r}, NVFP4 needs {want!r}")
    return out


def check_config(qc: object) -> tuple[Dialect, Format, list[str]]:
    """The dialect and format a quantization_config names, and the problems of the config
    itself; MxptqError when it names no format mxptq reads."""
    if not isinstance(qc, dict) or not qc:
        raise MxptqError("config.json has no quantization_config")
    dialect = dialect_of_config(qc)
    try:
        fmt = dialect.format_from_config(qc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MxptqError(f"quantization_config does not say the format ({type(e).__name__}: "
                         f"{e})") from e
    problems = []
    if dialect.name == "compressed-tensors":
        problems = _ct_problems(qc, fmt)
    elif dialect.name == "modelopt":
        problems = _modelopt_problems(qc)
    ignore = qc.get("ignore")
    if ignore is not None and not (isinstance(ignore, list)
                                   and all(isinstance(p, str) for p in ignore)):
        problems.append("quantization_config.ignore is not a list of names")
    return dialect, fmt, problems


def checkpoint_tensors(folder: Path) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor of the checkpoint, checking on the way: the index against the files, each
    index entry against the containment rule, each header as strictly as safetensors."""
    problems: list[str] = []
    files = {p.name for p in folder.glob("*.safetensors") if not p.name.startswith(".")}
    weight_map: dict[str, str] | None = None
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = read_weight_map(index)
        except MxptqError as e:
            problems.append(str(e))
    elif len(files) > 1:
        problems.append(f"{len(files)} safetensors files but no {INDEX_NAME}")
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name in sorted(files | set((weight_map or {}).values())):
        try:
            path = member(folder, name, INDEX_NAME)
        except MxptqError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            n = sum(1 for v in (weight_map or {}).values() if v == name)
            problems.append(f"{INDEX_NAME}: shard {name} ({n} tensors) does not exist")
            continue
        try:
            headers[name] = read_header(path)
        except MxptqError as e:
            problems.append(str(e))
    tensors: dict[str, TensorInfo] = {}
    for shard, h in headers.items():
        for t, info in h.items():
            if t in tensors:
                problems.append(f"tensor {t} is in both {tensors[t].shard} and {shard}")
            tensors[t] = info
            if weight_map is not None and t not in weight_map:
                problems.append(f"tensor {t} in {shard} is not in {INDEX_NAME}")
            elif weight_map is not None and weight_map[t] != shard:
                problems.append(f"tensor {t} is in {shard} but {INDEX_NAME} says "
                                f"{weight_map[t]}")
    for t, shard in (weight_map or {}).items():
        if shard in headers and t not in headers[shard]:
            problems.append(f"{INDEX_NAME}: tensor {t} is not in {shard}")
    if not tensors and not problems:
        problems.append("no safetensors weights found")
    return tensors, problems


def tensor_roles(dialect: Dialect, has_global: bool) -> dict[str, str]:
    """Role -> tensor suffix for the dialect."""
    out = {"codes": dialect.codes_name, "scales": dialect.scales_name}
    if has_global or dialect.global_is_decode:  # ModelOpt always stores weight_scale_2
        out["global"] = dialect.global_name
    return out


def quantized_modules(tensors: dict[str, TensorInfo], dialect: Dialect) -> list[str]:
    """Modules holding any packed tensor (a module missing some of them is still found). A
    dense ModelOpt-style `weight` is told from packed codes by its dtype."""
    mods = set()
    for t, info in tensors.items():
        mod, _, leaf = t.rpartition(".")
        if leaf in (dialect.scales_name, dialect.global_name) or (
                leaf == dialect.codes_name and (leaf != "weight" or info.dtype == "U8")):
            mods.add(mod)
    return sorted(mods)


def _check_layer(mod, tensors, fmt, dialect: Dialect, problems: list[str]) -> Layer | None:
    """Names, dtypes and shapes of one quantized Linear against the format; None if unusable."""
    names = tensor_roles(dialect, fmt.has_global)
    infos = {}
    for role, suffix in names.items():
        info = tensors.get(f"{mod}.{suffix}")
        if info is None:
            problems.append(f"{mod}: {mod}.{suffix} is missing")
        infos[role] = info
    if dialect.codes_name != "weight" and f"{mod}.weight" in tensors:
        problems.append(f"{mod}: has a dense {mod}.weight next to its packed tensors")
    if "global" not in names and f"{mod}.{dialect.global_name}" in tensors:
        problems.append(f"{mod}: {dialect.global_name} present but {fmt.name} has no global")
    want = {"codes": "U8", "scales": "F8_E4M3" if fmt.scale is E4M3 else "U8", "global": "F32"}
    bad = False
    for role, info in infos.items():
        if info is not None and info.dtype != want[role]:
            problems.append(f"{info.name}: dtype {info.dtype}, expected {want[role]}")
            bad = True
    codes, scales, g = infos["codes"], infos["scales"], infos.get("global")
    if codes is None or scales is None or bad:
        return None
    if len(codes.shape) != 2 or len(scales.shape) != 2:
        problems.append(f"{mod}: codes {list(codes.shape)} / scales {list(scales.shape)} "
                        "are not 2-D")
        return None
    n, k = codes.shape[0], codes.shape[1] * 2
    if scales.shape != (n, k // fmt.block_size) or k % fmt.block_size or not n * k:
        problems.append(
            f"{mod}: scales shape {list(scales.shape)} does not fit codes {list(codes.shape)} "
            f"(expected [{n}, {k // fmt.block_size}] for K={k}, block {fmt.block_size})")
        return None
    if g is not None and g.shape != dialect.global_shape:
        problems.append(f"{g.name}: shape {list(g.shape)}, expected "
                        f"{list(dialect.global_shape)}")
        g = None
    nbytes = sum(i.nbytes for i in infos.values() if i is not None)
    return Layer(mod, (n, k), nbytes, None if g is None else g.name)


def _fused_presence(tensors: dict[str, TensorInfo], quantized: set[str]) -> list[str]:
    """Fused partners must all be present and all quantized (engines load them as one)."""
    out = []
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
                out.append(f"fused partner {m} is dense while {q[0]} is quantized")
        # a lone member is no set: MLA without q LoRA has q_proj but no k_proj / v_proj (the
        # loader checks partners against the model itself)
        if fs not in _OPTIONAL_SETS and len(leaves) >= 2:
            for leaf in fs:
                if leaf not in leaves:
                    out.append(f"fused partner {parent}.{leaf} of {q[0]} is missing")
    return out


def check_tensors(tensors: dict[str, TensorInfo], dialect: Dialect, fmt: Format,
                  qc: dict) -> tuple[list[Layer], list[str], list[str]]:
    """The quantized layers the headers describe (usable ones), every module holding packed
    tensors, and the problems: missing, mistyped or misshapen tensors, a layer the config's
    ignore list names, fused partners missing or dense."""
    problems: list[str] = []
    mods = quantized_modules(tensors, dialect)
    layers = [lay for m in mods if (lay := _check_layer(m, tensors, fmt, dialect, problems))]
    ignore = []
    for p in qc.get("ignore") if isinstance(qc.get("ignore"), list) else []:
        try:
            if isinstance(p, str) and (not p.startswith("re:") or re.compile(p[3:])):
                ignore.append(p)
        except re.error as e:
            problems.append(f"quantization_config.ignore: {p!r} is not a regular expression "
                            f"({e})")
    for mod in mods:
        if matches(ignore, mod):
            problems.append(f"{mod}: quantized but listed in quantization_config ignore")
    problems += _fused_presence(tensors, set(mods))
    return layers, mods, problems


def scale_problems(name: str, b: torch.Tensor, fmt: Format) -> list[str]:
    """Scale bytes no encoder writes: NaN, a sign bit, codes above the codec's maximum."""
    b = b.view(torch.uint8).flatten()
    out = []
    if fmt.scale is E4M3:
        nan = (b & 0x7F) == 0x7F
        neg = ((b & 0x80) != 0) & ~nan
        if bool(nan.any()):
            out.append(f"{name}: {int(nan.sum())} NaN scale bytes (0x7F/0xFF)")
        if bool(neg.any()):
            out.append(f"{name}: {int(neg.sum())} negative scale bytes (sign bit set)")
    elif fmt.scale is E8M0:
        if bool((b == 0xFF).any()):
            out.append(f"{name}: {int((b == 0xFF).sum())} NaN scale bytes (0xFF)")
    else:
        high = b.int() > fmt.scale.max_code
        if bool(high.any()):
            out.append(f"{name}: {int(high.sum())} scale codes above {fmt.scale.name} max "
                       f"{fmt.scale.max_code}")
    return out


def global_problem(name: str, value: float) -> str | None:
    """A stored global scale must be a positive finite number (0, inf, NaN and negatives
    decode every weight of the layer to 0, inf or NaN)."""
    if value > 0 and value != float("inf"):
        return None
    return f"{name}: global scale {value} is not a positive finite number"


def fused_scale_problems(globals_by_module: dict[str, float]) -> list[str]:
    """Quantized fused partners must share one global scale (engines fuse them)."""
    by_set: dict[tuple[str, tuple], dict[str, float]] = defaultdict(dict)
    for mod, g in globals_by_module.items():
        parent, _, leaf = mod.rpartition(".")
        for fs in FUSED_SETS:
            if leaf in fs:
                by_set[(parent, fs)][leaf] = g
    out = []
    for (parent, _), gs in sorted(by_set.items()):
        if len(set(gs.values())) > 1:
            shown = ", ".join(f"{leaf}={v:.6g}" for leaf, v in gs.items())
            out.append(f"fused partners of {parent} have different global scales ({shown})")
    return out


def dense_nan_problems(folder: Path, tensors: dict[str, TensorInfo],
                       skip: set[str]) -> list[str]:
    """NaN in float tensors stored dense (embeddings, norms, kept Linear layers)."""
    out = []
    by_shard: dict[str, list[TensorInfo]] = defaultdict(list)
    for t, info in tensors.items():
        if t not in skip and info.dtype in _FLOATS and info.nbytes:
            by_shard[info.shard].append(info)
    for shard, infos in sorted(by_shard.items()):
        fd = os.open(folder / shard, os.O_RDONLY)
        try:
            for info in sorted(infos, key=lambda i: i.offset):
                t = read_tensor(fd, info)
                if bool(torch.isnan(t).any()):
                    out.append(f"{info.name}: {int(torch.isnan(t).sum())} NaN values in a "
                               "tensor stored dense")
        finally:
            os.close(fd)
    return out


def read_config(folder: Path) -> dict:
    """config.json as a dict; MxptqError when unreadable."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except OSError as e:
        raise MxptqError(f"config.json: cannot read ({e.strerror or e})") from e
    except ValueError as e:
        raise MxptqError(f"config.json: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise MxptqError("config.json: not a JSON object")
    return cfg


def refuse(problems: list[str], where: object) -> None:
    """Raise the first problem as one MxptqError line (the loader's contract)."""
    if problems:
        more = f" (and {len(problems) - 1} more; `mxptq inspect` lists them)" \
            if len(problems) > 1 else ""
        raise MxptqError(f"{where}: cannot load: {problems[0]}{more}")


def folder_problems(folder: Path) -> list[str]:
    """Every problem of a checkpoint folder that its config and headers show (no values read)."""
    try:
        qc = read_config(folder).get("quantization_config")
        dialect, fmt, problems = check_config(qc)
    except MxptqError as e:
        return [str(e)]
    tensors, more = checkpoint_tensors(folder)
    return problems + more + check_tensors(tensors, dialect, fmt, qc)[2]


def check_files(qc: dict, files: list[str], name_or_path: str | None) -> tuple[Format, set[str]]:
    """For the loader, before any weight is read: the config, the checkpoint files transformers
    resolved (inside the model folder: an index entry like `../x.safetensors` is refused),
    their headers and every quantized layer. Returns the format and the quantized modules;
    raises MxptqError on the first problem."""
    dialect, fmt, problems = check_config(qc)
    folder = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
    if folder is None and files:  # a hub id: the files sit in one snapshot folder
        folder = Path(os.path.dirname(os.path.normpath(files[0])))
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        rel = os.path.relpath(os.path.normpath(f), os.path.normpath(folder)) if folder else f
        try:
            path = member(folder, rel, "the checkpoint index") if folder else Path(f)
            for t, info in read_header(path).items():
                if t in tensors:
                    problems.append(f"tensor {t} is in both {tensors[t].shard} and {info.shard}")
                tensors[t] = info
        except MxptqError as e:
            problems.append(str(e))
    if not problems:
        problems += check_tensors(tensors, dialect, fmt, qc)[2]
    refuse(problems, name_or_path or "the checkpoint")
    return fmt, set(quantized_modules(tensors, dialect))


def check_loaded(layers: dict[str, object]) -> list[str]:
    """The values of loaded packed layers ({module name: QuantizedTensor}): scale bytes, global
    scales, and equal global scales across fused partners."""
    problems: list[str] = []
    globals_ = {}
    for name, qt in layers.items():
        if qt.scales.device.type == "meta":  # offloaded: not in memory to check
            continue
        problems += scale_problems(f"{name}.scales", qt.scales, qt.format)
        if qt.global_scale is not None:
            g = float(qt.global_scale.float().reshape(()))
            globals_[name] = g
            if (p := global_problem(f"{name}.global_scale", g)) is not None:
                problems.append(p)
    return problems + fused_scale_problems(globals_)


def partner_problems(linears: set[str], packed: set[str]) -> list[str]:
    """With the model at hand (the loader): a Linear whose fused partner in the same model is
    packed must be packed too; else the checkpoint lacks it and it would load randomly
    initialised, or it is dense where engines expect one scheme for the set."""
    out = []
    for name in sorted(linears - packed):
        parent, _, leaf = name.rpartition(".")
        for fs in FUSED_SETS:
            if leaf in fs:
                q = [f"{parent}.{x}" for x in fs if f"{parent}.{x}" in packed]
                if q:
                    out.append(f"fused partner {name} of {q[0]} is not quantized in the "
                               "checkpoint (missing or dense)")
    return out
