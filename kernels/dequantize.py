"""Triton dequantizer: w = E2M1(code) · (s / g), the formula of tensor.dequantize."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxptq.tensor import QuantizedTensor

from .numerics import e2m1_value, scale_value

_TILE = 4096


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    scales_ptr,
    g_ptr,
    out_ptr,
    n_blocks,
    B: tl.constexpr,
    NB: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    blk = tl.program_id(0) * NB + tl.arange(0, NB)
    bmask = blk < n_blocks
    s = scale_value(tl.load(scales_ptr + blk, mask=bmask, other=0).to(tl.int32), MAN, BIAS)
    if HAS_GLOBAL:
        s = tl.math.div_rn(s, tl.load(g_ptr + blk * 0))
    jj = tl.arange(0, B // 2)
    m2 = bmask[:, None]
    packed = tl.load(codes_ptr + (blk.to(tl.int64)[:, None] * (B // 2) + jj[None, :]), mask=m2)
    packed = packed.to(tl.int32)
    code = tl.reshape(tl.join(packed & 15, packed >> 4), (NB, B))
    w = e2m1_value(code) * s[:, None]
    j = tl.arange(0, B)
    out = out_ptr + (blk.to(tl.int64)[:, None] * B + j[None, :])
    if OUT_BF16:  # RNE by hand on the bits (the interpreter's own bf16 cast truncates)
        bits = w.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        tl.store(out, bits.to(tl.int16), mask=m2)
    else:
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=m2)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same values as mxptq.dequantize(qt, dtype), computed on qt's device."""
    n, k = qt.shape
    fmt = qt.format
    b = fmt.block_size
    out = torch.empty((n, k), dtype=dtype, device=qt.codes.device)
    n_blocks = n * (k // b)
    if n_blocks == 0:
        return out
    scales = qt.scales.view(torch.uint8) if qt.scales.dtype != torch.uint8 else qt.scales
    g = qt.global_scale
    nb = max(1, _TILE // b)
    _dequantize_kernel[(triton.cdiv(n_blocks, nb),)](
        qt.codes.contiguous(),
        scales.contiguous(),
        g.float().reshape(1) if g is not None else scales,
        out.view(torch.int16) if dtype == torch.bfloat16 else out,
        n_blocks,
        B=b,
        NB=nb,
        MAN=fmt.scale.man_bits,
        BIAS=fmt.scale.bias,
        HAS_GLOBAL=g is not None,
        OUT_BF16=dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )
    return out
