"""What quantizing an already-quantized source costs: FP8 (128x128 blocks), NVFP4 and MXFP4
sources re-quantized to NVFP4 / MXFP4, against quantizing the original weights directly.

Heavy-tailed bf16 matrices (normal times a log-normal factor, like trained weights) stand for
the original model; each source is made from them, decoded exactly (mxptq.checkpoint.sources),
and quantized again. Errors are relative MSE ||w - w_hat||^2 / ||w||^2 against the original
weights, and against the decoded source (what the second quantization adds). CPU, torch
reference; about a minute.

    python -m mxptq.bench.requant [--rows 1024 --cols 4096 --seeds 4]
"""

from __future__ import annotations

import argparse

import torch

from ..checkpoint.sources import decode_fp4, decode_fp8
from ..formats import get_format
from ..tensor import dequantize, quantize_tensor

SOURCES = ("fp8 block 128", "nvfp4 absmax", "nvfp4 search", "mxfp4 absmax")
TARGETS = (("nvfp4", "search"), ("nvfp4", "absmax"), ("mxfp4", "search"))


def heavy(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return (0.02 * x * torch.exp(0.6 * torch.randn(rows, cols, generator=g))).to(torch.bfloat16)


def make_source(w: torch.Tensor, source: str) -> torch.Tensor:
    """The decoded source: what mxptq's reader hands the quantizer."""
    if source.startswith("fp8"):
        n, k = w.shape
        b = w.float().view(n // 128, 128, k // 128, 128)
        s = b.abs().amax(dim=(1, 3)) / 448
        q = (b / s[:, None, :, None]).view(n, k).to(torch.float8_e4m3fn)
        return decode_fp8(q, s, (128, 128))
    fmt, scale = source.split()
    qt = quantize_tensor(w, fmt, scale)
    return decode_fp4(qt.codes, qt.scales, qt.global_scale, qt.format)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum() / (a**2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=4)
    a = ap.parse_args()
    ws = [heavy(a.rows, a.cols, s) for s in range(a.seeds)]
    direct = {t: sum(rel(w, dequantize(quantize_tensor(w, *t))) for w in ws) / len(ws)
              for t in TARGETS}
    print("| source | source error | target | direct | from the source | added by "
          "re-quantizing | ratio to direct |")
    print("|---|---|---|---|---|---|---|")
    for src in SOURCES:
        decoded = [make_source(w, src) for w in ws]
        src_err = sum(rel(w, d) for w, d in zip(ws, decoded, strict=True)) / len(ws)
        for fmt, scale in TARGETS:
            fmt_ = get_format(fmt)
            outs = [dequantize(quantize_tensor(d, fmt_, scale)) for d in decoded]
            total = sum(rel(w, o) for w, o in zip(ws, outs, strict=True)) / len(ws)
            added = sum(rel(d, o) for d, o in zip(decoded, outs, strict=True)) / len(ws)
            print(f"| {src} | {src_err:.3e} | {fmt} {scale} | {direct[(fmt, scale)]:.3e} | "
                  f"{total:.3e} | {added:.3e} | {total / direct[(fmt, scale)]:.3f} |")


if __name__ == "__main__":
    main()
