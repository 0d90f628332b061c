"""The runtime kernels compiled for the H100 (sm_90) on this machine, GPU-free.

The interpreter runs the kernels' Python, not their GPU build: branches taken only on the GPU
(inline PTX, the plain twins with USE_ASM off, cp.async pipelines, split-K atomics) and the
compiler's rules (no plain Python globals inside @jit) are checked nowhere else on CI. Triton
ships ptxas, so each variant is lowered to PTX and assembled to a cubin here; the PTX must
hold the instructions the variant is built on. The build runs in one child process without
TRITON_INTERPRET (under it, @triton.jit gives interpreter objects that cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

try:
    import triton
except ImportError:  # triton missing or broken
    triton = None

pytestmark = pytest.mark.skipif(triton is None, reason="triton is not importable")

POINTERS = {
    "x_ptr": "*bf16",
    "codes_ptr": "*u8",
    "scales_ptr": "*u8",
    "g_ptr": "*fp32",
    "bias_ptr": "*bf16",
    "out_ptr": "*bf16",
    "ws_ptr": "*fp32",
    "cnt_ptr": "*i32",
    "eid_ptr": "*i64",
}
COMMON = dict(BLOCK=16, MAN=3, BIAS=7, HAS_GLOBAL=True, USE_ASM=True)  # nvfp4, compiled PTX
GEMM_BASE = dict(
    COMMON,
    K=4096,
    HAS_BIAS=True,
    DOT_BF16=True,
    BLOCK_N=32,
    BLOCK_M=16,
    BLOCK_K=256,
    HALVES=False,
    SPLIT=1,
    PAIRS=True,
    UNROLL=1,
)
GEMV_BASE = dict(
    COMMON,
    K=1024,
    HAS_BIAS=False,
    X_PAIRS=True,
    BLOCK_N=4,
    BLOCK_K=512,
    STAGES=1,
)
ROWS_BASE = dict(GEMV_BASE, EXPERTS=False, XDIV=1)
FP16_IO = {"x_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp16"}
# Inline PTX shows in the PTX by its masks: the pair decoder's, the scale decoder's and the
# fp32 decoder's; the scale decoder's multiplier (bf16 2^110 / 2^106) names the codec.
WORDS, SCALE, BYTES = "0x01C001C0", "0x00100010", "0x0E000E00"
LIFT_E4M3, LIFT_UE5M3 = "0x76807680", "0x74807480"
# name: (kernel, constexpr overrides, pointer overrides, warps, stages, PTX it must hold, PTX
# it must not hold)
CASES = {
    "gemm-pairs-e4m3-split": (
        "gemm",
        dict(SPLIT=4),
        {},
        2,
        3,
        [WORDS, SCALE, LIFT_E4M3, "mma.sync", "cp.async", "atom"],
        [BYTES, LIFT_UE5M3],
    ),
    "gemm-pairs-ue5m3-unroll": (
        "gemm",
        dict(BIAS=15, UNROLL=2, BLOCK_K=128),
        {},
        2,
        4,
        [WORDS, SCALE, LIFT_UE5M3],
        [LIFT_E4M3],
    ),
    "gemm-pairs-twin": ("gemm", dict(USE_ASM=False), {}, 2, 3, ["mma.sync"], [WORDS, SCALE]),
    "gemm-fp32-halves": (
        "gemm",
        dict(PAIRS=False, HALVES=True, BLOCK_N=64, BLOCK_K=128),
        {},
        4,
        4,
        [BYTES],
        [WORDS],
    ),
    "gemm-fp32-e8m0-fp16": (
        "gemm",
        dict(PAIRS=False, MAN=0, BIAS=127, DOT_BF16=False),
        FP16_IO,
        4,
        3,
        ["mma.sync"],
        [],
    ),
    "gemm-large-wgmma": (
        "gemm",
        dict(PAIRS=False, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64),
        {},
        8,
        3,
        ["wgmma"],
        [],
    ),
    "gemv-rows": ("rows", dict(SPLIT=1, VB=4), {"x_ptr": "*i32"}, 1, 1, [BYTES], ["atom"]),
    "gemv-rows-split-e8m0": (
        "rows",
        dict(SPLIT=2, VB=8, MAN=0, BIAS=127),
        {"x_ptr": "*i32"},
        1,
        1,
        ["atom"],
        [],
    ),
    "gemv-rows-twin": (
        "rows",
        dict(SPLIT=1, VB=4, USE_ASM=False),
        {"x_ptr": "*i32"},
        1,
        1,
        [],
        [BYTES],
    ),
    "gemv-rows-experts-split": (
        "rows",
        dict(SPLIT=2, VB=8, EXPERTS=True, XDIV=8),
        {"x_ptr": "*i32"},
        1,
        1,
        [BYTES, "atom", "ld.global.b64"],
        [],
    ),
    "gemv-tile-b4": ("tile", dict(BLOCK=4, X_PAIRS=False), {}, 4, 1, [BYTES], []),
}


def _build_all() -> dict:
    """Child process: compile every case; {name: PTX or "error: ..."}."""
    from mxptq.kernels import gemm, gemv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {
        "gemm": (gemm._fp4_gemm_kernel, GEMM_BASE),
        "rows": (gemv._fp4_gemv_rows_kernel, ROWS_BASE),
        "tile": (gemv._fp4_gemv_kernel, GEMV_BASE),
    }
    out = {}
    for name, (kind, over, ptrs, warps, stages, _, _) in CASES.items():
        fn, base = kernels[kind]
        consts = {**base, **over}
        types = {**POINTERS, **ptrs}
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        try:
            k = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": warps, "num_stages": stages},
            )
            out[name] = k.asm["ptx"] if k.asm["cubin"] else "error: no cubin"
        except Exception as e:  # reported by the test of this case
            out[name] = f"error: {type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def built() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_builds_for_sm90(built, name):
    ptx = built[name]
    assert not ptx.startswith("error:"), ptx[:3000]
    must, must_not = CASES[name][5], CASES[name][6]
    for instr in must:
        assert instr in ptx, instr
    for instr in must_not:
        assert instr not in ptx, instr


if __name__ == "__main__":
    print(json.dumps(_build_all()))
