"""Shared helpers for the quantize tests: models, the CLI in-process, dense references."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from real_assets import english_documents, minilm_dir, tiny_llama_dir  # noqa: F401

from mxptq.checkpoint import read_checkpoint
from mxptq.tensor import dequantize

# (format name, block size, scale codec override): every case the runtime kernels take
KERNEL_FORMATS = [
    ("nvfp4", 4, None),
    ("nvfp4", 8, None),
    ("nvfp4", 16, None),
    ("nvfp4", 32, None),
    ("nvfp4", 64, None),
    ("nvfp4", 128, None),
    ("nvfp4-ue5m3", 16, None),
    ("nvfp4-ue5m3", 64, None),
    ("nvfp4-ue5m3", 16, "ue5m3-ieee"),
    ("mxfp4", 4, None),
    ("mxfp4", 32, None),
    ("mxfp4", 128, None),
]


def quantize(model: Path, out: Path, *args: str) -> None:
    """Run `mxptq quantize` in-process; fail the test with its output otherwise."""
    from typer.testing import CliRunner

    from mxptq.cli import app

    r = CliRunner().invoke(app, ["quantize", "--model", str(model), "--out", str(out), *args])
    assert r.exit_code == 0, r.output + (r.stderr if hasattr(r, "stderr") else "")


_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)$")
_MOE_NAMES = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
              "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
              "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


def dense_state(model: torch.nn.Module, qdir: Path, dtype=torch.bfloat16) -> dict:
    """The model's state dict with every quantized Linear replaced by our dequantize of the
    bytes in `qdir`; per-expert modules are assembled into fused 3-D expert tensors."""
    sd = model.state_dict()
    q = read_checkpoint(qdir)
    for mod, qt in q.items():
        w = dequantize(qt).to(dtype)
        if f"{mod}.weight" in sd:
            sd[f"{mod}.weight"] = w
            continue
        m = _EXPERT.match(mod)
        assert m, f"no place for {mod} in the model"
        parent, e, leaf = m.group(1), int(m.group(2)), m.group(3)
        parent = parent.replace("block_sparse_moe", "mlp")
        pname, half = _MOE_NAMES[leaf]
        key = f"{parent}.experts.{pname}"
        assert key in sd, key
        t = sd[key]
        if half is None:
            t[e] = w
        else:
            rows = t.shape[1] // 2
            t[e, half * rows : (half + 1) * rows] = w
    return sd
