"""Exact number formats: the E2M1 element grid, the block-scale codecs and the format specs.

Everything here is a pure function of tensors. Code tables are built from bit patterns, so the
values are the formats' definitions rather than constants typed in by hand; rounding is
round-to-nearest-even (RNE) throughout, as on hardware and in vLLM (docs/numerics.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# E2M1: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit; no Inf/NaN; sign in bit 3.


def _e2m1_magnitudes() -> tuple[float, ...]:
    """Magnitudes of codes 0..7 from their bits (exponent bias 1, subnormal at exponent 0)."""
    out = []
    for code in range(8):
        e, m = code >> 1, code & 1
        out.append(m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))
    return tuple(out)


E2M1_MAGNITUDES = _e2m1_magnitudes()  # (0, 0.5, 1, 1.5, 2, 3, 4, 6)
E2M1_MAX = E2M1_MAGNITUDES[-1]


def e2m1_values(device: torch.device | str = "cpu") -> torch.Tensor:
    """All 16 E2M1 codes as float32 (codes 8..15 negative; code 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """RNE of float32 `v` onto the E2M1 grid, saturating at ±6; returns uint8 codes 0..15.

    The magnitude code counts the decision boundaries passed. Strict `>` at 0.25, 1.25, 2.5, 5
    and `>=` at 0.75, 1.75, 3.5 send every tie to the even (mantissa-0) code. The sign bit is
    `v < 0`, as in compressed-tensors' packer, so a small negative value that rounds to zero
    becomes -0 (code 8) while +0.0 and -0.0 inputs give code 0.
    """
    a = v.abs()
    mag = (a > 0.25).to(torch.uint8)
    mag += a >= 0.75
    mag += a > 1.25
    mag += a >= 1.75
    mag += a > 2.5
    mag += a >= 3.5
    mag += a > 5.0
    return mag | ((v < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 E2M1 codes (0..15)."""
    return e2m1_values(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., K] (K even) two per byte: even element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of FP4 codes ({codes.shape[-1]})")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_e2m1`: uint8 [..., K/2] to codes [..., K]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# --------------------------------------------------------------------------------------------
# Scale codecs: unsigned minifloats (E4M3, UE5M3) and the power-of-two E8M0.


@dataclass(frozen=True)
class ScaleCodec:
    """An unsigned block-scale format; code order equals value order for codes 0..max_code.

    `exp_bits`/`man_bits`/`bias` define the minifloat; `max_code` is the largest finite code
    (the codes above it are NaN or Inf in that convention). E8M0 has no mantissa, no subnormals
    and no zero: code c means 2^(c - 127).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_code: int
    torch_dtype: torch.dtype | None = None  # stored as this dtype, else as uint8 codes

    @property
    def has_zero(self) -> bool:
        return self.man_bits > 0

    @property
    def min_code(self) -> int:
        """Smallest code a non-zero block may use (1 for minifloats: code 0 is zero)."""
        return 1 if self.has_zero else 0

    def value_of(self, code: int) -> float:
        """Value of one code, from its bits."""
        if not 0 <= code <= self.max_code:
            raise ValueError(f"{self.name}: code {code} is not finite")
        e, m = code >> self.man_bits, code & ((1 << self.man_bits) - 1)
        if not self.has_zero:
            return 2.0 ** (e - self.bias)
        if e == 0:
            return m * 2.0 ** (1 - self.bias - self.man_bits)
        return (1 + m / 2**self.man_bits) * 2.0 ** (e - self.bias)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 values of codes 0..max_code."""
        return _table(self, str(device))

    @property
    def max_value(self) -> float:
        return self.value_of(self.max_code)

    @property
    def min_positive(self) -> float:
        return self.value_of(self.min_code)

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """RNE of non-negative finite float32 `v` to codes (int32), clamped to the max first.

        For a minifloat with M mantissa bits and bias b, let e = max(floor(log2 v), 1 - b) and
        ulp = 2^(e - M); then code = (e + b - 1)·2^M + RNE(v / ulp). This one formula covers
        subnormals (e = 1 - b), normals, and the carry into the next binade. Division by the
        power of two ulp is exact, so the only rounding is the RNE of torch.round.
        """
        if not self.has_zero:
            raise ValueError("E8M0 codes come from an exponent rule, not from RNE")
        v = v.float().clamp(max=self.max_value)
        _, exp = torch.frexp(v)  # v = m·2^exp, m in [0.5, 1)
        e = torch.where(v > 0, exp - 1, torch.full_like(exp, 1 - self.bias))
        e = e.clamp(min=1 - self.bias)
        n = torch.round(torch.ldexp(v, (self.man_bits - e).float()))
        return ((e + self.bias - 1) << self.man_bits) + n.to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table(codes.device)[codes.long()]

    def to_storage(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as stored: E4M3 bytes viewed as float8_e4m3fn, other codecs as uint8."""
        c = codes.to(torch.uint8)
        return c.view(self.torch_dtype) if self.torch_dtype is not None else c

    def from_storage(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales back to int32 codes."""
        if stored.dtype != torch.uint8:
            stored = stored.view(torch.uint8)
        return stored.to(torch.int32)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _table(codec: ScaleCodec, device: str) -> torch.Tensor:
    key = (codec.name, device)
    if key not in _TABLES:
        vals = [codec.value_of(c) for c in range(codec.max_code + 1)]
        _TABLES[key] = torch.tensor(vals, dtype=torch.float32, device=device)
    return _TABLES[key]


E4M3 = ScaleCodec("e4m3", 4, 3, 7, 126, torch.float8_e4m3fn)  # 0x7F is NaN; max 448
# UE5M3: the sign bit becomes a 5th exponent bit. "fn" style (only 0xFF is NaN, max 114688) is
# the default; the IEEE-style variant reserves exponent 31 for Inf/NaN (max 61440).
UE5M3 = ScaleCodec("ue5m3", 5, 3, 15, 254)
UE5M3_IEEE = ScaleCodec("ue5m3-ieee", 5, 3, 15, 247)
E8M0 = ScaleCodec("e8m0", 8, 0, 127, 254)  # 0xFF is NaN

SCALE_CODECS = {c.name: c for c in (E4M3, UE5M3, UE5M3_IEEE, E8M0)}


def e8m0_code(bmax: torch.Tensor, rule: str) -> torch.Tensor:
    """E8M0 abs-max code of block maxima (int32), by the OCP floor rule or the round-up rule.

    floor (OCP MX spec): e = floor(log2 bmax) - 2, so bmax/2^e is in [4, 8) and a block max
    above 6·2^e is clipped to 6. ceil: the smallest e with 6·2^e >= bmax (never clips); since
    bmax in [2^f, 2^(f+1)) this is f - 2 when bmax <= 1.5·2^f, else f - 1. Both are exact.
    An all-zero block gets code 0.
    """
    _, exp = torch.frexp(bmax.float())
    f = exp - 1  # floor(log2 bmax) for bmax > 0
    if rule == "floor":
        e = f - 2
    elif rule == "ceil":
        e = torch.where(bmax <= torch.ldexp(torch.full_like(bmax, 1.5), f.float()), f - 2, f - 1)
    else:
        raise ValueError(f"unknown MX exponent rule {rule!r} (floor or ceil)")
    code = (e + E8M0.bias).clamp(0, E8M0.max_code)
    return torch.where(bmax > 0, code, torch.zeros_like(code)).to(torch.int32)


# --------------------------------------------------------------------------------------------
# Format specs.

BLOCK_SIZES = (4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Format:
    """How to read a quantized tensor: E2M1 elements, one scale per `block_size` run along K,
    scales in `scale` codec, and an fp32 per-tensor global scale when `has_global`."""

    name: str
    scale: ScaleCodec
    block_size: int
    has_global: bool
    mx_rule: str = "floor"  # E8M0 abs-max exponent rule: "floor" (OCP) or "ceil"

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size} not supported (one of {BLOCK_SIZES})")
        if self.has_global and not self.scale.has_zero:
            raise ValueError("E8M0 scales take no global scale")
        if self.mx_rule not in ("floor", "ceil"):
            raise ValueError(f"unknown MX exponent rule {self.mx_rule!r} (floor or ceil)")

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales included (the global scale is negligible)."""
        return 4 + 8 / self.block_size


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("nvfp4", E4M3, 16, has_global=True),
        Format("nvfp4-ue5m3", UE5M3, 16, has_global=False),
        Format("mxfp4", E8M0, 32, has_global=False),
    )
}


def get_format(fmt: str | Format, block_size: int | None = None, **overrides) -> Format:
    """Resolve a format name (or spec) and apply research overrides such as the block size,
    `has_global`, `scale` (a codec or its name) or `mx_rule`."""
    if isinstance(fmt, str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        fmt = FORMATS[fmt]
    if block_size is not None:
        overrides["block_size"] = block_size
    if isinstance(overrides.get("scale"), str):
        name = overrides["scale"]
        if name not in SCALE_CODECS:
            raise ValueError(f"unknown scale codec {name!r} (one of {', '.join(SCALE_CODECS)})")
        overrides["scale"] = SCALE_CODECS[name]
    return dataclasses.replace(fmt, **overrides) if overrides else fmt
