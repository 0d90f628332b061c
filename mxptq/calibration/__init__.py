"""Calibration: text in, per-Linear statistics out, and the algorithms that use them
(importance-weighted scale selection, GPTQ, W4A4 activation scales)."""

from .activations import (
    ActivationScale,
    activation_scales,
    attach_activation_fake_quant,
    fake_quantize_activation,
)
from .apply import (
    IMPORTANCE,
    CalibOptions,
    fused_groups,
    importance_of,
    model_names,
    quantize_layer,
    quantize_linear,
)
from .data import load_calibration, load_text
from .generate import generate_windows
from .gptq import GPTQResult, gptq_quantize
from .runner import CalibrationResult, LayerRun, calibrate
from .stats import LinearStats

__all__ = [
    "IMPORTANCE",
    "ActivationScale",
    "CalibOptions",
    "CalibrationResult",
    "GPTQResult",
    "LayerRun",
    "LinearStats",
    "activation_scales",
    "attach_activation_fake_quant",
    "calibrate",
    "fake_quantize_activation",
    "fused_groups",
    "generate_windows",
    "gptq_quantize",
    "importance_of",
    "load_calibration",
    "load_text",
    "model_names",
    "quantize_layer",
    "quantize_linear",
]
