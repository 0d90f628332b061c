"""GPTQ's column loop for one block of columns, in one Triton launch.

The torch loop in mxptq.calibration.gptq issues a dozen small kernels per column (and a
selector per group), so on a GPU it is bound by launches: about 6 s for one 4096 x 4096 layer.
GPTQ treats every row on its own (only H⁻¹ is shared), so here a program keeps R rows of the
block's columns in registers as an [R, G, B] tile (G groups of B columns) and walks the columns:
at each group's first column it picks the group's scale with the quantizer's own selection step
(`select_tile`, lazy mode) or reads it (static mode), then quantizes the column, divides the
error by H⁻¹[i, i] and subtracts err·H⁻¹[i, :] from the tile. The steps and their order are the
torch loop's, each fp32 operation rounded the same way (correctly rounded divisions, no fused
multiply-add), so the codes, values and errors equal the torch loop's bit for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mxptq.formats import Format
from mxptq.scales import SELECTORS, SelectorConfig

from .hessian import select_hessian
from .numerics import e2m1_code, e2m1_value, reciprocal, scale_value
from .quantize import exact_window_options, select_tile

ROWS = 16  # rows per program: a 16 x 128 fp32 tile is 16 registers a thread with 4 warps


@triton.jit
def _gptq_block_kernel(
    w_ptr,
    stride_w,
    hinv_ptr,
    stride_h,
    stride_hc,
    imp_ptr,
    sc_ptr,
    stride_sc,
    codes_ptr,
    q_ptr,
    stride_o,
    err_ptr,
    stride_e,
    gv_ptr,
    n_rows,
    n_cols: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    B: tl.constexpr,
    LAZY: tl.constexpr,
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
    HESS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    rmask = rows < n_rows
    rows = rows.to(tl.int64)
    gi = tl.arange(0, G)
    ti = tl.arange(0, B)
    col = gi[:, None] * B + ti[None, :]  # [G, B]: the block's column index of each element
    cmask = col < n_cols
    m3 = rmask[:, None, None] & cmask[None, :, :]
    w = tl.load(w_ptr + rows[:, None, None] * stride_w + col[None, :, :], mask=m3, other=0.0)
    g = tl.load(gv_ptr)
    inv_g = tl.load(gv_ptr + 1)
    inv = tl.zeros((R,), tl.float32)  # element multiplier of the current group
    sg = tl.zeros((R,), tl.float32)  # its scale value / g
    for i in range(0, n_cols):
        j = i // B
        if i % B == 0:
            if LAZY:  # the selector on the group's current (error-updated) weights
                x = tl.max(tl.where((gi == j)[None, :, None], w, float("-inf")), axis=1)
                if HESS:  # imp_ptr holds the block's covariances [G, B, B]
                    hbase = tl.zeros((R,), tl.int64) + j * (B * B)
                    c = select_hessian(x, imp_ptr, hbase, g, inv_g, B, SEL, WLO, WHI, MAN, BIAS,
                                       MAX_CODE, MAX_VALUE, MX_CEIL, FLOOR)
                else:
                    hh = (tl.broadcast_to(tl.load(imp_ptr + j * B + ti)[None, :], (R, B))
                          if HAS_H else x)
                    c = select_tile(
                        x, hh, g, inv_g, rmask, B, SEL, WLO, WHI, MAN, BIAS, MAX_CODE,
                        MAX_VALUE, MX_CEIL, HAS_H, FLOOR,
                    )
                tl.store(sc_ptr + rows * stride_sc + j, c, mask=rmask)
            else:
                c = tl.load(sc_ptr + rows * stride_sc + j, mask=rmask, other=0)
            s = scale_value(c, MAN, BIAS)
            inv = reciprocal(s * inv_g)
            sg = tl.math.div_rn(s, tl.zeros_like(s) + g)
        # Column i alone (max over -inf elsewhere keeps -0.0), quantized as quantize_codes.
        wi = tl.max(tl.max(tl.where((col == i)[None, :, :], w, float("-inf")), axis=2), axis=1)
        code = e2m1_code(wi * inv)
        q = e2m1_value(code) * sg
        d = tl.load(hinv_ptr + i * stride_h + i * stride_hc)
        err = tl.math.div_rn(wi - q, tl.zeros_like(wi) + d)
        hmask = cmask & (col >= i)
        hrow = tl.load(hinv_ptr + i * stride_h + col * stride_hc, mask=hmask, other=0.0)
        w = w - err[:, None, None] * hrow[None, :, :]
        tl.store(codes_ptr + rows * stride_o + i, code.to(tl.uint8), mask=rmask)
        tl.store(q_ptr + rows * stride_o + i, q, mask=rmask)
        tl.store(err_ptr + rows * stride_e + i, err, mask=rmask)


@functools.lru_cache(maxsize=64)
def _options(fmt: Format, cfg: SelectorConfig, lazy: bool, has_h: bool, width: int,
             hess: bool = False) -> dict:
    codec = fmt.scale
    window = exact_window_options(fmt, cfg, "pruned", has_h)
    b = fmt.block_size
    return dict(
        R=ROWS,
        G=triton.next_power_of_2(width) // b,
        B=b,
        LAZY=lazy,
        SEL=SELECTORS.index(cfg.name),
        WLO=window[0],
        WHI=window[1],
        MAN=codec.man_bits,
        BIAS=codec.bias,
        MAX_CODE=codec.max_code,
        MAX_VALUE=codec.max_value,
        MX_CEIL=fmt.mx_rule == "ceil",
        HAS_H=has_h and not hess,
        FLOOR=cfg.underflow_floor,
        HESS=hess,
        num_warps=4,
        enable_fp_fusion=False,  # w - err·h must round the product first, as torch does
    )


def supported(block: int, block_size: int, act_order: bool) -> bool:
    """The kernel needs each group inside one column block (no activation order, blocks a
    multiple of the group) and power-of-two blocks (a register tile's sides)."""
    return (
        not act_order
        and block % block_size == 0
        and block == triton.next_power_of_2(block)
        and block_size == triton.next_power_of_2(block_size)
    )


def gptq_block(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    importance: torch.Tensor | None,
    scale_codes: torch.Tensor,
    codes: torch.Tensor,
    q: torch.Tensor,
    gv: torch.Tensor,
    fmt: Format,
    cfg: SelectorConfig,
    lazy: bool,
    block: int,
) -> torch.Tensor:
    """One GPTQ column block: w1 [N, n] (fp32 view, unit column stride), hinv1 [n, n] (its
    H⁻¹ factor block, any strides), importance [n], block covariances [n/B, B, B] (contiguous)
    or None, scale_codes [N, n/B] int32
    (written when lazy, read otherwise), codes [N, n] uint8 and q [N, n] fp32 (written),
    gv = (g, 1/g) fp32.
    Returns the block's scaled errors Err1 [N, n] for the lazy batch update."""
    n, width = w1.shape
    err = torch.empty((n, width), dtype=torch.float32, device=w1.device)
    hess = importance is not None and importance.dim() == 3
    opts = _options(fmt, cfg, lazy, importance is not None, block, hess)
    _gptq_block_kernel[(triton.cdiv(n, ROWS),)](
        w1,
        w1.stride(0),
        hinv1,
        hinv1.stride(0),
        hinv1.stride(1),
        importance if importance is not None else w1,
        scale_codes,
        scale_codes.stride(0),
        codes,
        q,
        codes.stride(0),
        err,
        err.stride(0),
        gv,
        n,
        width,
        **opts,
    )
    return err
