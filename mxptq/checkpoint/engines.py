"""What each serving engine builds quantized from a checkpoint, and so what our configs must
name: one set of rules for the writers (targets, ignore), the planner, `mxptq inspect
--engines` and the conformance tests.

Each rule cites the engine source it was read from (docs/checkpoints.md, "Which engine loads
what"). Read: vLLM 0.34.0, SGLang 0.5.23, compressed-tensors 0.11.0-0.20.1, nvidia-modelopt
0.47.0, transformers 5.24 (installed and run); TensorRT-LLM only as main-branch source snapshots
(no release installed), so its answers say so.

The model works on module names, i.e. on what a checkpoint holds, without building the model:
  - a Linear-like module is any module with a packed weight or a dense 2-D `.weight` that is
    not an embedding: engines build projections, MoE routers (vLLM `models/qwen3_moe.py` builds
    `mlp.gate` as `GateLinear(..., quant_config=quant_config)`) and GPT-2 Conv1D weights as
    Linear layers that receive the quantization config;
  - q/k/v, gate/up and MLA q_a/kv_a are fused into one layer (FUSED_LINEARS);
  - per-expert projections `<container>.<e>.<proj>` form one MoE layer per container;
  - the output embedding (`lm_head`) is a ParallelLMHead with its own matching rules.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..formats import E4M3, E8M0, Format

ENGINES = ("vllm", "sglang", "tensorrt-llm", "transformers")
LOADS, NOTE, FAILS, UNVERIFIED = "loads", "loads with note", "will not load", "unverified"

# Submodules of a block owning an `experts` container that route tokens. Kept dense and named in
# `ignore` (ModelOpt 0.47 export/quant_utils.py::_get_unquantized_moe_router_names does the same
# for the same names: vLLM/SGLang otherwise expect them packed).
ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")
# Embeddings are built as VocabParallelEmbedding, which neither dialect quantizes (vLLM
# compressed_tensors.py::get_quant_method, modelopt.py::get_quant_method): no `ignore` entry
# needed. An embedding this list misses is listed, which every engine accepts.
_EMBEDDING_LEAVES = {"embed_tokens", "word_embeddings", "position_embeddings",
                     "token_type_embeddings", "embed_positions", "wte", "wpe", "tok_embeddings",
                     "embed_in", "embeddings", "shared"}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")
# SGLang decides a whole MoE layer from expert 0 under these names, whatever the model's own
# projection names are (compressed_tensors/compressed_tensors.py::get_moe_scheme).
SGLANG_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
# Checkpoint Linears vLLM/SGLang fuse into one layer (`packed_modules_mapping` in vLLM
# models/llama.py, qwen3_moe.py, deepseek_v2.py); all shards need one scheme
# (compressed_tensors/utils.py::should_ignore_layer: "vLLM requires all to use the same scheme").
FUSED_LINEARS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
}
_SGLANG_FUSED_NAME = {"fused_qkv_a_proj": "fused_qkv_a_proj_with_mqa"}  # models/deepseek_v2.py
# Models whose ParallelLMHead is built without the quantization config, so a packed lm_head
# cannot load: vLLM 0.34 models/phimoe.py (`quant_config=None`), SGLang 0.5.23
# srt/models/mixtral.py (`ParallelLMHead(config.vocab_size, config.hidden_size, prefix=...)`).
_LM_HEAD_DENSE_ONLY = {"vllm": {"phimoe"}, "sglang": {"mixtral"}}
# SGLang's DeepSeek loader reads kv_b_proj.weight as a dense matrix after loading
# (srt/models/deepseek_common/deepseek_weight_loader.py::post_load_weights).
_SGLANG_DENSE_KV_B = {"deepseek_v2", "deepseek_v3", "kimi_k2"}


def expert_of(module: str) -> tuple[str, int, str] | None:
    """(container, expert index, projection) of a per-expert projection, else None."""
    m = _EXPERT.match(module)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def is_embedding(module: str) -> bool:
    return module.rpartition(".")[2] in _EMBEDDING_LEAVES


def is_lm_head(module: str) -> bool:
    return module.rpartition(".")[2] == "lm_head"


def is_router(module: str, containers: Iterable[str]) -> bool:
    """`module` is (or sits under) the gate/router of a block that owns an experts container."""
    for c in containers:
        block = c.rpartition(".")[0]
        for leaf in ROUTER_LEAVES:
            r = f"{block}.{leaf}" if block else leaf
            if module == r or module.startswith(r + "."):
                return True
    return False


@dataclass
class Layout:
    """What a checkpoint holds, by module name: the engines' view of it.

    packed: modules stored as FP4; dense: modules with a dense 2-D `.weight`; lm_head: output
    embeddings (packed or dense); fused_experts: MoE containers stored as dense 3-D tensors;
    input_scaled: modules with a W4A4 activation scale; model_type: from config.json.
    """

    packed: set[str] = field(default_factory=set)
    dense: set[str] = field(default_factory=set)
    lm_head: set[str] = field(default_factory=set)
    fused_experts: set[str] = field(default_factory=set)
    input_scaled: set[str] = field(default_factory=set)
    model_type: str = ""

    def containers(self) -> dict[str, dict[str, set[str]]]:
        """MoE container -> {"packed": projections stored packed, "dense": stored dense}."""
        out = {c: {"packed": set(), "dense": set(SGLANG_EXPERT_NAMES)}
               for c in self.fused_experts}
        for kind, mods in (("packed", self.packed), ("dense", self.dense)):
            for m in mods:
                if e := expert_of(m):
                    out.setdefault(e[0], {"packed": set(), "dense": set()})[kind].add(e[2])
        return out

    def experts(self, container: str) -> list[str]:
        return sorted(m for m in self.packed | self.dense
                      if (e := expert_of(m)) and e[0] == container)

    def linears(self) -> list[str]:
        """Modules built as their own Linear layer (not experts, embeddings or lm_head)."""
        return sorted(m for m in self.packed | self.dense
                      if not expert_of(m) and not is_embedding(m) and m not in self.lm_head)


def ignore_list(layout: Layout, extra: Iterable[str] = ()) -> list[str]:
    """Every module that stays dense and that an engine could build as a Linear, under the
    names each engine looks up; `extra` adds dense Linears the checkpoint does not hold (a tied
    lm_head). Exact names only: every engine matches those (equality in compressed-tensors and
    vLLM, fnmatch/substring for ModelOpt consumers, fnmatch in TensorRT-LLM)."""
    names = {m for m in layout.dense if not is_embedding(m)} | set(extra)
    for c, kinds in layout.containers().items():
        if kinds["packed"]:
            continue
        # vLLM/SGLang read compressed-tensors' decision for a MoE layer from expert 0's names;
        # vLLM/SGLang ModelOpt and TensorRT-LLM exclude the MoE module by its own name.
        names.add(c)
        names.update(f"{c}.0.{p}" for p in (*SGLANG_EXPERT_NAMES, *kinds["dense"]))
    return sorted(names)


def targets(layout: Layout) -> list[str]:
    """compressed-tensors targets: a packed lm_head by name (vLLM compressed_tensors.py::
    get_quant_method matches a ParallelLMHead by name or regex only; SGLang
    compressed_tensors.py::get_lm_head_scheme likewise), then every Linear. The name comes
    first because compressed-tensors credits a module to its first matching target and warns
    about targets it never credits (utils/match.py::match_named_modules)."""
    return [*sorted(layout.packed & layout.lm_head), "Linear"]


# ---- each engine's matching rules -----------------------------------------------------------

class Refusal(Exception):
    """The engine rejects the whole config, not one module."""


def _same(fused: str, shards: list[str], test: Callable[[str], bool]) -> bool:
    got = {test(s) for s in shards}
    if len(got) > 1:
        raise Refusal(f"{fused}: some shards excluded and some not (all shards of a fused layer "
                      "need one scheme)")
    return got.pop()


def _sglang_name(fused: str) -> str:
    parent, _, leaf = fused.rpartition(".")
    return f"{parent}.{_SGLANG_FUSED_NAME[leaf]}" if leaf in _SGLANG_FUSED_NAME else fused


def _re_or_exact(name: str, pattern: str) -> bool:
    """vLLM quantization/utils/config_utils.py::is_equal_or_regex_match, compressed-tensors
    utils/match.py::match_name: `re:` patterns with re.match, else equality."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


class _Rules:
    """One engine reading one config: which modules it builds quantized."""

    lm_head_dense_only = False

    def linear(self, fused: str, shards: list[str]) -> bool:
        raise NotImplementedError

    def lm_head(self, module: str) -> bool:
        return not self.lm_head_dense_only and self.linear(module, [module])

    def experts(self, container: str, projections: set[str]) -> bool:
        raise NotImplementedError


class _VllmCT(_Rules):
    """vLLM compressed_tensors.py: `get_scheme_dict` (ignore first, then `find_matched_target`:
    name, fused shards, then class-name substring, so "Linear" matches every LinearBase)."""

    match = staticmethod(_re_or_exact)

    def __init__(self, qc: dict) -> None:
        self.ignore = list(qc.get("ignore") or [])
        self.targets = [t for g in (qc.get("config_groups") or {}).values()
                        for t in g.get("targets", [])]

    def ignored(self, name: str) -> bool:
        return any(self.match(name, p) for p in self.ignore)

    def named(self, name: str) -> bool:
        return any(self.match(name, t) for t in self.targets)

    def linear(self, fused, shards):
        if self.ignored(fused) or _same(fused, shards, self.ignored):
            return False
        return "Linear" in self.targets or all(self.named(s) for s in shards)

    def lm_head(self, module):
        # ParallelLMHead: a target must name it; "Linear" is not in its class name.
        return not self.lm_head_dense_only and not self.ignored(module) and self.named(module)

    def experts(self, container, projections):
        # compressed_tensors_moe.py::get_moe_method: expert 0's checkpoint projection names.
        got = {self.ignored(f"{container}.0.{p}") for p in projections}
        if len(got) > 1:
            raise Refusal(f"{container}: expert 0's projections are partly ignored ('All MoE "
                          "projections need to have same quantization scheme')")
        return not got.pop() and "Linear" in self.targets  # "Linear" also maps RoutedExperts


class _SglangCT(_VllmCT):
    """SGLang compressed_tensors/utils.py: ignore entries also match a dotted suffix; a Linear
    matching no target is an error; MoE layers are judged by `.0.gate_proj/up_proj/down_proj`."""

    @staticmethod
    def match(name, pattern):
        return _re_or_exact(name, pattern) or (
            not pattern.startswith("re:") and name.endswith("." + pattern))

    def linear(self, fused, shards):
        fused = _sglang_name(fused)
        if _same(fused, shards, self.ignored):
            return False
        if "Linear" in self.targets or all(self.named(s) for s in shards):
            return True
        raise Refusal(f"{fused}: 'Unable to find matching target' (find_matched_target)")

    def experts(self, container, projections):
        return super().experts(container, set(SGLANG_EXPERT_NAMES))


class _TransformersCT(_VllmCT):
    """compressed-tensors in transformers (utils/match.py::match_named_modules): every nn.Linear
    is matched by class, per module; no fusion, experts per module."""

    def linear(self, fused, shards):
        return _same(fused, shards, lambda s: not self.ignored(s) and (
            "Linear" in self.targets or self.named(s)))

    lm_head = _Rules.lm_head


class _VllmModelOpt(_Rules):
    """vLLM modelopt.py::ModelOptQuantConfigBase.is_layer_excluded: exact (fused shards via
    utils/quant_utils.py::is_layer_skipped), then substring, then fnmatch; get_quant_method
    quantizes every LinearBase and ParallelLMHead, and RoutedExperts, not excluded."""

    def __init__(self, qc: dict) -> None:
        self.exclude = list(qc.get("ignore", qc.get("exclude_modules")) or [])

    def excluded(self, prefix: str, shards: list[str]) -> bool:
        if prefix in self.exclude or _same(prefix, shards, lambda s: s in self.exclude):
            return True
        return any(p in prefix or fnmatch.fnmatch(prefix, p) for p in self.exclude)

    def linear(self, fused, shards):
        return not self.excluded(fused, shards)

    def experts(self, container, projections):
        return not self.excluded(container, [container])


class _SglangModelOpt(_VllmModelOpt):
    """SGLang modelopt_quant.py::ModelOptQuantConfig: utils.py::is_layer_skipped (dotted-path
    match, per fused shard) or is_layer_excluded (glob over the name or any dotted part; an MLA
    tail such as kv_b_proj excludes that projection in every layer)."""

    _MLA = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}

    def path(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") or f".{p}." in f".{name}."
                   for p in (q.rstrip(".") for q in self.exclude))

    def layer_excluded(self, prefix: str) -> bool:
        for p in self.exclude:
            rx = re.compile(p.replace(".", r"\.").replace("*", ".*"))
            if rx.fullmatch(prefix) or any(rx.fullmatch(x) for x in prefix.split(".")):
                return True
            tail = p.rsplit(".", 1)[-1]
            if tail in self._MLA and tail in prefix.rsplit(".", 1)[-1]:
                return True
        return False

    def excluded(self, prefix, shards):
        prefix = _sglang_name(prefix)
        return _same(prefix, shards, self.path) or self.layer_excluded(prefix)

    def experts(self, container, projections):
        return not self.layer_excluded(container)


class _TrtLLM(_Rules):
    """TensorRT-LLM (main-branch snapshots): `ignore`/`exclude_modules` become
    QuantConfig.exclude_modules (models/quant_config_utils.py, quantization/modelopt_config.py),
    applied by _torch/models/modeling_utils.py::apply_quant_config_exclude_modules with
    QuantConfig.is_module_excluded_from_quantization (fnmatch; newer snapshots also test each
    ancestor). A fused layer is excluded when any of its names is. lm_head takes no
    QuantConfig (DecoderModelForCausalLM.__init__)."""

    def __init__(self, qc: dict) -> None:
        self.exclude = list(qc.get("ignore", qc.get("exclude_modules")) or [])

    def excluded(self, name: str) -> bool:
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), p)
                   for i in range(len(parts), 0, -1) for p in self.exclude)

    def linear(self, fused, shards):
        return not any(self.excluded(n) for n in (fused, *shards))

    def lm_head(self, module):
        return False

    def experts(self, container, projections):
        return not self.excluded(container)


_RULES = {
    ("vllm", "compressed-tensors"): _VllmCT,
    ("sglang", "compressed-tensors"): _SglangCT,
    ("transformers", "compressed-tensors"): _TransformersCT,
    ("tensorrt-llm", "compressed-tensors"): _TrtLLM,
    ("vllm", "modelopt"): _VllmModelOpt,
    ("sglang", "modelopt"): _SglangModelOpt,
    ("tensorrt-llm", "modelopt"): _TrtLLM,
}


def _units(layout: Layout, fuse: bool) -> dict[str, list[str]]:
    """Layer the engine builds -> the checkpoint modules it loads from."""
    mods = layout.linears()
    if not fuse:
        return {m: [m] for m in mods}
    units: dict[str, list[str]] = {}
    have = set(mods)
    for m in mods:
        parent, _, leaf = m.rpartition(".")
        fused = next((f for f, shards in FUSED_LINEARS.items() if leaf in shards), None)
        if fused is None:
            units[m] = [m]
        else:
            units[f"{parent}.{fused}"] = [f"{parent}.{s}" for s in FUSED_LINEARS[fused]
                                          if f"{parent}.{s}" in have]
    return units


def built_quantized(engine: str, dialect: str, qc: dict, layout: Layout) -> dict[str, bool]:
    """Checkpoint module (or MoE container) -> whether `engine` builds it quantized from config
    `qc`. Raises Refusal where the engine rejects the config as a whole."""
    if (engine, dialect) not in _RULES:
        raise Refusal(f"{engine} has no loader for the {dialect} dialect")
    rules = _RULES[engine, dialect](qc)
    rules.lm_head_dense_only = layout.model_type in _LM_HEAD_DENSE_ONLY.get(engine, ())
    per_module = engine == "transformers"
    out: dict[str, bool] = {}
    for fused, shards in _units(layout, fuse=not per_module).items():
        q = rules.linear(fused, shards)
        out.update({s: q for s in shards})
    for m in layout.lm_head:
        out[m] = rules.lm_head(m)
    for c, kinds in layout.containers().items():
        if per_module:
            out.update({m: rules.linear(m, [m]) for m in layout.experts(c)})
        else:
            out[c] = rules.experts(c, kinds["packed"] | kinds["dense"])
    return out


def stored_quantized(layout: Layout, per_module: bool = False) -> dict[str, bool | None]:
    """Same keys as built_quantized, from what the checkpoint stores (None: a MoE layer that
    mixes packed and dense experts, which no engine builds)."""
    out: dict[str, bool | None] = {
        m: m in layout.packed for m in (*layout.linears(), *layout.lm_head)}
    for c, kinds in layout.containers().items():
        if per_module:
            out.update({m: m in layout.packed for m in layout.experts(c)})
        elif kinds["packed"] and kinds["dense"]:
            out[c] = None
        else:
            out[c] = bool(kinds["packed"])
    return out


def mismatch(engine: str, dialect: str, qc: dict, layout: Layout) -> str | None:
    """The first module `engine` would build differently from how it is stored, if any."""
    try:
        built = built_quantized(engine, dialect, qc, layout)
    except Refusal as e:
        return str(e)
    for name, stored in sorted(stored_quantized(layout, engine == "transformers").items()):
        if stored is None:
            return f"MoE layer {name} mixes packed and dense experts (one scheme per layer)"
        got = built.get(name)
        if got is None or got == stored:
            continue
        if stored:
            return f"{name} is stored packed but {engine} builds it dense"
        return f"{name} is stored dense but {engine} builds it quantized (not excluded)"
    return None


# ---- verdicts --------------------------------------------------------------------------------

@dataclass
class Verdict:
    engine: str
    status: str  # LOADS, NOTE, FAILS or UNVERIFIED
    why: str = ""


def verdicts(dialect: str, fmt: Format, qc: dict, layout: Layout, w4a4: bool) -> list[Verdict]:
    """Per engine: loads, loads with note, will not load (why) or unverified (why)."""
    return [Verdict(e, *_verdict(e, dialect, fmt, qc, layout, w4a4)) for e in ENGINES]


def _verdict(engine, dialect, fmt: Format, qc, layout, w4a4) -> tuple[str, str]:
    nvfp4 = fmt.scale is E4M3 and fmt.block_size == 16 and fmt.has_global
    mxfp4 = fmt.scale is E8M0 and fmt.block_size == 32 and not fmt.has_global
    if dialect == "native":
        if engine == "transformers":
            return NOTE, ("only with mxptq imported (mxptq.load, or `import mxptq` before "
                          "from_pretrained); plain transformers refuses it (no quant_method)")
        return FAILS, f"no {engine} loader reads mxptq's native dialect"
    if not (nvfp4 or mxfp4):
        return FAILS, (f"{fmt.name} with {fmt.scale.name} scales and block {fmt.block_size} is "
                       "not a format any engine reads")
    unscaled = sorted(layout.packed - layout.input_scaled) if w4a4 else []
    if unscaled:
        return FAILS, f"W4A4, but {unscaled[0]} has no activation scale"
    if engine == "transformers" and dialect == "modelopt":
        return NOTE, ("only with mxptq imported (mxptq.load, or `import mxptq` before "
                      "from_pretrained); transformers 5.24 has no ModelOpt loader and stops with "
                      "a size-mismatch RuntimeError")
    if engine == "sglang" and mxfp4 and any(not expert_of(m) for m in layout.packed):
        return FAILS, ("SGLang has no compressed-tensors MXFP4 scheme for dense Linear layers "
                       "('mxfp4-pack-quantized' is not in compressed_tensors/utils.py::"
                       "is_activation_quantization_format); only MoE experts")
    if (engine == "sglang" and layout.model_type in _SGLANG_DENSE_KV_B
            and any(m.endswith(".kv_b_proj") for m in layout.packed)):
        return FAILS, ("SGLang's DeepSeek loader reads kv_b_proj.weight as a dense matrix "
                       "(models/deepseek_common/deepseek_weight_loader.py::post_load_weights): "
                       "keep it dense with --ignore '*.kv_b_proj'")
    if engine == "tensorrt-llm" and layout.packed & layout.lm_head:
        return FAILS, ("TensorRT-LLM builds lm_head without a quantization config "
                       "(_torch/models/modeling_utils.py, DecoderModelForCausalLM.__init__)")
    bad = mismatch(engine, dialect, qc, layout)
    if bad:
        return FAILS, bad
    if engine == "transformers":
        if nvfp4 and any(expert_of(m) for m in layout.packed):
            return FAILS, ("transformers 5.24 loads NVFP4 experts into its fused MoE layers "
                           "without their global scale (CompressedTensorsDequantize): expert "
                           "weights come back multiplied by it")
        return NOTE, ("run it in bfloat16: compressed-tensors decompresses FP4 weights to bf16 "
                      "whatever dtype is asked for (compressors/nvfp4/base.py::decompress)")
    if engine == "tensorrt-llm":
        if dialect == "modelopt" and w4a4:
            return NOTE, "read from TensorRT-LLM main-branch source; no release was run"
        if dialect == "modelopt":
            return UNVERIFIED, ("W4A16_NVFP4 is implemented for MoE experts; no weight-only "
                                "NVFP4 method for dense Linear layers was found "
                                "(_torch/modules/linear.py::get_quant_method)")
        return UNVERIFIED, ("compressed-tensors tensor names are translated only by some model "
                            "weight mappers (checkpoints/hf/compressed_tensors.py); --dialect "
                            "modelopt is what its loaders read")
    if nvfp4 and w4a4:
        return NOTE, ("below sm100 (Hopper, Ampere) NVFP4 runs weight-only through FP4 Marlin: "
                      "activation scales are loaded but unused")
    return LOADS, ""
