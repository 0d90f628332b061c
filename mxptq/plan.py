"""Decide per tensor, before any heavy work: quantize (as which output module, sharing a
global scale with which fused partners), keep (and why), or refuse the whole run."""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import engines
from .checkpoint.dialects import Dialect
from .checkpoint.safetensors_io import TensorInfo, list_shards, read_header
from .checkpoint.sources import Source, open_source
from .errors import MxptqError
from .formats import Format
from .name_plan import skeleton_from_names
from .skeleton import ModelClassUnavailable, Skeleton, load_skeleton

# Projections that serving stacks fuse and that must therefore share one global scale
# (llm-compressor observers/helpers.py FUSED_LAYER_NAMES): attention q/k/v, MLP gate/up,
# Mixtral w1/w3, MLA, BERT query/key/value.
FUSED_SETS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("query", "key", "value"),
)
FLOAT_DTYPES = ("F32", "BF16", "F16")


@dataclass
class Item:
    """One input tensor and what to do with it."""

    info: TensorInfo
    action: str  # "quantize" or "keep"
    reason: str
    modules: list[str] = field(default_factory=list)  # output Linear module(s)
    group: str | None = None  # fused set sharing one global scale
    layout: str | None = None  # fused 3-D experts: "out_in" or "in_out"
    split: int = 1  # 3-D gate_up tensors: each expert slice splits into this many modules

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class Plan:
    """The whole run, decided up front."""

    model_dir: Path
    shards: list[Path]
    items: list[Item]
    fmt: Format
    scale: str
    dialect: Dialect
    ignore: list[str]  # modules left dense, by the names engines look up (engines.ignore_list)
    groups: dict[str, list[str]]  # group -> input tensor names
    w4a4: bool = False  # also write each quantized Linear's static activation global scale
    targets: list[str] = field(default_factory=lambda: ["Linear"])  # compressed-tensors targets
    layout: engines.Layout = field(default_factory=engines.Layout)  # what the output holds
    source: Source = field(default_factory=Source)  # how the input stores (and decodes) weights
    planned_from: str = ""  # "model class X", or "tensor names" (`name_plan`)
    names_reason: str = ""  # why transformers could not build the model class

    @property
    def name_based(self) -> bool:
        return self.planned_from == "tensor names"

    def by_shard(self) -> dict[str, list[Item]]:
        out: dict[str, list[Item]] = defaultdict(list)
        for it in self.items:
            out[it.info.shard].append(it)
        return out

    def output_specs(self, item: Item) -> dict[str, tuple[str, tuple]]:
        """Name -> (dtype, shape) of every tensor written for this input tensor."""
        if item.action == "keep":
            return {item.name: (item.info.dtype, item.info.shape)}
        shape = item.info.shape
        if item.layout is None:
            n, k = shape
        else:
            n, k = (shape[1], shape[2]) if item.layout == "out_in" else (shape[2], shape[1])
            n //= item.split
        out: dict[str, tuple[str, tuple]] = {}
        for m in item.modules:
            out.update(self.dialect.specs(m, self.fmt, n, k))
            if self.w4a4:
                out.update(self.dialect.input_specs(m))
        return out

    def bytes_out(self, item: Item) -> int:
        return sum(
            TensorInfo(n, "", d, tuple(s)).nbytes for n, (d, s) in self.output_specs(item).items()
        )

    def summary(self) -> dict:
        c = Counter(it.action for it in self.items)
        reasons = Counter(it.reason for it in self.items if it.action == "keep")
        return {
            "tensors": len(self.items),
            "quantize": c["quantize"],
            "keep": c["keep"],
            "fused_groups": len(self.groups),
            "shards": len(self.shards),
            "bytes_in": sum(self.source.nbytes(it.info) for it in self.items),
            "bytes_out": sum(self.bytes_out(it) for it in self.items),
            "kept_reasons": dict(reasons.most_common()),
            "ignore": self.ignore,
            "source": self.source.describe,
            "dropped_source_tensors": len(self.source.dropped),
            "planned_from": self.planned_from
            + (f" ({self.names_reason})" if self.names_reason else ""),
        }


def matches(patterns: list[str], name: str) -> bool:
    """fnmatch wildcards, or `re:`-prefixed regular expressions (compressed-tensors style)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def _fused_group(module: str, sets=FUSED_SETS) -> str | None:
    parent, _, leaf = module.rpartition(".")
    for fs in sets:
        if leaf in fs:
            return f"{parent}.{'+'.join(fs)}"
    return None


def read_tensors(shards: list[Path]) -> list[TensorInfo]:
    seen: dict[str, TensorInfo] = {}
    for s in shards:
        for name, info in read_header(s).items():
            if name in seen:
                raise MxptqError(f"tensor {name} appears in {seen[name].shard} and {s.name}")
            seen[name] = info
    return list(seen.values())


def _linear_item(info, module, sk_name, sk, fmt, ignore, quantize_lm_head) -> Item:
    k = info.shape[1]
    if sk_name in sk.lm_head and not quantize_lm_head:
        return Item(info, "keep", "lm_head (pass --quantize-lm-head to quantize it)")
    if matches(ignore, module) or (sk_name and matches(ignore, sk_name)):
        return Item(info, "keep", "matches --ignore")
    if info.dtype not in FLOAT_DTYPES:
        return Item(info, "keep", f"dtype {info.dtype} is not bf16/fp16/fp32")
    if k % fmt.block_size:
        return Item(info, "keep", f"input dim not a multiple of block {fmt.block_size}")
    return Item(info, "quantize", "linear", [module], _fused_group(module))


def _expert3d_item(info, layout, fmt, ignore) -> Item:
    base = info.name
    parent, _, pname = base.rpartition(".")
    if layout == "unknown":
        raise MxptqError(
            f"tensor {base}: fused 3-D expert tensor with a layout mxptq cannot tell from the "
            "model code; pass --ignore to keep it dense"
        )
    if matches(ignore, base) or matches(ignore, parent):
        return Item(info, "keep", "matches --ignore")
    if info.dtype not in FLOAT_DTYPES:
        return Item(info, "keep", f"dtype {info.dtype} is not bf16/fp16/fp32")
    e, a, b = info.shape
    k = b if layout == "out_in" else a
    if k % fmt.block_size:
        return Item(info, "keep", f"input dim not a multiple of block {fmt.block_size}")
    if pname == "gate_up_proj":
        mods = [f"{parent}.{i}.{p}" for i in range(e) for p in ("gate_proj", "up_proj")]
        return Item(info, "quantize", "fused experts", mods, layout=layout, split=2)
    mods = [f"{parent}.{i}.{pname}" for i in range(e)]
    return Item(info, "quantize", "fused experts", mods, layout=layout)


def classify(info: TensorInfo, sk: Skeleton, fmt, ignore, quantize_lm_head,
             containers: set[str] = frozenset()) -> Item:
    """The decision for one tensor, from its name, shape and the skeleton. `containers`: the
    checkpoint's MoE expert containers, whose routers stay dense."""
    if info.name.endswith(".weight") and engines.is_router(info.name[:-7], containers):
        # vLLM builds some routers with the quantization config (models/qwen3_moe.py), most
        # without (models/mixtral.py, deepseek_v2.py, qwen2_moe.py shared_expert_gate):
        # dense and listed in ignore loads everywhere (ModelOpt's exporter does the same).
        return Item(info, "keep", "MoE router (engines build routers dense)")
    if not info.name.endswith(".weight"):
        if len(info.shape) == 3:
            key = sk.match_expert_param(info.name)
            if key is not None:
                return _expert3d_item(info, sk.experts[key], fmt, ignore)
        return Item(info, "keep", "not a Linear weight")
    module = info.name[: -len(".weight")]
    if len(info.shape) != 2:
        return Item(info, "keep", "not a Linear weight")
    sk_name = sk.match_linear(module)
    if sk_name is None and sk.expert_modules and engines.expert_of(module):
        sk_name = ""  # a per-expert projection of a fused-experts model (checkpoint naming)
    if sk_name is None:
        return Item(info, "keep", "not a Linear weight")
    return _linear_item(info, module, sk_name, sk, fmt, ignore, quantize_lm_head)


def _container(it: Item, sk: Skeleton) -> str | None:
    """The MoE expert container an expert projection (2-D per expert, or fused 3-D) belongs to."""
    if it.layout is not None or (len(it.info.shape) == 3
                                 and sk.match_expert_param(it.name) is not None):
        return it.name.rpartition(".")[0]
    if it.name.endswith(".weight") and len(it.info.shape) == 2:
        e = engines.expert_of(it.name[: -len(".weight")])
        return e[0] if e else None
    return None


def _settle_experts(items: list[Item], sk: Skeleton) -> None:
    """All experts of a MoE layer are quantized or none: vLLM and SGLang choose one scheme per
    MoE layer from expert 0 (compressed_tensors_moe.py::get_moe_method: "All MoE projections
    need to have same quantization scheme"), ModelOpt consumers and TensorRT-LLM by the layer's
    name, so a partly dense layer loads nowhere. One kept projection keeps the layer dense."""
    members: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if (c := _container(it, sk)) is not None:
            members[c].append(it)
    for c, its in members.items():
        kept = [it for it in its if it.action == "keep"]
        if not kept or len(kept) == len(its):
            continue
        why = (f"MoE layer {c} kept dense: {kept[0].name} {kept[0].reason} (engines need one "
               "scheme for all experts of a layer)")
        for it in its:
            if it.action == "quantize":
                it.action, it.reason, it.group = "keep", why, None


def _settle_groups(items: list[Item]) -> dict[str, list[str]]:
    """All members of a fused set are quantized or none (vLLM refuses mixed schemes); names
    that match a set but do not share an input width are not fused."""
    members: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if it.group:
            members[it.group].append(it)
    kept_modules = {it.name[: -len(".weight")] for it in items if it.action == "keep"}
    groups: dict[str, list[str]] = {}
    for g, its in members.items():
        parent = g.rpartition(".")[0]
        leaves = g.rpartition(".")[2].split("+")
        blocked = [f"{parent}.{x}" for x in leaves if f"{parent}.{x}" in kept_modules]
        if len({it.info.shape[-1] for it in its}) > 1:
            for it in its:
                it.group = None
        elif blocked:
            for it in its:
                it.action, it.reason, it.group = "keep", f"fused partner {blocked[0]} kept", None
        elif len(its) == 1:
            its[0].group = None
        else:
            groups[g] = sorted(it.name for it in its)
    return groups


def build_plan(
    model_dir: Path,
    fmt: Format,
    scale: str,
    dialect: Dialect,
    ignore: list[str] | None = None,
    quantize_lm_head: bool = False,
    w4a4: bool = False,
    fused_sets: list[tuple[str, ...]] | None = None,
) -> Plan:
    """Read headers and config only; decide everything; raise MxptqError on what cannot work.
    The model's structure comes from its class (transformers, on the meta device) or, when
    transformers cannot build it, from the tensor names (`name_plan`). `fused_sets` replaces
    the FUSED_SETS table."""
    dialect.check(fmt)
    if w4a4:
        dialect.check_w4a4(fmt)
    ignore = list(ignore or [])
    shards = list_shards(model_dir)
    source = open_source(model_dir, read_tensors(shards))
    infos = source.tensors
    reason = ""
    try:
        sk = load_skeleton(model_dir)
        planned_from = f"model class {sk.model_class}"
    except ModelClassUnavailable as e:
        sk = skeleton_from_names(infos, model_dir)
        planned_from, reason = "tensor names", str(e)
    containers = _containers(infos, sk)
    items = [classify(i, sk, fmt, ignore, quantize_lm_head, containers) for i in infos]
    if fused_sets:
        for it in items:
            if it.action == "quantize" and it.layout is None:
                it.group = _fused_group(it.modules[0], tuple(fused_sets))
    _settle_experts(items, sk)
    groups = _settle_groups(items)
    if not any(it.action == "quantize" for it in items):
        raise MxptqError(f"{model_dir}: no Linear weight can be quantized with {fmt.name}")
    layout, absent = _layout(model_dir, items, sk, w4a4)
    return Plan(model_dir, shards, items, fmt, scale, dialect,
                engines.ignore_list(layout, absent), groups, w4a4,
                engines.targets(layout), layout, source, planned_from, reason)


def _containers(infos: list[TensorInfo], sk: Skeleton) -> set[str]:
    out = set()
    for info in infos:
        if len(info.shape) == 3 and sk.match_expert_param(info.name) is not None:
            out.add(info.name.rpartition(".")[0])
        elif info.name.endswith(".weight") and (e := engines.expert_of(info.name[:-7])):
            out.add(e[0])
    return out


def _layout(model_dir: Path, items: list[Item], sk: Skeleton,
            w4a4: bool) -> tuple[engines.Layout, set[str]]:
    """The output as engines see it, and the skeleton Linears the checkpoint does not hold (a
    tied lm_head), which `ignore` must still name."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        model_type = ""
    lay = engines.Layout(model_type=model_type)
    seen = set()
    for it in items:
        if it.action == "quantize":
            lay.packed.update(it.modules)
        elif len(it.info.shape) == 3 and _container(it, sk) and it.info.dtype in FLOAT_DTYPES:
            lay.fused_experts.add(it.name.rpartition(".")[0])
        if not it.name.endswith(".weight") or len(it.info.shape) != 2:
            continue
        module = it.name[: -len(".weight")]
        sk_name = sk.match_linear(module)
        seen.add(sk_name or module)
        if sk_name in sk.lm_head:
            lay.lm_head.add(module)
        if it.action == "keep":
            lay.dense.add(module)
    if w4a4:
        lay.input_scaled = set(lay.packed)
    return lay, sk.linears - seen
