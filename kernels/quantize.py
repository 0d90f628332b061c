"""One-pass Triton quantizer: block max, scale selection, E2M1 rounding and packing.

A program owns NB consecutive blocks of B weights (blocks are contiguous in a row-major [N, K]
weight, so the whole tensor is a flat list of blocks). Every step repeats the fp32 operations of
mxptq.scales in the same order; docs/kernels.md explains the search loop and its pruning.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxptq.formats import Format
from mxptq.scales import SELECTORS, SelectorConfig
from mxptq.tensor import QuantizedTensor

from .amax import amax_partials
from .numerics import (
    absmax_code,
    e2m1_code,
    e2m1_round,
    reciprocal,
    scale_value,
    tree_sum,
    widen,
)

# (weights per program, warps) per selector: memory-bound selectors take larger tiles.
DEFAULT_CONFIG = {
    "absmax": (4096, 4),
    "4over6": (2048, 4),
    "search": (2048, 4),
    "exhaustive": (1024, 4),
}


@triton.jit
def _err(a, ay, hh, yyh, s, inv_g, B: tl.constexpr, HAS_H: tl.constexpr, BOUND: tl.constexpr):
    """Block error at scales s [NB] (scales.block_error on magnitudes: |d| is sign-free), and
    a lower bound on the error of every candidate on the same side (0 if BOUND == 0):
    BOUND=1 (larger scales): the tree sum of y²h over elements with |y| <= s/4;
    BOUND=-1 (smaller scales): the tree sum of (|y| - 6s)_+² h."""
    q = e2m1_round(a * reciprocal(s * inv_g)[:, None])
    d = ay - q * s[:, None]
    sq = d * d
    if HAS_H:
        sq = sq * hh
    err = tree_sum(sq, B)
    if BOUND == 1:
        lb = tree_sum(tl.where(ay <= (0.25 * s)[:, None], yyh, 0.0), B)
    elif BOUND == -1:
        c = tl.maximum(ay - (6.0 * s)[:, None], 0.0)
        lb = tree_sum((c * c) * hh, B)
    else:
        lb = tl.zeros_like(err)  # errors are >= 0 (or NaN, which never wins)
    return err, lb


@triton.jit
def _quantize_kernel(
    w_ptr,
    h_ptr,
    amax_ptr,
    codes_ptr,
    scales_ptr,
    g_ptr,
    n_blocks,
    kb,
    n_amax,
    global_c,
    B: tl.constexpr,
    NB: tl.constexpr,
    AMAX_P: tl.constexpr,
    SEL: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MX_CEIL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_H: tl.constexpr,
    FLOOR: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * NB + tl.arange(0, NB)
    bmask = blk < n_blocks
    j = tl.arange(0, B)
    m2 = bmask[:, None]
    x = tl.load(w_ptr + (blk.to(tl.int64)[:, None] * B + j[None, :]), mask=m2, other=0)
    x = widen(x, BF16_BITS)

    if HAS_GLOBAL:  # scales.global_encode_scale from the amax partials, then its reciprocal
        p = tl.arange(0, AMAX_P)
        am = tl.full((1,), 0.0, tl.float32) + tl.max(tl.load(amax_ptr + p, mask=p < n_amax), 0)
        g = reciprocal(am) * global_c
        finite = (g.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
        g = tl.where(finite & (am > 0.0), g, 1.0)
        inv_g = reciprocal(g)
        tl.store(g_ptr + tl.arange(0, 1), g, mask=pid == 0)
        g = tl.max(g, axis=0)
        inv_g = tl.max(inv_g, axis=0)
    else:
        g = 1.0
        inv_g = 1.0

    a = tl.abs(x)
    bmax = tl.max(a, axis=1)
    ay = a * g
    c = absmax_code(bmax, g, 1.0, MAN, BIAS, MAX_VALUE, MX_CEIL, FLOOR)
    if SEL > 0:
        if HAS_H:
            kk = (blk % kb)[:, None] * B + j[None, :]
            hh = tl.load(h_ptr + kk, mask=m2, other=0.0)
        else:
            hh = a
        if SEL == 1:  # 4over6: the scale-to-4 candidate replaces c6 only when strictly better
            c4 = absmax_code(bmax, g, 1.5, MAN, BIAS, MAX_VALUE, MX_CEIL, FLOOR)
            e6, _ = _err(a, ay, hh, ay, scale_value(c, MAN, BIAS), inv_g, B, HAS_H, 0)
            e4, _ = _err(a, ay, hh, ay, scale_value(c4, MAN, BIAS), inv_g, B, HAS_H, 0)
            c = tl.where(e4 < e6, c4, c)
        elif SEL == 2:
            c = _window(a, ay, hh, c, inv_g, B, WLO, WHI, MAN, BIAS, MAX_CODE, HAS_H)
        else:
            c = _exhaustive(a, ay, hh, bmax * g, c, inv_g, bmask, B, MAN, BIAS, MAX_CODE, HAS_H)

    v = x * reciprocal(scale_value(c, MAN, BIAS) * inv_g)[:, None]
    lo, hi = tl.split(tl.reshape(e2m1_code(v), (NB, B // 2, 2)))
    jj = tl.arange(0, B // 2)
    out = codes_ptr + (blk.to(tl.int64)[:, None] * (B // 2) + jj[None, :])
    tl.store(out, (lo | (hi << 4)).to(tl.uint8), mask=m2)
    tl.store(scales_ptr + blk, c.to(tl.uint8), mask=bmask)


@triton.jit
def _try(
    a,
    ay,
    hh,
    c,
    inv_g,
    best_c,
    best_e,
    B: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    HAS_H: tl.constexpr,
):
    """One candidate code per block: replaces the best where valid and strictly better."""
    MIN_CODE: tl.constexpr = 1 if MAN > 0 else 0
    s = scale_value(tl.minimum(tl.maximum(c, 0), MAX_CODE), MAN, BIAS)
    e, _ = _err(a, ay, hh, ay, s, inv_g, B, HAS_H, 0)
    better = (c >= MIN_CODE) & (c <= MAX_CODE) & (e < best_e)
    return tl.where(better, c, best_c), tl.where(better, e, best_e)


@triton.jit
def _window(
    a,
    ay,
    hh,
    c0,
    inv_g,
    B: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    HAS_H: tl.constexpr,
):
    """search: the window is a compile-time constant, so the loop over offsets (-k, then +k)
    is unrolled and runs without branches or tile-wide reductions."""
    best_c = c0
    best_e, _ = _err(a, ay, hh, ay, scale_value(c0, MAN, BIAS), inv_g, B, HAS_H, 0)
    for k in tl.static_range(1, max(-WLO, WHI) + 1):
        if k <= -WLO:
            best_c, best_e = _try(
                a, ay, hh, c0 - k, inv_g, best_c, best_e, B, MAN, BIAS, MAX_CODE, HAS_H
            )
        if k <= WHI:
            best_c, best_e = _try(
                a, ay, hh, c0 + k, inv_g, best_c, best_e, B, MAN, BIAS, MAX_CODE, HAS_H
            )
    return best_c


@triton.jit
def _exhaustive(
    a,
    ay,
    hh,
    ymax,
    c0,
    inv_g,
    bmask,
    B: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    HAS_H: tl.constexpr,
):
    """exhaustive: offsets -k then +k for k = 1, 2, ..., each replacing the best only when
    strictly better; a side of a block stops once a lower bound proves that none of its
    remaining candidates can be strictly better (docs/kernels.md has the proof)."""
    MIN_CODE: tl.constexpr = 1 if MAN > 0 else 0
    best_c = c0
    best_e, _ = _err(a, ay, hh, ay, scale_value(c0, MAN, BIAS), inv_g, B, HAS_H, 0)
    kneg = c0 - MIN_CODE
    kpos = MAX_CODE - c0
    yy = ay * ay
    if HAS_H:
        yyh = yy * hh
        h_max = tl.max(tl.where(ay == ymax[:, None], hh, 0.0), axis=1)
    else:
        yyh = yy
        h_max = ymax * 0.0 + 1.0
    neg_done = (kneg < 1) | ~bmask
    pos_done = (kpos < 1) | ~bmask
    k = 1
    more = tl.max((~(neg_done & pos_done)).to(tl.int32), axis=0)
    while more > 0:
        # Smaller scale c0 - k: the max element clips to 6s, so its leaf is >= (ymax - 6s)²h.
        cn = c0 - k
        sn = scale_value(tl.maximum(cn, 0), MAN, BIAS)
        dn = tl.maximum(ymax - 6.0 * sn, 0.0)
        neg_done = neg_done | (k > kneg) | ((dn * dn) * h_max >= best_e)
        if tl.max((~neg_done).to(tl.int32), axis=0) > 0:
            e, lb = _err(a, ay, hh, yyh, sn, inv_g, B, HAS_H, -1 if HAS_H else 0)
            better = ~neg_done & (e < best_e)
            best_c = tl.where(better, cn, best_c)
            best_e = tl.where(better, e, best_e)
            neg_done = neg_done | (lb >= best_e)
        # Larger scale c0 + k: elements with |y| <= s/4 cost at least y²h at any larger scale.
        cp = c0 + k
        pos_done = pos_done | (k > kpos)
        if tl.max((~pos_done).to(tl.int32), axis=0) > 0:
            sp = scale_value(tl.minimum(cp, MAX_CODE), MAN, BIAS)
            e, lb = _err(a, ay, hh, yyh, sp, inv_g, B, HAS_H, 1)
            better = ~pos_done & (e < best_e)
            best_c = tl.where(better, cp, best_c)
            best_e = tl.where(better, e, best_e)
            pos_done = pos_done | (lb >= best_e)
        k += 1
        more = tl.max((~(neg_done & pos_done)).to(tl.int32), axis=0)
    return best_c


def _global_partials(w: torch.Tensor, global_amax) -> torch.Tensor:
    """fp32 values whose max is the amax the reference uses (tensor.tensor_amax or the given)."""
    if global_amax is None:
        return amax_partials(w)
    return torch.as_tensor(global_amax).to(w.device).float().reshape(1)


def quantize(
    w: torch.Tensor,
    fmt: Format,
    cfg: SelectorConfig,
    h: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
    config: tuple[int, int] | None = None,
) -> QuantizedTensor:
    """Triton twin of tensor.quantize_reference: same bytes. `config` = (weights per program,
    warps) overrides the default tile for tuning."""
    n, k = w.shape
    b = fmt.block_size
    w = w.contiguous()
    bf16 = w.dtype == torch.bfloat16
    dev = w.device
    codes = torch.empty((n, k // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, k // b), dtype=torch.uint8, device=dev)
    g = torch.ones((), dtype=torch.float32, device=dev) if fmt.has_global else None
    n_blocks = n * (k // b)
    if n_blocks == 0:
        return QuantizedTensor(codes, fmt.scale.to_storage(scales), g, fmt)
    partials = _global_partials(w, global_amax) if fmt.has_global else scales
    tile, warps = config or DEFAULT_CONFIG[cfg.name]
    nb = max(1, tile // b)
    window = cfg.window or (0, 0)
    codec = fmt.scale
    _quantize_kernel[(triton.cdiv(n_blocks, nb),)](
        w.view(torch.int16) if bf16 else w,
        h if h is not None else w,
        partials,
        codes,
        scales,
        g if g is not None else scales,
        n_blocks,
        k // b,
        partials.numel(),
        float(cfg.global_norm or 1.0) * 6.0,
        B=b,
        NB=nb,
        AMAX_P=triton.next_power_of_2(partials.numel()),
        SEL=SELECTORS.index(cfg.name),
        WLO=window[0],
        WHI=window[1],
        MAN=codec.man_bits,
        BIAS=codec.bias,
        MAX_CODE=codec.max_code,
        MAX_VALUE=codec.max_value,
        MX_CEIL=fmt.mx_rule == "ceil",
        HAS_GLOBAL=fmt.has_global,
        HAS_H=h is not None,
        FLOOR=cfg.underflow_floor,
        BF16_BITS=bf16,
        num_warps=warps,
        enable_fp_fusion=False,
    )
    return QuantizedTensor(codes, codec.to_storage(scales), g, fmt)
