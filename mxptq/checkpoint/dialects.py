"""On-disk dialects: tensor names, dtypes and config blocks for compressed-tensors, ModelOpt and
our native layout (docs/checkpoints.md). Each dialect maps a QuantizedTensor to named tensors
and back, so writers and readers share one definition."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import __version__
from ..errors import MxptqError
from ..formats import E4M3, E8M0, Format, get_format
from ..tensor import QuantizedTensor

DIALECTS = ("compressed-tensors", "modelopt", "native")
NATIVE_MARKER = "mxptq_dialect"  # the key that marks a native quantization_config


class Dialect:
    """Base: how one quantized Linear `P` is stored and which config describes the checkpoint."""

    name = ""
    # Tensor names per quantized Linear, after "P.": one place for the readers, the loader and
    # inspect. `marker` is the tensor whose presence says that P is quantized.
    codes_name = "weight_packed"
    scales_name = "weight_scale"
    global_name = "weight_global_scale"
    global_shape: tuple[int, ...] = (1,)
    global_is_decode = False  # stores the encode scale g; True: the decode multiplier 1/g
    marker = "weight_packed"

    def check(self, fmt: Format) -> None:
        """Raise MxptqError when this dialect cannot express `fmt`."""

    def specs(self, module: str, fmt: Format, n: int, k: int) -> dict[str, tuple[str, tuple]]:
        """Name -> (safetensors dtype, shape) of what `tensors` writes for an [n, k] weight."""
        raise NotImplementedError

    def tensors(self, module: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_w4a4(self, fmt: Format) -> None:
        """Raise MxptqError unless this dialect can store NVFP4 activation scales for `fmt`."""
        raise MxptqError(
            f"--scheme w4a4: dialect {self.name} does not store activation scales; "
            "use --dialect compressed-tensors or modelopt"
        )

    def input_specs(self, module: str) -> dict[str, tuple[str, tuple]]:
        """Name -> (dtype, shape) of the W4A4 activation scale of one Linear (none stored)."""
        return {}

    def input_tensors(self, module: str, act) -> dict[str, torch.Tensor]:
        """The W4A4 activation scale tensors of one Linear from its `ActivationScale`."""
        raise NotImplementedError

    def read(self, module: str, get: Callable[[str], torch.Tensor], fmt: Format) -> QuantizedTensor:
        raise NotImplementedError

    def config(self, fmt: Format, scale: str, ignore: list[str], w4a4: bool = False,
               targets: list[str] | None = None) -> dict:
        """config.json's quantization_config. `ignore` and `targets` come from the plan (the
        engines' rules, checkpoint/engines.py); targets default to every Linear."""
        raise NotImplementedError

    def extra_files(self, fmt: Format, ignore: list[str], w4a4: bool = False) -> dict[str, dict]:
        """Further JSON files to write next to config.json."""
        return {}

    def format_from_config(self, qc: dict) -> Format:
        raise NotImplementedError


def _packed_specs(module: str, fmt: Format, n: int, k: int) -> dict[str, tuple[str, tuple]]:
    """weight_packed U8 [n, k/2], weight_scale F8_E4M3 or U8 [n, k/B], global F32 [1]."""
    out = {
        f"{module}.weight_packed": ("U8", (n, k // 2)),
        f"{module}.weight_scale": (
            "F8_E4M3" if fmt.scale is E4M3 else "U8", (n, k // fmt.block_size)
        ),
    }
    if fmt.has_global:
        out[f"{module}.weight_global_scale"] = ("F32", (1,))
    return out


def _g1(qt: QuantizedTensor) -> torch.Tensor:
    return qt.global_scale.reshape(1).float()


def _check_nvfp4_w4a4(fmt: Format) -> None:
    if not (fmt.scale is E4M3 and fmt.block_size == 16 and fmt.has_global):
        raise MxptqError(
            f"--scheme w4a4 needs nvfp4 with block 16 (E4M3 block scales, fp32 global), "
            f"not {fmt.name} block {fmt.block_size}"
        )


class CompressedTensors(Dialect):
    """compressed-tensors `nvfp4-pack-quantized` / `mxfp4-pack-quantized`: weight-only, or
    NVFP4 W4A4 with a static `input_global_scale` per Linear."""

    name = "compressed-tensors"

    def check(self, fmt: Format) -> None:
        ok_nv = fmt.scale is E4M3 and fmt.block_size == 16 and fmt.has_global
        ok_mx = fmt.scale is E8M0 and fmt.block_size == 32 and not fmt.has_global
        if not (ok_nv or ok_mx):
            raise MxptqError(
                f"dialect compressed-tensors cannot express {fmt.name} with {fmt.scale.name} "
                f"scales and block {fmt.block_size} (only nvfp4 block 16, mxfp4 block 32); "
                "use --dialect native"
            )

    def specs(self, module, fmt, n, k):
        return _packed_specs(module, fmt, n, k)

    def tensors(self, module: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        out = {f"{module}.weight_packed": qt.codes, f"{module}.weight_scale": qt.scales}
        if qt.global_scale is not None:
            out[f"{module}.weight_global_scale"] = _g1(qt)
        return out

    def check_w4a4(self, fmt: Format) -> None:
        _check_nvfp4_w4a4(fmt)

    def input_specs(self, module):
        return {f"{module}.input_global_scale": ("F32", (1,))}

    def input_tensors(self, module, act):
        return {f"{module}.{k}": v for k, v in act.compressed_tensors().items()}

    def read(self, module, get, fmt):
        g = get(f"{module}.weight_global_scale").reshape(()).float() if fmt.has_global else None
        scales = get(f"{module}.weight_scale")
        if fmt.scale is E4M3:
            scales = scales.view(torch.float8_e4m3fn)
        return QuantizedTensor(get(f"{module}.weight_packed"), scales, g, fmt)

    @staticmethod
    def _ct_format(fmt: Format) -> str:
        return "nvfp4-pack-quantized" if fmt.has_global else "mxfp4-pack-quantized"

    def config(self, fmt, scale, ignore, w4a4=False, targets=None):
        nv = fmt.has_global
        weights = {
            "actorder": None,
            "block_structure": None,
            "dynamic": False,
            "group_size": fmt.block_size,
            "num_bits": 4,
            "observer": "memoryless_minmax",
            "observer_kwargs": {},
            "strategy": "tensor_group" if nv else "group",
            "symmetric": True,
            "type": "float",
        }
        if not nv:
            # MXFP4 needs compressed-tensors >= 0.13 anyway (the format is new there), which
            # knows scale_dtype. NVFP4 leaves it out: 0.11-0.12 (pinned by vLLM 0.11-0.13)
            # forbid unknown fields, and every reader defaults NVFP4 scales to E4M3
            # (compressors/nvfp4/base.py: `scale_dtype or torch.float8_e4m3fn`; vLLM's NVFP4
            # schemes hard-code float8_e4m3fn).
            weights.update(scale_dtype="torch.uint8", zp_dtype=None)
        acts = None
        if w4a4:  # compressed-tensors' NVFP4 preset: dynamic block scales, static global
            acts = dict(weights, dynamic="local", observer="static_minmax")
        group = {
            "format": self._ct_format(fmt),
            "input_activations": acts,
            "output_activations": None,
            "targets": list(targets or ["Linear"]),
            "weights": weights,
        }
        return {
            "config_groups": {"group_0": group},
            "format": self._ct_format(fmt),
            "global_compression_ratio": None,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        }

    def format_from_config(self, qc):
        g = qc["config_groups"]["group_0"]
        name = g.get("format") or qc.get("format")
        if name == "nvfp4-pack-quantized":
            return get_format("nvfp4")
        if name == "mxfp4-pack-quantized":
            return get_format("mxfp4")
        raise MxptqError(f"compressed-tensors format {name!r} is not an FP4 format mxptq reads")


class ModelOpt(Dialect):
    """TensorRT Model Optimizer NVFP4 export: weight-only (W4A16_NVFP4) or W4A4 (NVFP4, with a
    static `input_scale` per Linear)."""

    name = "modelopt"
    codes_name = "weight"
    global_name = "weight_scale_2"
    global_shape = ()
    global_is_decode = True
    marker = "weight_scale_2"

    def check(self, fmt: Format) -> None:
        if not (fmt.scale is E4M3 and fmt.block_size == 16 and fmt.has_global):
            raise MxptqError(
                f"dialect modelopt cannot express {fmt.name} with {fmt.scale.name} scales and "
                f"block {fmt.block_size} (only nvfp4 block 16); use --dialect native"
            )

    def specs(self, module, fmt, n, k):
        return {
            f"{module}.weight": ("U8", (n, k // 2)),
            f"{module}.weight_scale": ("F8_E4M3", (n, k // fmt.block_size)),
            f"{module}.weight_scale_2": ("F32", ()),
        }

    def check_w4a4(self, fmt: Format) -> None:
        _check_nvfp4_w4a4(fmt)

    def input_specs(self, module):
        return {f"{module}.input_scale": ("F32", ())}

    def input_tensors(self, module, act):
        return {f"{module}.{k}": v for k, v in act.modelopt().items()}

    def tensors(self, module, qt):
        return {
            f"{module}.weight": qt.codes,
            f"{module}.weight_scale": qt.scales,
            f"{module}.weight_scale_2": (1.0 / qt.global_scale.float()).reshape(()),
        }

    def read(self, module, get, fmt):
        g = 1.0 / get(f"{module}.weight_scale_2").reshape(()).float()
        scales = get(f"{module}.weight_scale").view(torch.float8_e4m3fn)
        return QuantizedTensor(get(f"{module}.weight"), scales, g, fmt)

    def _producer(self) -> dict:
        return {"name": "modelopt", "version": f"mxptq-{__version__}"}

    @staticmethod
    def _algo(w4a4: bool) -> str:
        return "NVFP4" if w4a4 else "W4A16_NVFP4"

    def config(self, fmt, scale, ignore, w4a4=False, targets=None):
        """What ModelOpt's own export/convert_hf_config.py::convert_hf_quant_config_format makes
        of our hf_quant_config.json, plus a top-level `group_size`, the only place TensorRT-LLM's
        flat-config reader looks (quantization/modelopt_config.py::_read_flat). ModelOpt
        consumers quantize every Linear and lm_head not in `ignore`, so `targets` stays."""
        w = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        group = {"input_activations": dict(w)} if w4a4 else {}
        group.update(weights=w, targets=["Linear"])
        return {
            "config_groups": {"group_0": group},
            "ignore": ignore,
            "quant_algo": self._algo(w4a4),
            "producer": self._producer(),
            "quant_method": "modelopt",
            "group_size": 16,
        }

    def extra_files(self, fmt, ignore, w4a4=False):
        return {
            "hf_quant_config.json": {
                "producer": self._producer(),
                "quantization": {
                    "quant_algo": self._algo(w4a4),
                    "kv_cache_quant_algo": None,
                    "group_size": 16,
                    "exclude_modules": ignore,
                },
            }
        }

    def format_from_config(self, qc):
        return get_format("nvfp4")


class Native(Dialect):
    """mxptq's own layout for what the others cannot express (docs/checkpoints.md)."""

    name = "native"

    def specs(self, module, fmt, n, k):
        return _packed_specs(module, fmt, n, k)

    def tensors(self, module, qt):
        return CompressedTensors().tensors(module, qt)

    def read(self, module, get, fmt):
        return CompressedTensors.read(self, module, get, fmt)

    def config(self, fmt, scale, ignore, w4a4=False, targets=None):
        """No `quant_method` on purpose: transformers then refuses the config outright
        (quantizers/auto.py::AutoHfQuantizer.supports_quant_method raises "has no
        `quant_method` attribute") instead of skipping an unknown method and initializing the
        packed layers at random; vLLM stops on the missing key too. Importing mxptq teaches
        transformers to route it to the packed loader (runtime/loader.py)."""
        return {
            NATIVE_MARKER: "native",
            "version": 2,
            "format": fmt.name,
            "scale_codec": fmt.scale.name,
            "block_size": fmt.block_size,
            "has_global": fmt.has_global,
            "mx_rule": fmt.mx_rule,
            "scale": scale,
            "targets": list(targets or ["Linear"]),
            "ignore": ignore,
            "load_with": "mxptq: `import mxptq` before from_pretrained, or mxptq.load(folder)",
        }

    def format_from_config(self, qc):
        base = qc["format"]
        return get_format(
            base,
            qc["block_size"],
            scale=qc["scale_codec"],
            has_global=qc["has_global"],
            mx_rule=qc.get("mx_rule", "floor"),
        )


_BY_NAME: dict[str, type[Dialect]] = {
    "compressed-tensors": CompressedTensors,
    "modelopt": ModelOpt,
    "native": Native,
}
_BY_METHOD = {"compressed-tensors": "compressed-tensors", "modelopt": "modelopt", "mxptq": "native"}


def get_dialect(name: str) -> Dialect:
    if name not in _BY_NAME:
        raise MxptqError(f"unknown dialect {name!r} (one of {', '.join(DIALECTS)})")
    return _BY_NAME[name]()


def default_dialect(fmt: Format) -> str:
    """compressed-tensors where it can express the format, else native."""
    try:
        CompressedTensors().check(fmt)
        return "compressed-tensors"
    except MxptqError:
        return "native"


def is_native_config(qc) -> bool:
    return isinstance(qc, dict) and qc.get(NATIVE_MARKER) == "native"


def dialect_of_config(qc: dict) -> Dialect:
    """The dialect of a quantization_config; native version 1 still carried quant_method
    "mxptq"."""
    if is_native_config(qc):
        return Native()
    method = qc.get("quant_method")
    if method not in _BY_METHOD:
        raise MxptqError(f"quant_method {method!r} is not a dialect mxptq reads")
    return get_dialect(_BY_METHOD[method])
