"""One-pass Triton quantizer: block max, scale selection, E2M1 rounding and packing.

A program owns NB consecutive blocks of B weights (blocks are contiguous in a row-major [N, K]
weight, so the whole tensor is a flat list of blocks). Every step repeats the fp32 operations of
mxptq.scales in the same order; docs/kernels.md explains the search loop and its pruning.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mxptq.formats import Format
from mxptq.scales import SELECTORS, SelectorConfig, exact_window
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

# (weights per program, warps) per selector, from H100 sweeps (docs/kernels.md): the
# memory-bound selectors take large tiles; the search loops small ones, since a tile runs
# until its slowest block is done.
DEFAULT_CONFIG = {
    "absmax": (4096, 4),
    "4over6": (2048, 4),
    "search": (512, 1),
    "exhaustive": (512, 1),
}


@triton.jit
def _or(x, y):
    return x | y


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
def select_tile(
    x,
    hh,
    g,
    inv_g,
    bmask,
    B: tl.constexpr,
    SEL: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MX_CEIL: tl.constexpr,
    HAS_H: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """scales.select_codes for a tile of blocks x [NB, B] (fp32): the chosen scale codes
    (int32 [NB]). `hh` [NB, B] are the importance weights when HAS_H; GPTQ's kernel shares
    this step, so both pick the reference's codes."""
    a = tl.abs(x)
    bmax = tl.max(a, axis=1)
    ay = a * g
    c = absmax_code(bmax, g, 1.0, MAN, BIAS, MAX_VALUE, MX_CEIL, FLOOR)
    if SEL > 0:
        if not HAS_H:
            hh = a
        if SEL == 1:  # 4over6: the scale-to-4 candidate replaces c6 only when strictly better
            c4 = absmax_code(bmax, g, 1.5, MAN, BIAS, MAX_VALUE, MX_CEIL, FLOOR)
            e6, _ = _err(a, ay, hh, ay, scale_value(c, MAN, BIAS), inv_g, B, HAS_H, 0)
            e4, _ = _err(a, ay, hh, ay, scale_value(c4, MAN, BIAS), inv_g, B, HAS_H, 0)
            c = tl.where(e4 < e6, c4, c)
        elif SEL == 3 and WHI > 0:  # exhaustive by the certified window
            c = _window_search(
                a, ay, hh, bmax * g, c, inv_g, bmask, B, WLO, WHI, MAN, BIAS, MAX_CODE, HAS_H
            )
        else:
            c = _search(
                a, ay, hh, bmax * g, c, inv_g, bmask, B, SEL, WLO, WHI, MAN, BIAS, MAX_CODE, HAS_H
            )
    return c


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
        one = tl.arange(0, 1)
        tl.store(g_ptr + one, g, mask=(one + pid) == 0)  # a block mask: triton 3.9 wants one
        g = tl.max(g, axis=0)
        inv_g = tl.max(inv_g, axis=0)
    else:
        g = 1.0
        inv_g = 1.0

    if HAS_H and SEL > 0:
        kk = (blk % kb)[:, None] * B + j[None, :]
        hh = tl.load(h_ptr + kk, mask=m2, other=0.0)
    else:
        hh = x  # unread
    c = select_tile(
        x, hh, g, inv_g, bmask, B, SEL, WLO, WHI, MAN, BIAS, MAX_CODE, MAX_VALUE, MX_CEIL, HAS_H,
        FLOOR,
    )

    v = x * reciprocal(scale_value(c, MAN, BIAS) * inv_g)[:, None]
    lo, hi = tl.split(tl.reshape(e2m1_code(v), (NB, B // 2, 2)))
    jj = tl.arange(0, B // 2)
    out = codes_ptr + (blk.to(tl.int64)[:, None] * (B // 2) + jj[None, :])
    tl.store(out, (lo | (hi << 4)).to(tl.uint8), mask=m2)
    tl.store(scales_ptr + blk, c.to(tl.uint8), mask=bmask)


@triton.jit
def _search(
    a,
    ay,
    hh,
    ymax,
    c0,
    inv_g,
    bmask,
    B: tl.constexpr,
    SEL: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    HAS_H: tl.constexpr,
):
    """search (SEL 2, offsets WLO..WHI) and exhaustive (SEL 3, every code): offsets -k then +k
    for k = 1, 2, ..., each replacing the best only when strictly better; a side of a block
    stops once a lower bound proves that none of its remaining candidates can be strictly
    better (docs/kernels.md has the proof). The window bounds search's sides, so it skips the
    per-element bounds, which cost more there than they save."""
    MIN_CODE: tl.constexpr = 1 if MAN > 0 else 0
    best_c = c0
    best_e, _ = _err(a, ay, hh, ay, scale_value(c0, MAN, BIAS), inv_g, B, HAS_H, 0)
    kneg = c0 - MIN_CODE
    kpos = MAX_CODE - c0
    if SEL == 2:
        kneg = tl.minimum(kneg, -WLO)
        kpos = tl.minimum(kpos, WHI)
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
    busy = 3
    while busy > 0:
        # Smaller scale c0 - k: the max element clips to 6s, so its leaf is >= (ymax - 6s)²h.
        cn = c0 - k
        sn = scale_value(tl.maximum(cn, 0), MAN, BIAS)
        dn = tl.maximum(ymax - 6.0 * sn, 0.0)
        neg_done = neg_done | (k > kneg) | ((dn * dn) * h_max >= best_e)
        pos_done = pos_done | (k > kpos)
        # One tile-wide reduction per step: bit 0 = some block still tries -k, bit 1 = +k.
        busy = tl.reduce((~neg_done).to(tl.int32) | ((~pos_done).to(tl.int32) << 1), 0, _or)
        if (busy & 1) > 0:
            e, lb = _err(a, ay, hh, yyh, sn, inv_g, B, HAS_H, -1 if HAS_H and SEL == 3 else 0)
            better = ~neg_done & (e < best_e)
            best_c = tl.where(better, cn, best_c)
            best_e = tl.where(better, e, best_e)
            neg_done = neg_done | (lb >= best_e)
        # Larger scale c0 + k: elements with |y| <= s/4 cost at least y²h at any larger scale.
        cp = c0 + k
        if (busy & 2) > 0:
            sp = scale_value(tl.minimum(cp, MAX_CODE), MAN, BIAS)
            e, lb = _err(a, ay, hh, yyh, sp, inv_g, B, HAS_H, 1 if SEL == 3 else 0)
            better = ~pos_done & (e < best_e)
            best_c = tl.where(better, cp, best_c)
            best_e = tl.where(better, e, best_e)
            pos_done = pos_done | (lb >= best_e)
        k += 1
    return best_c


@triton.jit
def _doubling_safe(a, ay, s, inv_g):
    """scales.doubling_safe for a tile: no element's t = |x|·inv at scale s [NB] lies within
    NEAR_ULPS (64) ulps of a 3-significant-bit value with y/s on its other side, no t >= 6.5,
    and s/g in [2^-100, 2^90]."""
    r = s * inv_g
    t = a * reciprocal(r)[:, None]
    bits = t.to(tl.int32, bitcast=True)
    low = bits & 0x1FFFFF
    near = (low < 64) | (low > 0x200000 - 64)
    big = t >= 6.5
    hot = tl.max((big | ((t >= 0.2) & near)).to(tl.int32), axis=1)
    if tl.max(hot, axis=0) > 0:  # rare: only then is the side of y/s worth computing
        m3 = ((bits + 0x100000) & ~0x1FFFFF).to(tl.float32, bitcast=True)
        ms = m3 * s[:, None]
        across = ((t < m3) & (ay > ms)) | ((t > m3) & (ay < ms))
        hot = tl.max((big | ((t >= 0.2) & near & across)).to(tl.int32), axis=1)
    ok = (r >= 7.888609052210118e-31) & (r <= 1.2379400392853803e27)  # 2^-100, 2^90
    return ok & (hot == 0)


@triton.jit
def _window_search(
    a,
    ay,
    hh,
    ymax,
    c0,
    inv_g,
    bmask,
    B: tl.constexpr,
    WLO: tl.constexpr,
    WHI: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    HAS_H: tl.constexpr,
):
    """exhaustive as scales.exhaustive_by_window: offsets WLO..WHI in priority order for every
    block with no bounds and no tile-wide reductions, then the certificate (one bound per
    side, docs/kernels.md "Candidate window"); only a tile with an uncertified block runs the
    pruned full search, for those blocks alone."""
    MIN_CODE: tl.constexpr = 1 if MAN > 0 else 0
    best_c = c0
    best_e, _ = _err(a, ay, hh, ay, scale_value(c0, MAN, BIAS), inv_g, B, HAS_H, 0)
    KMAX: tl.constexpr = -WLO if -WLO > WHI else WHI
    for k in tl.static_range(1, KMAX + 1):
        if k <= -WLO:
            cn = c0 - k
            sn = scale_value(tl.maximum(cn, 0), MAN, BIAS)
            e, _ = _err(a, ay, hh, ay, sn, inv_g, B, HAS_H, 0)
            better = (cn >= MIN_CODE) & (e < best_e)
            best_c = tl.where(better, cn, best_c)
            best_e = tl.where(better, e, best_e)
        if k <= WHI:
            cp = c0 + k
            sp = scale_value(tl.minimum(cp, MAX_CODE), MAN, BIAS)
            e, _ = _err(a, ay, hh, ay, sp, inv_g, B, HAS_H, 0)
            better = (cp <= MAX_CODE) & (e < best_e)
            best_c = tl.where(better, cp, best_c)
            best_e = tl.where(better, e, best_e)
    # Below the window every element above 6s clips: each code under c0 + WLO costs at least
    # the tree of (y - 6s)+²h at s = S[c0 + WLO - 1].
    cn = c0 + (WLO - 1)
    dn = tl.maximum(ay - (6.0 * scale_value(tl.maximum(cn, 0), MAN, BIAS))[:, None], 0.0)
    dd = dn * dn
    if HAS_H:
        dd = dd * hh
    lbn = tree_sum(dd, B)
    neg = (cn < MIN_CODE) | (lbn > best_e) | ((lbn >= best_e) & (best_c - c0 <= -WLO))
    # Above it the elements with y <= s/4 cost >= y²h at every code from c0 + WHI + 1 up.
    cp = c0 + (WHI + 1)
    sp = scale_value(tl.minimum(cp, MAX_CODE), MAN, BIAS)
    yyh = ay * ay
    if HAS_H:
        yyh = yyh * hh
    lbp = tree_sum(tl.where(ay <= (0.25 * sp)[:, None], yyh, 0.0), B)
    # Or every code above is a doubling of a window code none of whose t is near a midpoint.
    PER: tl.constexpr = 1 << MAN
    dbl = c0 == c0  # all true
    for f in tl.static_range(WHI + 1 - PER, WHI + 1):
        c = c0 + f
        normal = (c >= PER) if MAN > 0 else (c >= 0)
        safe = _doubling_safe(a, ay, scale_value(tl.maximum(c, 0), MAN, BIAS), inv_g)
        dbl = dbl & ((c + PER > MAX_CODE) | (normal & safe))
    pos = (cp > MAX_CODE) | (lbp >= best_e) | dbl
    open_ = bmask & ~(neg & pos)
    if tl.max(open_.to(tl.int32), axis=0) > 0:
        full = _search(a, ay, hh, ymax, c0, inv_g, open_, B, 3, 0, 0, MAN, BIAS, MAX_CODE, HAS_H)
        best_c = tl.where(open_, full, best_c)
    return best_c


# The default exact path is the pruned full search: on the H200 it measured 42.5-43.2 G
# weights/s against the certified window's 38.1 (docs/kernels.md); both give the same bytes.
EXACT_PATHS = ("pruned", "window")


def exact_window_options(
    fmt: Format, cfg: SelectorConfig, path: str, has_h: bool
) -> tuple[int, int]:
    """(WLO, WHI) for the kernels: search's window, exhaustive's certified window (scales.
    exact_window) or, for path="pruned", (0, 0), which makes exhaustive run the pruned full
    search alone. Both paths give the same bytes."""
    if path not in EXACT_PATHS:
        raise ValueError(f"unknown exact path {path!r} (one of {', '.join(EXACT_PATHS)})")
    if cfg.name == "search":
        return cfg.window or (0, 0)
    if cfg.name == "exhaustive" and path == "window":
        return exact_window(fmt, has_h)
    return (0, 0)


def _global_partials(w: torch.Tensor, global_amax) -> torch.Tensor:
    """fp32 values whose max is the amax the reference uses (tensor.tensor_amax or the given)."""
    if global_amax is None:
        return amax_partials(w)
    return torch.as_tensor(global_amax).to(w.device).float().reshape(1)


@functools.lru_cache(maxsize=256)
def _launch_options(
    fmt: Format,
    cfg: SelectorConfig,
    bf16: bool,
    has_h: bool,
    n_amax: int,
    config,
    path: str = "pruned",
) -> tuple[int, dict]:
    """(blocks per program, kernel keywords) for one case, cached to keep launches cheap."""
    tile, warps = config or DEFAULT_CONFIG[cfg.name]
    nb = max(1, tile // fmt.block_size)
    window = exact_window_options(fmt, cfg, path, has_h)
    codec = fmt.scale
    return nb, dict(
        B=fmt.block_size,
        NB=nb,
        AMAX_P=triton.next_power_of_2(n_amax),
        SEL=SELECTORS.index(cfg.name),
        WLO=window[0],
        WHI=window[1],
        MAN=codec.man_bits,
        BIAS=codec.bias,
        MAX_CODE=codec.max_code,
        MAX_VALUE=codec.max_value,
        MX_CEIL=fmt.mx_rule == "ceil",
        HAS_GLOBAL=fmt.has_global,
        HAS_H=has_h,
        FLOOR=cfg.underflow_floor,
        BF16_BITS=bf16,
        num_warps=warps,
        enable_fp_fusion=False,
    )


def quantize(
    w: torch.Tensor,
    fmt: Format,
    cfg: SelectorConfig,
    h: torch.Tensor | None = None,
    global_amax: torch.Tensor | float | None = None,
    config: tuple[int, int] | None = None,
    path: str = "pruned",
) -> QuantizedTensor:
    """Triton twin of tensor.quantize_reference: same bytes. `config` = (weights per program,
    warps) overrides the default tile for tuning; `path` picks exhaustive's exact path
    ("pruned", the default: the pruned full search alone; "window": the certified window,
    slower on the H200)."""
    n, k = w.shape
    b = fmt.block_size
    w = w.contiguous()
    dev = w.device
    codes = torch.empty((n, k // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, k // b), dtype=torch.uint8, device=dev)
    n_blocks = n * (k // b)
    if n_blocks == 0:
        g = torch.ones((), dtype=torch.float32, device=dev) if fmt.has_global else None
        return QuantizedTensor(codes, fmt.scale.to_storage(scales), g, fmt)
    g = torch.empty((), dtype=torch.float32, device=dev) if fmt.has_global else None
    partials = _global_partials(w, global_amax) if fmt.has_global else scales
    bf16 = w.dtype == torch.bfloat16
    nb, opts = _launch_options(fmt, cfg, bf16, h is not None, partials.numel(), config, path)
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
        **opts,
    )
    return QuantizedTensor(codes, fmt.scale.to_storage(scales), g, fmt)
