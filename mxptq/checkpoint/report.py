"""The report written into every output folder: versions, flags, per-tensor error, timings."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from .durable import write_atomic

REPORT_NAME = "mxptq_report.json"


def json_safe(x):
    """`x` with every non-finite float as null, so the report stays strict JSON (no bare NaN or
    Infinity, which json.dumps would write and other parsers refuse)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def versions(mxptq_version: str) -> dict:
    from importlib.metadata import version

    import safetensors
    import torch

    v = {
        "mxptq": mxptq_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),  # metadata: no import of its modeling code
        "safetensors": safetensors.__version__,
    }
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
    return v


def peak_memory() -> dict:
    """Peak host RSS of this process and peak GPU memory allocated by torch, in bytes."""
    import resource

    import torch

    m = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        m["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return m


def write_report(folder: Path, plan, flags, stats, shard_seconds, seconds, device, version,
                 calibration: dict | None = None) -> dict:
    rel = sorted(r for s in stats if (r := s["rel_mse"]) is not None and math.isfinite(r))
    report = {
        "versions": versions(version),
        "flags": flags,
        "device": device,
        "format": plan.fmt.name,
        "block_size": plan.fmt.block_size,
        "scale": plan.scale,
        "dialect": plan.dialect.name,
        "plan": plan.summary(),
        "kept": {it.name: it.reason for it in plan.items if it.action == "keep"},
        "quantization_error": {  # relative MSE ||w - dequant||² / ||w||² per tensor
            "tensors": len(rel),
            "rel_mse_mean": sum(rel) / len(rel) if rel else 0.0,
            "rel_mse_max": rel[-1] if rel else 0.0,
        },
        "tensors": sorted(stats, key=lambda s: s["name"]),
        "calibration": calibration,
        "memory": peak_memory(),
        "timings": {
            "total_s": seconds,
            "shards": shard_seconds,
        },
    }
    report = json_safe(report)
    write_atomic(folder / REPORT_NAME,
                 (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return report
