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
# The certified window of the exact path (docs/kernels.md, "Candidate window"): offsets
# evaluated for every block before the certificate; blocks that fail it take the full search.
# Minifloat scales take one more code below for blocks of 64+ and weighted blocks, whose
# optimum lies lower more often (the certificate then fails in most tiles at -3).
EXACT_WINDOW = {"e4m3": (-3, 7), "ue5m3": (-3, 7), "ue5m3-ieee": (-3, 7), "e8m0": (-1, 1)}
WIDE_EXACT_WINDOW = (-4, 7)
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


def exact_window(fmt: Format, weighted: bool = False) -> tuple[int, int]:
    """Offsets [lo, hi] around c0 that the exact path evaluates before certifying a block."""
    if fmt.scale.has_zero and (weighted or fmt.block_size > 32):
        return WIDE_EXACT_WINDOW
    return EXACT_WINDOW[fmt.scale.name]


NEAR_ULPS = 64  # fp32 ulps of t around a 3-significant-bit value that count as "near" it


def doubling_safe(a: torch.Tensor, ay: torch.Tensor, s: torch.Tensor, inv_g: torch.Tensor):
    """True for blocks where no code reached from scale s by doublings (s·2, s·4, ...) can beat
    s (docs/kernels.md, "Candidate window"): the E2M1 value of t = |x|·inv at s is the nearest
    one to y/s unless t lies within NEAR_ULPS ulps of a value with at most 3 significant bits
    (the midpoints 0.25, 0.75, 1.25, 1.75 times powers of two) and y/s lies on its other
    side, or t >= 6.5; and the halving of 1/(s/g) must stay exact (s/g in [2^-100, 2^90])."""
    r = s * inv_g
    ok = (r >= 2.0**-100) & (r <= 2.0**90)
    t = a * reciprocal(r).unsqueeze(-1)
    bits = t.view(torch.int32)
    low = bits & 0x1FFFFF
    near = (low < NEAR_ULPS) | (low > 0x200000 - NEAR_ULPS)
    m3 = ((bits + 0x100000) & ~0x1FFFFF).view(torch.float32)
    ms = m3 * s.unsqueeze(-1)
    across = ((t < m3) & (ay > ms)) | ((t > m3) & (ay < ms))
    risky = (t >= 6.5) | ((t >= 0.2) & near & across)
    return ok & ~risky.any(dim=-1)


def window_certificate(
    x: torch.Tensor,
    fmt: Format,
    g: torch.Tensor,
    h: torch.Tensor | None,
    c0: torch.Tensor,
    best_c: torch.Tensor,
    best_e: torch.Tensor,
    window: tuple[int, int],
) -> torch.Tensor:
    """True for blocks whose best candidate inside `window` (best_c, best_e, found in priority
    order) is the exhaustive argmin: no code outside the window can be strictly better or tie
    with a higher priority. Below: the tree of the clipped elements, RN(y - 6s)+^2·h. Above: the
    elements with y <= s/4 cost at least y^2·h, or every code above is a doubling of a window
    code that is doubling_safe (docs/kernels.md proves all three)."""
    lo, hi = window
    codec = fmt.scale
    table = codec.table(x.device)
    a = x.abs()
    ay = a * g
    hh = torch.ones_like(ay) if h is None else h.expand_as(ay)
    cn = c0 + (lo - 1)
    dn = (ay - (6.0 * table[cn.clamp(min=0)]).unsqueeze(-1)).clamp(min=0)
    lbn = tree_sum(dn * dn if h is None else (dn * dn) * hh)
    # -k (k > -lo) precedes +f only when f >= k: a winner above -lo needs a strict bound.
    neg = (cn < codec.min_code) | (lbn > best_e) | ((lbn >= best_e) & (best_c - c0 <= -lo))
    cp = c0 + (hi + 1)
    sp = table[cp.clamp(max=codec.max_code)]
    yyh = ay * ay if h is None else (ay * ay) * hh
    lbp = tree_sum(torch.where(ay <= (0.25 * sp).unsqueeze(-1), yyh, torch.zeros_like(yyh)))
    # The codes c0+hi+1-P .. c0+hi (P codes per doubling) are the bases of every code above.
    per = 1 << codec.man_bits
    dbl = torch.ones_like(neg)
    for f in range(hi + 1 - per, hi + 1):
        c = c0 + f
        base = (c + per > codec.max_code) | (
            (c >= per if codec.has_zero else c >= 0)
            & doubling_safe(a, ay, table[c.clamp(0, codec.max_code)], reciprocal(g))
        )
        dbl = dbl & base
    pos = (cp > codec.max_code) | (lbp >= best_e) | dbl
    return neg & pos


def exhaustive_by_window(
    x: torch.Tensor,
    fmt: Format,
    cfg: SelectorConfig,
    g: torch.Tensor,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact path the kernel takes, in torch: the window in priority order, the certificate,
    and the full search for the blocks that fail it. Returns (codes, certified); the codes equal
    select_codes(..., exhaustive) for every block."""
    lo, hi = exact_window(fmt, h is not None)
    bmax = x.abs().amax(dim=-1)
    inv_g = reciprocal(g)
    y = x * g
    table = fmt.scale.table(x.device)
    c0 = absmax_code(fmt, bmax, g, floor=cfg.underflow_floor)
    best_c = c0
    best_e = block_error(x, y, table[c0], inv_g, h)
    for f in candidate_offsets(fmt, SelectorConfig("search", (lo, hi)), c0)[1:]:
        c = c0 + f
        valid = (c >= fmt.scale.min_code) & (c <= fmt.scale.max_code)
        e = block_error(x, y, table[c.clamp(0, fmt.scale.max_code)], inv_g, h)
        better = valid & (e < best_e)
        best_c = torch.where(better, c, best_c)
        best_e = torch.where(better, e, best_e)
    ok = window_certificate(x, fmt, g, h, c0, best_c, best_e, (lo, hi))
    if not bool(ok.all()):
        full = select_codes(x, fmt, SelectorConfig("exhaustive", None, cfg.underflow_floor), g, h)
        best_c = torch.where(ok, best_c, full)
    return best_c, ok
