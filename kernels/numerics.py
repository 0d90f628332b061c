"""Exact fp32 building blocks shared by the kernels, each mirroring one step of mxptq.scales.

Everything here is bit-exact by construction: powers of two come from exponent bits, RNE to an
integer uses the 2^23 magic number (exact for 0 <= t < 2^22), and no step depends on how NaN
is handled by min/max instructions (those differ between the GPU and the interpreter).
"""

import triton
import triton.language as tl

ONE_SIXTH: tl.constexpr = tl.constexpr(0.1666666716337204)  # fp32(1/6), as the reference uses


@triton.jit
def widen(x, BF16_BITS: tl.constexpr):
    """Loaded weights to fp32; bf16 comes as int16 bits and is widened by a shift, which keeps
    subnormals (the interpreter's own bf16 conversion flushes them)."""
    if BF16_BITS:
        return (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def pow2(k):
    """2^k in fp32 for integer k in [-126, 127], built from its exponent bits."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def scale_value(code, MAN: tl.constexpr, BIAS: tl.constexpr):
    """Value of scale codes (int32): an unsigned minifloat, or E8M0 when MAN == 0."""
    if MAN == 0:
        # 2^(c-127); code 0 is 2^-127, an fp32 subnormal with only mantissa bit 22 set.
        return tl.where(code > 0, code << 23, 0x400000).to(tl.float32, bitcast=True)
    e = code >> MAN
    m = code & ((1 << MAN) - 1)
    mant = tl.where(e > 0, m + (1 << MAN), m).to(tl.float32)
    return mant * pow2(tl.maximum(e, 1) - (BIAS + MAN))


@triton.jit
def encode_minifloat(v, MAN: tl.constexpr, BIAS: tl.constexpr, MAX_VALUE: tl.constexpr):
    """ScaleCodec.encode: RNE of v >= 0 to a code after clamping to the largest value.

    floor(log2 v) is read from the exponent bits; zero and fp32 subnormals read -127, which
    the clamp to 1 - BIAS (> -126) maps to the same e as the reference's frexp.
    """
    v = tl.where(v > MAX_VALUE, MAX_VALUE, v)
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 1 - BIAS)
    t = v * pow2(MAN - e)  # exact: a power-of-two scaling into [0, 2^(MAN+1)]
    n = (t + 8388608.0) - 8388608.0
    return ((e + (BIAS - 1)) << MAN) + n.to(tl.int32)


@triton.jit
def e8m0_code(bmax, MX_CEIL: tl.constexpr):
    """formats.e8m0_code: floor (OCP) or ceil exponent rule; subnormal and zero maxima give 0."""
    bits = bmax.to(tl.int32, bitcast=True)
    f = ((bits >> 23) & 0xFF) - 127
    e = f - 2
    if MX_CEIL:  # bmax <= 1.5·2^f exactly when its mantissa field is <= 0x400000
        e = tl.where((bits & 0x7FFFFF) <= 0x400000, e, f - 1)
    code = tl.minimum(tl.maximum(e + 127, 0), 254)
    return tl.where(bmax > 0, code, 0)


@triton.jit
def absmax_code(
    bmax,
    g,
    MULT: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    MX_CEIL: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """scales.absmax_code: RNE(min(g·(bmax·fp32(1/6))·MULT, max)), or the E8M0 rule."""
    if MAN == 0:
        return e8m0_code(bmax, MX_CEIL)
    s_hp = g * (bmax * ONE_SIXTH)
    if MULT != 1.0:
        s_hp = s_hp * MULT
    code = encode_minifloat(s_hp, MAN, BIAS, MAX_VALUE)
    if FLOOR:
        code = tl.where(bmax > 0, tl.maximum(code, 1), code)
    return code


@triton.jit
def reciprocal(r):
    """scales.reciprocal: correctly rounded 1/r, and 0 for r == 0."""
    safe = tl.where(r == 0.0, 1.0, r)  # keeps 1/0 out of the interpreter's warnings
    return tl.where(r == 0.0, 0.0, tl.math.div_rn(tl.full(r.shape, 1.0, tl.float32), safe))


@triton.jit
def e2m1_round(t):
    """Value of the E2M1 RNE of t >= 0 (saturating at 6; NaN gives 0 like e2m1_encode).

    Adding M = 2^22, 2^23, 2^24 rounds to multiples of 0.5, 1, 2 (the grid spacing below 2, 4
    and above) with ties to the even multiple, which is the even E2M1 code.
    """
    m = tl.where(t < 2.0, 4194304.0, tl.where(t < 4.0, 8388608.0, 16777216.0))
    r = tl.minimum((t + m) - m, 6.0)
    return tl.where(t > 0.25, r, 0.0)


@triton.jit
def e2m1_code(v):
    """formats.e2m1_encode: RNE of |v| to the E2M1 grid as a code, sign bit = (v < 0).

    The grid spacing is 0.5, 1, 2 below 2, below 4 and above, so the magnitude code is
    RNE(2t), RNE(t) + 2 or RNE(t/2) + 4; RNE to an integer reads the bits of t·sc + 2^23.
    """
    t = tl.abs(v)
    big = t >= 4.0
    mid = t >= 2.0
    sc = tl.where(big, 0.5, tl.where(mid, 1.0, 2.0))
    off = tl.where(big, 4, tl.where(mid, 2, 0))
    n = ((t * sc + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000) + off
    mag = tl.where(t > 0.25, tl.minimum(n, 7), 0)  # NaN (0·inf) compares false: code 0
    return mag | tl.where(v < 0.0, 8, 0)


@triton.jit
def e2m1_value(code):
    """formats.e2m1_decode: fp32 value of codes 0..15 (code 8 is -0.0)."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    v = tl.where(e == 0, m * 0.5, (m + 2.0) * pow2(e - 2))
    return tl.where(code >= 8, v * -1.0, v)  # not -v, which is 0 - v and loses -0.0


@triton.jit
def _halve(v):
    lo, hi = tl.split(tl.reshape(v, (v.shape[0], v.shape[1] // 2, 2)))
    return lo + hi


@triton.jit
def _col(v, i: tl.constexpr):
    # Column i alone: the other terms are exact zeros, so the order of tl.sum does not matter.
    return tl.sum(tl.where(tl.arange(0, v.shape[1])[None, :] == i, v, 0.0), axis=1)


@triton.jit
def tree_sum(v, B: tl.constexpr):
    """scales.tree_sum of each row of v [R, B]: neighbours first, level by level. Blocks of 4
    and 8 add extracted columns (reshape/split there trips Triton 3.6's layout pass)."""
    if B == 4:
        out = (_col(v, 0) + _col(v, 1)) + (_col(v, 2) + _col(v, 3))
    elif B == 8:
        lo = (_col(v, 0) + _col(v, 1)) + (_col(v, 2) + _col(v, 3))
        out = lo + ((_col(v, 4) + _col(v, 5)) + (_col(v, 6) + _col(v, 7)))
    else:
        if B >= 128:
            v = _halve(v)
        if B >= 64:
            v = _halve(v)
        if B >= 32:
            v = _halve(v)
        v = _halve(_halve(_halve(_halve(v))))
        out = tl.reshape(v, (v.shape[0],))
    return out
