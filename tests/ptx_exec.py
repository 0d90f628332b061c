"""A tiny executor for the inline PTX of the runtime kernels, so tests check the PTX text
itself on a machine without a GPU.

It knows the instructions the kernels use: shl/shr/and/or/mov/prmt .b32 (prmt in its default
byte-select mode), `mul.lo.u32`, `mov.b32 {lo, hi}, r` (split into 16-bit halves),
`cvt.f32.f16` (fp16 bits to a Python float, exact) and `fma.rn.bf16x2` (computed exactly, bf16
subnormals included; a result that would need rounding fails the test, since the kernels rely
on exact products).
"""

from __future__ import annotations

import os

import numpy as np
import torch

M32 = 0xFFFFFFFF
# use_asm values for kernel tests: inline PTX runs only in compiled kernels (a GPU with
# TRITON_INTERPRET=0); the test modules default to the interpreter
ASM_CASES = (
    [False, True]
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    else [False]
)


def bf16_bits(v: float) -> int:
    """bf16 bit pattern of v, which must be exactly representable."""
    b = torch.tensor([v], dtype=torch.float64).to(torch.bfloat16)
    assert float(b) == v, f"{v} is not a bf16 value"
    return int(b.view(torch.int16)) & 0xFFFF


def bf16_value(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16))


def run_ptx(asm: str, regs: dict[str, int], min_ops: int = 20) -> dict[str, int | float]:
    """Execute `asm` (the text passed to tl.inline_asm_elementwise) with input registers
    `regs` ({"$8": value, ...}); returns every register afterwards. At least `min_ops`
    instructions must run, so an emptied asm string cannot pass."""
    reg: dict[str, int | float] = dict(regs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else reg[tok])

    n_ops = 0
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        n_ops += 1
        if rest.startswith("{"):  # mov.b32 {lo, hi}, r
            assert op == "mov.b32"
            halves, src = rest.split("}")
            lo, hi = (t.strip() for t in halves.strip("{ ").split(","))
            r = val(src.strip(", "))
            reg[lo], reg[hi] = r & 0xFFFF, r >> 16
            continue
        dst, *src = [t.strip() for t in rest.split(",")]
        a = val(src[0])
        if op == "mov.b32":
            reg[dst] = a
        elif op == "shl.b32":
            reg[dst] = (a << val(src[1])) & M32
        elif op == "shr.b32":
            reg[dst] = a >> val(src[1])
        elif op == "and.b32":
            reg[dst] = a & val(src[1])
        elif op == "or.b32":
            reg[dst] = a | val(src[1])
        elif op == "mul.lo.u32":
            reg[dst] = (a * val(src[1])) & M32
        elif op == "prmt.b32":  # selector nibble i picks byte i of {b, a}
            b, sel = val(src[1]), val(src[2])
            assert all(not (sel >> (4 * i + 3)) & 1 for i in range(4)), "sign mode unused"
            pool = a | (b << 32)
            reg[dst] = sum(
                ((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4)
            )
        elif op == "cvt.f32.f16":
            reg[dst] = float(np.array([a], dtype=np.uint16).view(np.float16)[0])
        elif op == "fma.rn.bf16x2":
            b, c = val(src[1]), val(src[2])
            out = 0
            for h in (0, 16):
                v = bf16_value((a >> h) & 0xFFFF) * bf16_value((b >> h) & 0xFFFF)
                out |= bf16_bits(v + bf16_value((c >> h) & 0xFFFF)) << h
            reg[dst] = out
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    assert n_ops >= min_ops
    return reg


def asm_text(const) -> str:
    """The string inside a tl.constexpr (or the string itself)."""
    return const.value if hasattr(const, "value") else const
