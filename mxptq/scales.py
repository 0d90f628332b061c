"""Block-scale selectors: the torch reference that defines correct output.

Every selector is an argmin of the block error over a candidate set of scale codes, with one
tie rule: keep the abs-max code c0 unless a candidate is strictly better; among equally good
candidates take the smallest |offset|, then the smaller offset. Candidates are visited in that
priority order (0, -1, +1, -2, +2, ...) and replace the best only when strictly better, which
is the rule exactly. The Triton kernels reproduce these bytes; docs/numerics.md has the math.

Arithmetic is fixed to the last rounding so that any implementation can match it bit for bit:
  s_hp     = g · (bmax · fp32(1/6))            abs-max scale in encoded units (vLLM's order)
  inv      = 1 / (s · fp32(1/g))  (0 if s = 0) element multiplier (vLLM's get_reciprocal)
  q        = E2M1(clamp(x · inv, ±6))
  d        = x·g − q·s                          error in encoded units (q·s is exact)
  err      = pairwise tree sum over the block of d·d (·h_k with importance weights)
The tree adds neighbours (0+1, 2+3, ...) level by level, so its order is fixed. For formats
without a global scale g = 1.

With a block covariance H_b (B x B per block, `--importance hessian`) the error is the
quadratic form dᵀ H_b d on the signed d, evaluated as
  t_i      = tree sum over j of H_b[i, j]·d_j       (each product rounded, then the tree)
  err      = tree sum over i of d_i·t_i
so the importance argument is either diagonal weights [K/B, B] or covariances [K/B, B, B].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import E2M1_MAX, Format, e2m1_decode, e2m1_encode, e8m0_code

SELECTORS = ("absmax", "4over6", "search", "exhaustive")

# Defaults chosen by measurement (docs/numerics.md, "Choosing the defaults").
DEFAULT_WINDOW = {"e4m3": (-5, 6), "ue5m3": (-5, 6), "ue5m3-ieee": (-5, 6), "e8m0": (-1, 1)}
DEFAULT_GLOBAL_NORM = {"absmax": 448.0, "4over6": 256.0, "search": 448.0, "exhaustive": 448.0}
FOUR_OVER_SIX_MAX_NORM = 448.0 / 1.5  # above this the 4-candidate of the max block clips


@dataclass(frozen=True)
class SelectorConfig:
    """A selector with its parameters resolved against a format."""

    name: str
    window: tuple[int, int] | None = None  # search offsets [fmin, fmax] around c0
    underflow_floor: bool = True  # a non-zero block never gets a zero scale
    global_norm: float | None = None  # g = global_norm·6/amax (formats with a global scale)


def resolve_selector(
    fmt: Format,
    name: str,
    window: tuple[int, int] | None = None,
    underflow_floor: bool = True,
    global_norm: float | None = None,
) -> SelectorConfig:
    """Validate a selector name and fill in the defaults for this format."""
    if name not in SELECTORS:
        raise ValueError(f"unknown scale selector {name!r} (one of {', '.join(SELECTORS)})")
    if name == "4over6" and not fmt.scale.has_zero:
        raise ValueError("4over6 needs a scale format with mantissa bits (not E8M0)")
    if window is not None:
        if name != "search":
            raise ValueError("a search window applies only to scale='search'")
        lo, hi = window
        if not lo <= 0 <= hi:
            raise ValueError(f"search window {window} must contain offset 0")
    elif name == "search":
        window = DEFAULT_WINDOW[fmt.scale.name]
    if fmt.has_global:
        if global_norm is None:
            global_norm = DEFAULT_GLOBAL_NORM[name]
        if not 0 < global_norm <= fmt.scale.max_value:
            raise ValueError(f"global_norm {global_norm} outside (0, {fmt.scale.max_value}]")
    else:
        global_norm = None
    return SelectorConfig(name, window, underflow_floor, global_norm)


def global_encode_scale(amax: torch.Tensor, global_norm: float) -> torch.Tensor:
    """g = (global_norm·6)·fp32(1/amax): the two roundings that compressed-tensors'
    generate_gparam and vLLM's global-scale helper perform (torch evaluates `c / t` as
    `c * t.reciprocal()`); 1.0 when amax is 0 or g is not finite, so a zero tensor gives zeros."""
    amax = amax.float()
    g = (global_norm * E2M1_MAX) * torch.reciprocal(amax)
    return torch.where(torch.isfinite(g) & (amax > 0), g, torch.ones_like(g))


def reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x with 1/0 = 0 (vLLM's get_reciprocal)."""
    return torch.where(x == 0, torch.zeros_like(x), 1.0 / x)


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum the last dim (a power of two) pairwise, neighbours first: a fixed order."""
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def quantize_codes(x: torch.Tensor, s: torch.Tensor, inv_g: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of blocks x [..., B] with scale values s [...] (vLLM's element rule)."""
    inv = reciprocal(s * inv_g)
    return e2m1_encode(torch.clamp(x * inv.unsqueeze(-1), -E2M1_MAX, E2M1_MAX))


def block_error(
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    inv_g: torch.Tensor,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block error (SSE in encoded units, h-weighted, or the quadratic form with block
    covariances h [..., B, B]) of blocks x [..., B] at scales s [...]; y = x·g is passed in so
    that it is computed once."""
    q = e2m1_decode(quantize_codes(x, s, inv_g))
    d = y - q * s.unsqueeze(-1)
    if is_block_covariance(h, x.shape[-1]):
        return tree_sum(d * tree_sum(h * d.unsqueeze(-2)))
    sq = d * d
    if h is not None:
        sq = sq * h
    return tree_sum(sq)


def is_block_covariance(h: torch.Tensor | None, b: int) -> bool:
    """Importance given as one B x B covariance per block ([K/B, B, B]), not diagonal weights
    ([K/B, B] or [K])."""
    return h is not None and h.dim() == 3 and h.shape[-2:] == (b, b)


def absmax_code(
    fmt: Format, bmax: torch.Tensor, g: torch.Tensor, mult: float | None = None, floor: bool = True
) -> torch.Tensor:
    """The abs-max (RTN) scale code of each block: RNE(min(g·bmax/6, max)), or the E8M0 rule.
    `mult` multiplies the ideal scale before rounding (1.5 for 4over6's scale-to-4 candidate)."""
    if not fmt.scale.has_zero:
        return e8m0_code(bmax, fmt.mx_rule)
    s_hp = g * (bmax * torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32))
    if mult is not None:
        s_hp = s_hp * mult
    code = fmt.scale.encode(s_hp)
    if floor:
        code = torch.where(bmax > 0, code.clamp(min=fmt.scale.min_code), code)
    return code


def candidate_offsets(fmt: Format, cfg: SelectorConfig, c0: torch.Tensor) -> list[int]:
    """Offsets from c0 in priority order (0, -1, +1, -2, +2, ...) for search/exhaustive.
    Exhaustive takes every offset that reaches a valid code from some block's c0."""
    if cfg.name == "search":
        lo, hi = cfg.window
    else:
        lo = fmt.scale.min_code - int(c0.max())
        hi = fmt.scale.max_code - int(c0.min())
    out = [0]
    for k in range(1, max(-lo, hi) + 1):
        out += [f for f in (-k, k) if lo <= f <= hi]
    return out


def select_codes(
    x: torch.Tensor,
    fmt: Format,
    cfg: SelectorConfig,
    g: torch.Tensor,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chosen scale codes (int32 [...]) for float32 blocks x [..., B]."""
    bmax = x.abs().amax(dim=-1)
    inv_g = reciprocal(g)
    y = x * g
    table = fmt.scale.table(x.device)
    floor = cfg.underflow_floor
    if cfg.name == "absmax":
        return absmax_code(fmt, bmax, g, floor=floor)
    if cfg.name == "4over6":
        c6 = absmax_code(fmt, bmax, g, floor=floor)
        c4 = absmax_code(fmt, bmax, g, mult=1.5, floor=floor)
        e6 = block_error(x, y, table[c6], inv_g, h)
        e4 = block_error(x, y, table[c4], inv_g, h)
        return torch.where(e4 < e6, c4, c6)
    c0 = absmax_code(fmt, bmax, g, floor=floor)
    best_c = c0
    best_e = block_error(x, y, table[c0], inv_g, h)
    for f in candidate_offsets(fmt, cfg, c0)[1:]:
        c = c0 + f
        valid = (c >= fmt.scale.min_code) & (c <= fmt.scale.max_code)
        if not bool(valid.any()):
            continue
        cc = c.clamp(0, fmt.scale.max_code)
        e = block_error(x, y, table[cc], inv_g, h)
        better = valid & (e < best_e)
        best_c = torch.where(better, cc, best_c)
        best_e = torch.where(better, e, best_e)
    return best_c
