"""Load mxptq checkpoints (native, compressed-tensors, ModelOpt) into PackedLinear layers through
transformers' quantizer registration, so `from_pretrained` keeps FP4 weights packed.

Importing this module registers `quant_method: "mxptq"` (the native dialect, whose config names
no quant_method until this module supplies it) and, when transformers has no loader of that
name, `"modelopt"`. compressed-tensors checkpoints keep
transformers' own loader (it decompresses to dense) unless the caller opts in with
`packed_config(dir)` or `load(dir)`, which rewrite the config to point at this loader.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint.dialects import Dialect, dialect_of_config, is_native_config
from ..errors import MxptqError
from ..validate import (
    check_config,
    check_files,
    check_loaded,
    folder_problems,
    partner_problems,
    refuse,
)

METHOD = "mxptq"


class PackedConfig(QuantizationConfigMixin):
    """Quantization config of the packed loader; `checkpoint` is the checkpoint's own
    `quantization_config` (any dialect mxptq reads), which says the format and tensor names.

    Built by transformers from config.json (native and ModelOpt dialects), by
    `packed_config(dir)`, or empty (`PackedConfig()`) as a `from_pretrained` argument.
    """

    def __init__(self, checkpoint: dict | None = None, **config_json) -> None:
        self.quant_method = METHOD
        # from_dict passes a native/ModelOpt quantization_config as keyword arguments
        self.checkpoint = checkpoint if checkpoint is not None else (config_json or None)

    def dialect(self):
        if not self.checkpoint:
            raise MxptqError("PackedConfig has no checkpoint quantization_config to load")
        return dialect_of_config(self.checkpoint)


class _Scalar(ConversionOps):
    """A stored global scale ([1] or 0-d) as the 0-d fp32 `global_scale`; ModelOpt stores the
    decode multiplier 1/g (`weight_scale_2`), hence `invert`."""

    def __init__(self, invert: bool) -> None:
        self.invert = invert

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        t = next(iter(input_dict.values()))
        t = (t[0] if isinstance(t, list) else t).reshape(()).float()
        return {target_patterns[0]: 1.0 / t if self.invert else t}


class _StackExperts(ConversionOps):
    """Per-expert tensors (one list per source pattern, experts in order) stacked into a 3-D
    buffer [E, rows, ...]; two sources (gate, up) are joined along the rows, gate first, as
    transformers' gate_up_proj. With `scalar`, global scales ([1] or 0-d) become fp32 [E]
    (`invert`: ModelOpt's stored 1/g)."""

    def __init__(self, scalar: bool = False, invert: bool = False) -> None:
        self.scalar, self.invert = scalar, invert

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        parts = []
        for pattern in source_patterns:
            tensors = input_dict.pop(pattern, None)
            if tensors is None:
                continue
            if self.scalar:
                t = torch.stack([v.reshape(()).float() for v in tensors])
                parts.append(1.0 / t if self.invert else t)
            else:
                parts.append(torch.stack(tensors))
        return {target_patterns[0]: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)}


def _expert_conversions(dialect: Dialect, experts: dict[str, tuple[str, str, str]]) -> list:
    """Per-expert checkpoint tensors (`<ctx>.<e>.<gate|up|down leaf>.<tensor>`, after the
    renamings of `_conversions`) -> the stacked buffers of PackedExperts at `<ctx>`
    ("mlp.experts")."""
    out = []
    for ctx, (gate, up, down) in sorted({_context(n): v for n, v in experts.items()}.items()):
        for name in ("codes", "scales"):
            out.append(
                WeightConverter(
                    [f"{ctx}.*.{gate}.{name}$", f"{ctx}.*.{up}.{name}$"],
                    f"{ctx}.gate_up_{name}",
                    [_StackExperts()],
                )
            )
            out.append(
                WeightConverter(
                    [f"{ctx}.*.{down}.{name}$"], f"{ctx}.down_{name}", [_StackExperts()]
                )
            )
        op = _StackExperts(scalar=True, invert=dialect.global_is_decode)
        for leaf, dst in ((gate, "gate_global"), (up, "up_global"), (down, "down_global")):
            out.append(WeightConverter([f"{ctx}.*.{leaf}.{_GLOBAL}$"], f"{ctx}.{dst}", [op]))
    return out


def _context(module: str) -> str:
    """The last two parts of a module path ("mlp.experts"): what expert patterns match on."""
    return ".".join(module.split(".")[-2:])


# The stored global scale is first renamed to this name, so that no converter of the model
# (e.g. `mlp.experts.*.gate_proj.weight`, which transformers 5.17 matches as a prefix of
# `weight_global_scale`) takes it, then converted to `global_scale` or an expert stack.
_GLOBAL = "mxptq_global"


def _conversions(dialect: Dialect, experts: dict[str, tuple[str, str, str]]) -> list:
    """Checkpoint tensor names -> PackedLinear and PackedExperts buffers. Patterns are anchored
    at the name's end (`weight_scale` must not match ModelOpt's `weight_scale_2`, whatever
    boundary rule the transformers release applies). Renames of dense keys (e.g. a kept layer's
    ModelOpt-style `weight`) fall back to the original name because no buffer matches. Expert
    converters come first: a key takes the first converter it matches."""
    return [
        WeightRenaming(f"{dialect.codes_name}$", "codes"),
        WeightRenaming(f"{dialect.scales_name}$", "scales"),
        WeightRenaming(f"{dialect.global_name}$", _GLOBAL),
        *_expert_conversions(dialect, experts),
        WeightConverter(f"{_GLOBAL}$", "global_scale", [_Scalar(invert=dialect.global_is_decode)]),
    ]


_EXPERT_LEAVES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _packed_experts(model, packed: set[str]) -> dict[str, tuple[str, str, str]]:
    """Fused-experts modules whose every expert projection the checkpoint stores packed:
    module name -> the checkpoint's (gate, up, down) leaf names. Checkpoint names are first
    put through the model's own renamings (e.g. Mixtral's `block_sparse_moe` -> `mlp`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key

    from .experts import fused_experts_shape

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = model.base_model_prefix
    strip = re.compile(f"^{re.escape(prefix)}\\.") if prefix else None
    names = set()
    for name in packed:
        renamed = rename_source_key(name, renamings, [])[0]
        names.add(strip.sub("", renamed) if strip else renamed)
    found = {}
    for mname, mod in model.named_modules():
        if not any(p.dim() == 3 for p in mod.parameters(recurse=False)):
            continue
        base = strip.sub("", mname) if strip else mname
        pat = re.compile(f"^{re.escape(base)}\\.(\\d+)\\.(\\w+)$")
        hits = {(int(m.group(1)), m.group(2)) for n in names if (m := pat.match(n))}
        if not hits:
            continue  # stored dense: transformers' own converters load it
        shape = fused_experts_shape(mod)
        if shape is None:
            raise MxptqError(
                f"{mname}: the checkpoint stores its experts packed, but mxptq runs packed only "
                f"fused experts computed as act(x·gate) * (x·up) then ·down with [E, out, in] "
                f"weights and no bias ({type(mod).__name__} is not)"
            )
        e = shape[0]
        for leaves in _EXPERT_LEAVES:
            if hits == {(i, leaf) for i in range(e) for leaf in leaves}:
                found[mname] = leaves
                break
        else:
            raise MxptqError(
                f"{mname}: the checkpoint stores {len(hits)} of its {3 * e} expert projections "
                "packed; mxptq loads fused experts only when all of them are"
            )
    return found


class PackedHfQuantizer(HfQuantizer):
    """Swaps the Linear layers the checkpoint quantized for PackedLinear before loading and maps
    the dialect's tensor names onto PackedLinear's buffers; layers stored dense stay nn.Linear."""

    requires_calibration = True  # reads FP4 checkpoints; it does not quantize dense ones

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .experts import PackedExperts  # imports Triton: only once a model is loaded
        from .linear import PackedLinear

        # mxptq.validate: config, containment of the files, headers, every quantized layer
        fmt, packed = check_files(self.quantization_config.checkpoint, checkpoint_files or [],
                                  getattr(getattr(model, "config", None), "name_or_path", None))
        prefix = model.base_model_prefix
        swapped = 0
        linears, swapped_names = set(), set()
        for name, lin in list(model.named_modules()):
            names = {name, f"{prefix}.{name}", re.sub(f"^{re.escape(prefix)}\\.", "", name)}
            if isinstance(lin, nn.Linear):
                linears.add(name)
            if not isinstance(lin, nn.Linear) or not names & packed:
                continue
            swapped += 1
            swapped_names.add(name)
            new = PackedLinear(
                lin.in_features,
                lin.out_features,
                fmt,
                bias=lin.bias is not None,
                dtype=lin.weight.dtype,
                device="meta",
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        self._experts = _packed_experts(model, packed)
        for name in self._experts:
            old = model.get_submodule(name)
            e, h, i = old.gate_up_proj.shape[0], old.down_proj.shape[1], old.down_proj.shape[2]
            new = PackedExperts(e, h, i, old.act_fn, fmt, device="meta")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            swapped += 1
        if not swapped:  # loading on would leave every quantized layer randomly initialized
            raise MxptqError(
                f"none of the checkpoint's {len(packed)} quantized modules is an nn.Linear or "
                f"fused experts module of "
                f"{type(model).__name__}; mxptq cannot load them packed"
            )
        refuse(partner_problems(linears, swapped_names),
               getattr(getattr(model, "config", None), "name_or_path", "the checkpoint"))
        _ignore_activation_scales(model, self.quantization_config.checkpoint)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """The loaded scales themselves (mxptq.validate): a NaN or negative scale byte, a zero,
        negative or non-finite global scale, fused partners with different global scales."""
        from .linear import PackedLinear

        refuse(check_loaded({n: m.quantized() for n, m in model.named_modules()
                             if isinstance(m, PackedLinear)}),
               getattr(getattr(model, "config", None), "name_or_path", "the checkpoint"))
        return model

    def get_weight_conversions(self) -> list:
        return _conversions(self.quantization_config.dialect(), getattr(self, "_experts", {}))

    def is_serializable(self) -> bool:
        return False  # buffers are named codes/scales, not any dialect's names

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # packed layers are custom operators: generate() may compile the model


def _ignore_activation_scales(model: nn.Module, qc: dict) -> None:
    """A W4A4 checkpoint's activation scales have no parameter to load into (`load` emulates
    them from the files when asked); tell transformers so, instead of its UNEXPECTED report
    (the way transformers' own quantizer_gemma.py silences keys it handles itself)."""
    from .activations import declared_activations

    specs = dialect_of_config(qc).input_specs("M") if declared_activations(qc) else {}
    if specs:
        ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        model._keys_to_ignore_on_load_unexpected = ignored | {
            re.escape(name[len("M"):]) + "$" for name in specs}


def _register() -> None:
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(PackedConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(PackedHfQuantizer)
    # transformers 5.23 has no "modelopt"; a later one with its own loader keeps it
    if "modelopt" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("modelopt")(PackedConfig)
    _accept_native_configs()


def _accept_native_configs() -> None:
    """A native quantization_config has no quant_method so that transformers without mxptq
    refuses it (checkpoint/dialects.py, Native.config). With mxptq imported, name the method
    before transformers looks it up (quantizers/auto.py::get_hf_quantizer calls
    AutoHfQuantizer.supports_quant_method on config.json's dict, then builds the config from
    that same dict)."""
    check = AutoHfQuantizer.supports_quant_method
    if getattr(check, "_mxptq", False):
        return

    def supports_quant_method(quantization_config_dict):
        if is_native_config(quantization_config_dict):
            quantization_config_dict.setdefault("quant_method", METHOD)
        return check(quantization_config_dict)

    supports_quant_method._mxptq = True
    AutoHfQuantizer.supports_quant_method = staticmethod(supports_quant_method)


_register()


def packed_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config with its quantization_config routed to the packed loader: pass
    it as `from_pretrained(path, config=packed_config(path))` to load a compressed-tensors
    checkpoint packed instead of through transformers' dense decompression."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MxptqError(f"{path}: cannot read its config.json ({e})") from e
    qc = getattr(config, "quantization_config", None)
    if not qc:
        raise MxptqError(f"{path}: config.json has no quantization_config")
    qc = dict(qc) if not isinstance(qc, dict) else qc
    if qc.get("quant_method") != METHOD or "checkpoint" not in qc:
        qc = {"quant_method": METHOD, "checkpoint": qc}
    refuse(check_config(qc["checkpoint"])[2], path)  # raises for a dialect mxptq does not read
    config.quantization_config = qc
    return config


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = "auto",
    emulate_activations: bool = False,
    **kwargs,
) -> nn.Module:
    """Load a checkpoint mxptq wrote, any dialect, with its quantized layers as PackedLinear.

    AutoModelForCausalLM when config.json's architectures name a causal LM, else AutoModel.
    `device` goes to `device_map` ("auto", "cpu", "cuda:0", ...); `kwargs` to from_pretrained.
    A W4A4 checkpoint computes with unquantized activations (as Hopper's W4A16 kernels serve
    it; a warning says so) unless `emulate_activations`: then every declared input is
    quantized as FP4 hardware does (runtime/activations.py), and `model.mxptq_input_quant`
    holds what was emulated.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if Path(path).is_dir():  # index, containment, headers, layers: before transformers reads
        refuse(folder_problems(Path(path)), path)
    config = packed_config(path)
    checkpoint = config.quantization_config["checkpoint"]  # the dialect's own config
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    auto = AutoModelForCausalLM if set(config.architectures or ()) & causal else AutoModel
    want_info = kwargs.pop("output_loading_info", False)
    model, info = auto.from_pretrained(path, config=config, dtype=dtype, device_map=device,
                                       output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or []) + sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if missing:  # transformers would leave them randomly initialised
        raise MxptqError(f"{path}: {len(missing)} weights the model needs are missing from the "
                         f"checkpoint or do not fit it (e.g. {missing[0]}); it is incomplete")
    _activations(model, path, checkpoint, emulate_activations)
    return (model, info) if want_info else model


def _activations(model: nn.Module, path: str | Path, qc: dict, emulate: bool) -> None:
    """Emulate the W4A4 activations `qc` declares, or warn that they are not quantized."""
    from .activations import attach_input_quant, declared_activations, read_input_quant

    if not declared_activations(qc):
        return
    if not emulate:
        warnings.warn(f"{path}: the checkpoint declares W4A4 activations; this model computes "
                      "with unquantized activations, as Hopper's W4A16 kernels serve it "
                      "(load(..., emulate_activations=True) quantizes them as FP4 hardware "
                      "does)", stacklevel=3)
        return
    iq = read_input_quant(path)
    attach_input_quant(model, iq)
    model.mxptq_input_quant = iq
