"""Block scale selection with block covariances (`--importance hessian`) in Triton.

The objective is the quadratic form dᵀ H_b d of mxptq.scales.block_error on the *signed* error
d = x·g − q·s, evaluated in the reference's order: t_i = tree_j(fl(H_ij·d_j)) one row i at a
time (each a [rows, B] tree sum, the building block the other kernels use), then
err = tree_i(fl(d_i·t_i)). Off-diagonal terms can be negative, so the magnitude bounds that let
the diagonal search stop early do not hold: every candidate of the selector's set is scored,
in the reference's priority order (c0, then -1, +1, -2, +2, ...), replacing the best only when
strictly better. GPTQ's column kernel calls `select_hessian` in lazy mode; `quantize_hessian`
is the quantizer's twin of tensor.quantize_reference with covariances.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mxptq import scales as S
from mxptq.formats import Format
from mxptq.scales import SELECTORS, SelectorConfig
from mxptq.tensor import QuantizedTensor, tensor_amax

from .numerics import absmax_code, e2m1_code, e2m1_value, reciprocal, scale_value, tree_sum

BLOCKS = 32  # blocks per program of the quantizer


@triton.jit
def _qf(x, y, h_ptr, hbase, s, inv_g, B: tl.constexpr):
    """dᵀ H d of blocks x [R, B] at scales s [R]; H of row r at h_ptr + hbase[r] (row-major
    B x B)."""
    q = e2m1_value(e2m1_code(x * reciprocal(s * inv_g)[:, None]))
    d = y - q * s[:, None]
    j = tl.arange(0, B)
    t = tl.zeros_like(d)
    for i in tl.static_range(B):
        hrow = tl.load(h_ptr + (hbase[:, None] + i * B + j[None, :]))
        ti = tree_sum(hrow * d, B)
        t = tl.where(j[None, :] == i, ti[:, None], t)
    return tree_sum(d * t, B)


@triton.jit
def select_hessian(
    x,
    h_ptr,
    hbase,
    g,
    inv_g,
    B: tl.constexpr,
    SEL: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MX_CEIL: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """scales.select_codes with covariances for blocks x [R, B] (fp32): chosen codes [R]."""
    bmax = tl.max(tl.abs(x), axis=1)
    y = x * g
    c = absmax_code(bmax, g, 1.0, MAN, BIAS, MAX_VALUE, MX_CEIL, FLOOR)
    if SEL == 1:  # 4over6
        c4 = absmax_code(bmax, g, 1.5, MAN, BIAS, MAX_VALUE, MX_CEIL, FLOOR)
        e6 = _qf(x, y, h_ptr, hbase, scale_value(c, MAN, BIAS), inv_g, B)
        e4 = _qf(x, y, h_ptr, hbase, scale_value(c4, MAN, BIAS), inv_g, B)
        c = tl.where(e4 < e6, c4, c)
    elif SEL >= 2:
        MIN_CODE: tl.constexpr = 1 if MAN > 0 else 0
        KNEG: tl.constexpr = -WLO if SEL == 2 else MAX_CODE
        KPOS: tl.constexpr = WHI if SEL == 2 else MAX_CODE
        KMAX: tl.constexpr = KNEG if KNEG > KPOS else KPOS
        c0 = c
        best_e = _qf(x, y, h_ptr, hbase, scale_value(c0, MAN, BIAS), inv_g, B)
        for k in range(1, KMAX + 1):
            cn = c0 - k
            if k <= KNEG:
                e = _qf(x, y, h_ptr, hbase, scale_value(tl.maximum(cn, 0), MAN, BIAS), inv_g,
                        B)
                better = (cn >= MIN_CODE) & (e < best_e)
                c = tl.where(better, cn, c)
                best_e = tl.where(better, e, best_e)
            cp = c0 + k
            if k <= KPOS:
                e = _qf(x, y, h_ptr, hbase, scale_value(tl.minimum(cp, MAX_CODE), MAN, BIAS),
                        inv_g, B)
                better = (cp <= MAX_CODE) & (e < best_e)
                c = tl.where(better, cp, c)
                best_e = tl.where(better, e, best_e)
    return c


@triton.jit
def _quantize_hessian_kernel(
    w_ptr,
    h_ptr,
    gv_ptr,
    codes_ptr,
    scales_ptr,
    n_blocks,
    kb,
    B: tl.constexpr,
    NB: tl.constexpr,
    SEL: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MX_CEIL: tl.constexpr,
    FLOOR: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * NB + tl.arange(0, NB)
    bmask = blk < n_blocks
    j = tl.arange(0, B)
    m2 = bmask[:, None]
    x = tl.load(w_ptr + (blk.to(tl.int64)[:, None] * B + j[None, :]), mask=m2, other=0.0)
    g = tl.load(gv_ptr)
    inv_g = tl.load(gv_ptr + 1)
    hbase = (tl.where(bmask, blk, 0) % kb).to(tl.int64) * (B * B)
    c = select_hessian(x, h_ptr, hbase, g, inv_g, B, SEL, WLO, WHI, MAN, BIAS, MAX_CODE,
                       MAX_VALUE, MX_CEIL, FLOOR)
    v = x * reciprocal(scale_value(c, MAN, BIAS) * inv_g)[:, None]
    lo, hi = tl.split(tl.reshape(e2m1_code(v), (NB, B // 2, 2)))
    jj = tl.arange(0, B // 2)
    out = codes_ptr + (blk.to(tl.int64)[:, None] * (B // 2) + jj[None, :])
    tl.store(out, (lo | (hi << 4)).to(tl.uint8), mask=m2)
    tl.store(scales_ptr + blk, c.to(tl.uint8), mask=bmask)


@functools.lru_cache(maxsize=64)
def options(fmt: Format, cfg: SelectorConfig) -> dict:
    """The selector's constants (shared with GPTQ's kernel)."""
    codec = fmt.scale
    window = cfg.window or (0, 0)
    return dict(
        B=fmt.block_size,
        SEL=SELECTORS.index(cfg.name),
        WLO=window[0],
        WHI=window[1],
        MAN=codec.man_bits,
        BIAS=codec.bias,
        MAX_CODE=codec.max_code,
        MAX_VALUE=codec.max_value,
        MX_CEIL=fmt.mx_rule == "ceil",
        FLOOR=cfg.underflow_floor,
    )


def quantize_hessian(
    w: torch.Tensor,
    fmt: Format,
    cfg: SelectorConfig,
    h: torch.Tensor,
    global_amax: torch.Tensor | float | None = None,
) -> QuantizedTensor:
    """Triton twin of tensor.quantize_reference with block covariances h [K/B, B, B]: same
    bytes. The global scale is computed as the reference computes it (same torch ops)."""
    n, k = w.shape
    b = fmt.block_size
    dev = w.device
    if fmt.has_global:
        amax = tensor_amax(w) if global_amax is None else torch.as_tensor(global_amax)
        g = S.global_encode_scale(amax.to(dev), cfg.global_norm)
    else:
        g = torch.ones((), dtype=torch.float32, device=dev)
    gv = torch.stack([g.reshape(()), S.reciprocal(g).reshape(())]).float()
    codes = torch.empty((n, k // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, k // b), dtype=torch.uint8, device=dev)
    n_blocks = n * (k // b)
    if n_blocks:
        _quantize_hessian_kernel[(triton.cdiv(n_blocks, BLOCKS),)](
            w.float().contiguous(), h.float().contiguous(), gv, codes, scales, n_blocks, k // b,
            NB=BLOCKS, num_warps=4, enable_fp_fusion=False, **options(fmt, cfg),
        )
    gs = g.reshape(()) if fmt.has_global else None
    return QuantizedTensor(codes, fmt.scale.to_storage(scales), gs, fmt)
