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


def _conversions(dialect: Dialect) -> list:
    """Checkpoint tensor names -> PackedLinear buffers. Renames of dense keys (e.g. a kept
    layer's ModelOpt-style `weight`) fall back to the original name because no buffer matches."""
    return [
        WeightRenaming(dialect.codes_name, "codes"),
        WeightRenaming(dialect.scales_name, "scales"),
        WeightConverter(dialect.global_name, "global_scale",
                        [_Scalar(invert=dialect.global_is_decode)]),
    ]


class PackedHfQuantizer(HfQuantizer):
    """Swaps the Linear layers the checkpoint quantized for PackedLinear before loading and maps
    the dialect's tensor names onto PackedLinear's buffers; layers stored dense stay nn.Linear."""

    requires_calibration = True  # reads FP4 checkpoints; it does not quantize dense ones

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .linear import PackedLinear  # imports Triton: only once a model is loaded

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
                lin.in_features, lin.out_features, fmt, bias=lin.bias is not None,
                dtype=lin.weight.dtype, device="meta",
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        if not swapped:  # loading on would leave every quantized layer randomly initialized
            raise MxptqError(
                f"none of the checkpoint's {len(packed)} quantized modules is an nn.Linear of "
                f"{type(model).__name__}; mxptq cannot load them packed"
            )
        refuse(partner_problems(linears, swapped_names),
               getattr(getattr(model, "config", None), "name_or_path", "the checkpoint"))
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
        return _conversions(self.quantization_config.dialect())

    def is_serializable(self) -> bool:
        return False  # buffers are named codes/scales, not any dialect's names

    @property
    def is_trainable(self) -> bool:
        return False


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
    **kwargs,
) -> nn.Module:
    """Load a checkpoint mxptq wrote, any dialect, with its quantized layers as PackedLinear.

    AutoModelForCausalLM when config.json's architectures name a causal LM, else AutoModel.
    `device` goes to `device_map` ("auto", "cpu", "cuda:0", ...); `kwargs` to from_pretrained.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if Path(path).is_dir():  # index, containment, headers, layers: before transformers reads
        refuse(folder_problems(Path(path)), path)
    config = packed_config(path)
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
    return (model, info) if want_info else model
