"""FP4 code decoders shared by the GEMV (gemv.py) and the dot kernel (gemm.py).

Dequantization is exact and needs no table: an E2M1 nibble's bits moved into an fp16 pattern
((c & 7) << 9 | (c & 8) << 12) are E2M1(c)·2^-14 (code 1 lands on an fp16 subnormal, which the
hardware converts exactly); a block scale is decoded from its exponent and mantissa bits with
2^14 folded in. Compiled kernels decode four code bytes at a time with inline PTX; the
interpreter (TRITON_INTERPRET=1) runs the same formula one nibble at a time in plain Triton.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Inline-PTX nibble decoding in compiled kernels; the interpreter runs the plain-Triton formula.
USE_ASM = not INTERPRET


@triton.jit
def e2m1_times_2pow_m14(c):
    """fp16 holding E2M1(c)·2^-14 for codes c (uint16, 0..15): a bit move, no table."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.float16, bitcast=True)


# PTX for `decode_bytes` on the GPU: 4 code bytes (one 32-bit register) -> 8 fp32 values.
# Each 16-bit half of r holds two bytes; shifting r moves one nibble of each half into the fp16
# bit positions at once (magnitude bits to 9..11, sign bit to 15), so one shift/mask/or makes
# an fp16 pair (two weights), and cvt.f32.f16 unpacks it (exact, subnormals included).
# Outputs $0..$3: low nibbles of bytes 0..3; $4..$7: high nibbles; $8: the 4 bytes.
DECODE_ASM = tl.constexpr("""
{
.reg .b32 t<2>, h<4>;
.reg .b16 l, u;
shl.b32 t0, $8, 9;
shl.b32 t1, $8, 12;
and.b32 t0, t0, 0x0E000E00;
and.b32 t1, t1, 0x80008000;
or.b32 h0, t0, t1;
shl.b32 t0, $8, 5;
shl.b32 t1, $8, 8;
and.b32 t0, t0, 0x0E000E00;
and.b32 t1, t1, 0x80008000;
or.b32 h1, t0, t1;
shl.b32 t0, $8, 1;
shl.b32 t1, $8, 4;
and.b32 t0, t0, 0x0E000E00;
and.b32 t1, t1, 0x80008000;
or.b32 h2, t0, t1;
shr.b32 t0, $8, 3;
and.b32 t0, t0, 0x0E000E00;
and.b32 t1, $8, 0x80008000;
or.b32 h3, t0, t1;
mov.b32 {l, u}, h0;
cvt.f32.f16 $0, l;
cvt.f32.f16 $2, u;
mov.b32 {l, u}, h2;
cvt.f32.f16 $1, l;
cvt.f32.f16 $3, u;
mov.b32 {l, u}, h1;
cvt.f32.f16 $4, l;
cvt.f32.f16 $6, u;
mov.b32 {l, u}, h3;
cvt.f32.f16 $5, l;
cvt.f32.f16 $7, u;
}
""")


@triton.jit
def decode_bytes(c, USE_ASM: tl.constexpr):
    """Code bytes (uint8) -> (low nibble, high nibble) as fp32 E2M1·2^-14 each.

    USE_ASM (compiled GPU code): two weights per integer instruction (`DECODE_ASM`);
    otherwise (and in the interpreter) the same bit move one nibble at a time."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            DECODE_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [c],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=4,
        )
    else:
        c16 = c.to(tl.uint16)
        lo = e2m1_times_2pow_m14(c16 & 15).to(tl.float32)
        hi = e2m1_times_2pow_m14(c16 >> 4).to(tl.float32)
    return lo, hi


@triton.jit
def scale_times_2pow14(code, MAN: tl.constexpr, BIAS: tl.constexpr):
    """Block-scale codes (int32) to fp32 value·2^14, from exponent bits.

    E8M0 (MAN == 0) is 2^(c-127+14): exact for codes <= 240 (scales up to 2^113); larger
    codes read as +Inf. Minifloats are mantissa·2^(max(e, 1) - BIAS - MAN + 14), subnormals
    included.
    """
    if MAN == 0:
        return (tl.minimum(code + 14, 255) << 23).to(tl.float32, bitcast=True)
    e = code >> MAN
    m = code & ((1 << MAN) - 1)
    mant = tl.where(e > 0, m + (1 << MAN), m).to(tl.float32)
    p2 = ((tl.maximum(e, 1) + (127 + 14 - BIAS - MAN)) << 23).to(tl.float32, bitcast=True)
    return mant * p2
