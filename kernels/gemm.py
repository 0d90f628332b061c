"""Fused FP4 dequantize-GEMM (W4A16): out = x · dequant(W)ᵀ (+ b), weights kept packed.

The kernel computes the transposed product outᵀ[N, M] = W'[N, K] · xᵀ[K, M] ("swap AB"), so the
dequantized weight tile is the register-resident A operand of the tensor-core dot and the token
dimension M is the dot's narrow N side: a single token pads to 16 columns, not to 64 rows.

Dequantization is exact and runs in registers, by one of two decoders:

- bf16 pairs (`pairs_apply`: bf16 activations, B >= 8, E4M3/UE5M3 scales): inline PTX turns a
  word of 8 codes into 8 bf16 weights E2M1·S·2^(PAIR_SHIFT-126), two a register, with one
  prmt/shift/2-mask sequence and one bf16x2 FMA by the block scale per pair (`_WORDS_ASM`);
  the epilogue undoes the power of two; the block scale becomes its bf16 pair in three
  instructions (`_scale_asm`). About 4.5 instructions a weight in the skinny loop.
- fp32 (otherwise): a nibble's bits are moved into an fp16 pattern ((c & 7) << 9 | (c & 8) <<
  12) whose value is E2M1(c)·2^-14, four code bytes at a time with inline PTX
  (`_decode_bytes`), and multiplied in fp32 by the block scale decoded with 2^14 folded in.

Either way the product E2M1·S has at most 5 significant bits and is exact; the global scale
divides the fp32 accumulator once in the epilogue, not every weight. The interpreter runs
plain-Triton twins of the PTX.

`fp4_linear` sends up to `gemv.GEMV_M_MAX` tokens to the GEMV of `gemv.py`; above that one
jitted body serves two autotuned launchers chosen by M: skinny tiles for M <= 64 (32 rows on
2 warps, optional split-K reduced in slice order by the tile's last program) and 128-wide tiles
with deeper pipelines for the compute-bound large-M case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import gemv as _gemv
from .fp4_codes import INTERPRET, USE_ASM, decode_bytes, e2m1_times_2pow_m14, scale_times_2pow14
from .launch import Call, Launcher, bench_graph, check_direct
from .splitk import counters, split_k_sum, workspace

SMALL_M_MAX = 64  # M at or under this uses the skinny launcher


# bf16 "pairs" decoding (bf16 activations, scale codecs with a mantissa, B >= 8): weights leave
# the decoder as bf16 values E2M1·S·2^(PAIR_SHIFT - 126), already scaled and in the dot's dtype,
# two a register. A nibble's sign goes to bf16 bit 15 and its 3 magnitude bits to bits 6..8:
# exponent field e, so the value is E2M1·2^-126 (code 1 on a bf16 subnormal); one bf16x2 FMA
# by S·2^PAIR_SHIFT (block scale, decoded once a block) scales both halves. Every product has
# at most 6 significant bits and, for E4M3 and UE5M3 scales, lies in bf16's normal range
# (2^-44 .. 2^121), so it is exact; the epilogue multiplies the fp32 result by 2^(126 - shift).
PAIR_SHIFT = 100
_PAIR_UNSCALE = tl.constexpr(2.0 ** (126 - PAIR_SHIFT))

# PTX for `_decode_words`: one word of 8 codes ($8, weights k0..k7 in nibbles 0..7) and its
# scale pair ($9: S·2^PAIR_SHIFT as bf16 in both halves) -> 8 bf16 weights $0..$7 (k order).
# For byte j, prmt puts its low nibble (from q << 4) and its high nibble at the top of the two
# 16-bit halves; the signs stay at bits 15/31, `>> 6` moves the magnitudes to bits 6..8 /
# 22..24, and fma(pair, scale, -0) scales both weights at once.
_WORDS_ASM = tl.constexpr(
    """
{
.reg .b32 q4, r, t, z;
mov.b32 z, 0x80008000;
shl.b32 q4, $8, 4;
"""
    + "".join(
        f"""prmt.b32 r, q4, $8, 0x{4 + j}{4 + j}{j}{j};
shr.b32 t, r, 6;
and.b32 t, t, 0x01C001C0;
and.b32 r, r, 0x80008000;
or.b32 r, r, t;
fma.rn.bf16x2 r, r, $9, z;
mov.b32 {{${2 * j}, ${2 * j + 1}}}, r;
"""
        for j in range(4)
    )
    + "}"
)


@triton.jit
def _nibble(q, i: tl.constexpr, f):
    """bf16 weight i of each word q (int32): E2M1(nibble i)·f, f = S·2^(PAIR_SHIFT - 126)."""
    c = ((q >> (4 * i)) & 15).to(tl.uint16)
    return (e2m1_times_2pow_m14(c).to(tl.float32) * f).to(tl.bfloat16)


@triton.jit
def _decode_words(q, sp, USE_ASM: tl.constexpr):
    """Code words q (int32 [R, W], 8 codes of one scale block each) and their scale pairs sp
    (int32: bf16 S·2^PAIR_SHIFT in both halves) -> bf16 weights [R, 8W] in K order.

    Every output depends on its own word only, so Triton may lay the words out as it likes;
    the 8 weights of a word come back as 8 tensors shaped like q, which joins (register renames
    in Triton's layouts) put in K order. The interpreter computes the same values in fp32."""
    R: tl.constexpr = q.shape[0]
    W: tl.constexpr = q.shape[1]
    if USE_ASM:
        w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
            _WORDS_ASM,
            "=h,=h,=h,=h,=h,=h,=h,=h,r,r",
            [q, sp],
            dtype=(tl.bfloat16,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        f = (sp << 16).to(tl.float32, bitcast=True) * 2.0**-112  # the low half, times 2^-112
        w0 = _nibble(q, 0, f)
        w1 = _nibble(q, 1, f)
        w2 = _nibble(q, 2, f)
        w3 = _nibble(q, 3, f)
        w4 = _nibble(q, 4, f)
        w5 = _nibble(q, 5, f)
        w6 = _nibble(q, 6, f)
        w7 = _nibble(q, 7, f)
    # v[r, w, a, b, c] = weight 4c + 2b + a; swapping a and c puts weight i at flat index i
    v = tl.join(
        tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7))
    )
    return tl.reshape(tl.permute(v, (0, 1, 4, 3, 2)), (R, 8 * W))


# PTX for `_scale_pairs`: a scale code c (3 mantissa bits) -> bf16 S·2^PAIR_SHIFT in both
# halves. c·0x00100010 puts c << 4 in each half; read as bf16 that is S·2^(BIAS-127) exactly
# (the code's exponent and mantissa fields land on bf16's, its subnormals on bf16 subnormals,
# which bf16x2 arithmetic keeps), and two exact bf16x2 multiplies by 2^LIFT lift it to
# S·2^PAIR_SHIFT (LIFT = (PAIR_SHIFT + 127 - BIAS) / 2: 110 for E4M3, 106 for UE5M3; the
# product after the first multiply is a normal bf16 for every code). Three instructions where
# a decode through fp16 and fp32 took six.
def _lift(bias: int) -> int:
    lift = PAIR_SHIFT + 127 - bias
    assert lift % 2 == 0 and lift // 2 <= 127
    return lift // 2


def _scale_asm(bias: int) -> str:
    c = (_lift(bias) + 127) << 7  # bf16 2^LIFT
    return f"""
{{
.reg .b32 t, c, z;
mov.b32 z, 0x80008000;
mov.b32 c, 0x{c | (c << 16):08X};
mul.lo.u32 t, $1, 0x00100010;
fma.rn.bf16x2 t, t, c, z;
fma.rn.bf16x2 $0, t, c, z;
}}
"""


_SCALE_ASM_E4M3 = tl.constexpr(_scale_asm(7))
_SCALE_ASM_UE5M3 = tl.constexpr(_scale_asm(15))
_LIFT_E4M3 = tl.constexpr(2.0 ** _lift(7))
_LIFT_UE5M3 = tl.constexpr(2.0 ** _lift(15))


@triton.jit
def _scale_pairs(code, BIAS: tl.constexpr, USE_ASM: tl.constexpr):
    """Block-scale codes (int32, 3 mantissa bits, exponent bias BIAS: E4M3 or UE5M3) -> int32
    holding bf16 S·2^PAIR_SHIFT (exact) in both halves, the operand of the decoder's bf16x2
    multiply. USE_ASM: `_scale_asm`'s PTX; otherwise the same steps in fp32."""
    tl.static_assert(BIAS == 7 or BIAS == 15)
    if USE_ASM and BIAS == 7:  # the asm string must be a literal constexpr, not an expression
        sp = tl.inline_asm_elementwise(
            _SCALE_ASM_E4M3, "=r,r", [code], dtype=tl.int32, is_pure=True, pack=1
        )
    elif USE_ASM:
        sp = tl.inline_asm_elementwise(
            _SCALE_ASM_UE5M3, "=r,r", [code], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        lift = _LIFT_E4M3 if BIAS == 7 else _LIFT_UE5M3
        v = (code << 20).to(tl.float32, bitcast=True)  # c << 4 as bf16, in fp32
        v = (v * lift) * lift
        b = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        sp = b | (b << 16)
    return sp


@triton.jit
def _dot(w, xt, acc, DOT_BF16: tl.constexpr):
    """acc += w · xt in bf16 (bf16 activations) or fp32/tf32 (fp16 and fp32 activations)."""
    if DOT_BF16:
        return tl.dot(w.to(tl.bfloat16), xt.to(tl.bfloat16), acc)
    return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)


@triton.jit
def _fp4_gemm_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    g_ptr,
    bias_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K: tl.constexpr,
    stride_xm,
    BLOCK: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALVES: tl.constexpr,
    USE_ASM: tl.constexpr,
    SPLIT: tl.constexpr,
    PAIRS: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """outᵀ tile [BLOCK_N, BLOCK_M] = Σ_k W'[n, k]·x[m, k]; K must be a multiple of BLOCK_K.

    SPLIT > 1 (split-K): grid axis 2 is the K slice (SPLIT divides the K steps); partials go to
    ws [SPLIT, M, N] and the last program of a tile (tile counter, as in the GEMV's split-K)
    adds them in slice order, so the result does not depend on which program ends last."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    STEPS: tl.constexpr = K // BLOCK_K // SPLIT  # K steps a program
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    offs_n = tl.where(n_ok, offs_n, 0)  # clamp: out-of-range rows reread row 0, never stored
    offs_m = tl.where(m_ok, offs_m, 0)
    offs_c = tl.arange(0, BLOCK_K // 2)
    offs_s = tl.arange(0, BLOCK_K // BLOCK)
    # codes as bytes, or (PAIRS) as int32 words of 8 codes
    CPW: tl.constexpr = 8 if PAIRS else 2  # codes a pointer step
    if PAIRS:
        c_ptrs = codes_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (K // 8)
        c_ptrs += tl.arange(0, BLOCK_K // 8)[None, :]
    else:
        c_ptrs = codes_ptr + offs_n[:, None] * (K // 2) + offs_c[None, :]
    s_ptrs = scales_ptr + offs_n[:, None] * (K // BLOCK) + offs_s[None, :]
    if HALVES and not PAIRS:  # x's even and odd columns, for the low and the high nibbles
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + 2 * offs_c[:, None]
    else:
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + tl.arange(0, BLOCK_K)[:, None]
    if SPLIT > 1:
        c_ptrs += pid_k * STEPS * (BLOCK_K // CPW)
        s_ptrs += pid_k * STEPS * (BLOCK_K // BLOCK)
        x_ptrs += pid_k * STEPS * BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in tl.range(0, STEPS, loop_unroll_factor=UNROLL):
        if PAIRS:
            s = _scale_pairs(tl.load(s_ptrs).to(tl.int32), BIAS, USE_ASM)
            s = tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // BLOCK, BLOCK // 8))
            w = _decode_words(tl.load(c_ptrs), tl.reshape(s, (BLOCK_N, BLOCK_K // 8)), USE_ASM)
            acc = _dot(w, tl.load(x_ptrs), acc, DOT_BF16)
        elif HALVES:
            lo, hi = decode_bytes(tl.load(c_ptrs), USE_ASM)
            s = scale_times_2pow14(tl.load(s_ptrs).to(tl.int32), MAN, BIAS)
            # Two dots of depth BLOCK_K/2 (low nibbles · even x, high · odd x): no interleave.
            s = tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // BLOCK, BLOCK // 2))
            s = tl.reshape(s, (BLOCK_N, BLOCK_K // 2))
            acc = _dot(lo * s, tl.load(x_ptrs), acc, DOT_BF16)
            acc = _dot(hi * s, tl.load(x_ptrs + 1), acc, DOT_BF16)
        else:
            lo, hi = decode_bytes(tl.load(c_ptrs), USE_ASM)
            s = scale_times_2pow14(tl.load(s_ptrs).to(tl.int32), MAN, BIAS)
            q = tl.interleave(lo, hi)
            s = tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // BLOCK, BLOCK))
            acc = _dot(q * tl.reshape(s, (BLOCK_N, BLOCK_K)), tl.load(x_ptrs), acc, DOT_BF16)
        c_ptrs += BLOCK_K // CPW
        s_ptrs += BLOCK_K // BLOCK
        x_ptrs += BLOCK_K
    if PAIRS:
        acc = acc * _PAIR_UNSCALE
    ok = n_ok[:, None] & m_ok[None, :]
    last = True
    if SPLIT > 1:
        w_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        last, acc = split_k_sum(acc, w_ptrs, ok, M * N, pid_k, cnt, SPLIT)
    if last:
        _gemm_epilogue(acc, g_ptr, bias_ptr, out_ptr, N, offs_n, offs_m, ok, HAS_GLOBAL, HAS_BIAS)


@triton.jit
def _gemm_epilogue(
    acc,
    g_ptr,
    bias_ptr,
    out_ptr,
    N,
    offs_n,
    offs_m,
    ok,
    HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Global scale, bias, cast and store of an fp32 outᵀ tile."""
    if HAS_GLOBAL:
        acc = acc / tl.load(g_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
    o_ptrs = out_ptr + offs_m[None, :] * N + offs_n[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _cfg(
    bn: int, bk: int, warps: int, stages: int, halves: bool = False, split: int = 1, unroll: int = 1
) -> triton.Config:
    kw = {"BLOCK_N": bn, "BLOCK_K": bk, "HALVES": halves, "SPLIT": split, "UNROLL": unroll}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Skinny (GEMV_M_MAX < M <= 64): each program streams BLOCK_N weight rows over K (or a slice of
# K: split-K); long BLOCK_K gives 128-byte code rows per load. Two warps over 32 rows make two
# 16-row mma.sync A operands with no warp duplicating another's decode (4 warps over 32 rows
# would split the 16 tokens and decode every weight twice; 64 rows and 4 warps move to wgmma,
# whose register A operand needs a layout change through shared memory). H100, bf16 pairs,
# CUDA-graph times: at M = 16, 32 rows / 256-step / 2 warps won on all four Llama shapes, with
# split-K 4 at K = 4096 except 28672 rows (1 or 2 slices) and 4 at K = 14336; 3 or 4 stages;
# unrolling the K loop by 2 lost there but won 3 of 4 shapes at M = 32 (128-step, split 4).
# The 4- and 8-warp tiles serve fp16/fp32 activations and M = 64.
SMALL_CONFIGS = [
    _cfg(bn, bk, w, st, h, sp, un)
    for bn, bk, w, st, h, sp, un in [
        (32, 256, 2, 3, False, 1, 1),
        (32, 256, 2, 3, False, 2, 1),
        (32, 256, 2, 3, False, 4, 1),
        (32, 256, 2, 4, False, 2, 1),
        (32, 256, 2, 4, False, 4, 1),
        (32, 128, 2, 4, False, 4, 1),
        (32, 128, 2, 3, False, 4, 2),
        (64, 256, 2, 3, False, 2, 1),
        (32, 256, 4, 4, False, 1, 1),
        (64, 128, 4, 4, True, 1, 1),
        (128, 128, 8, 3, False, 1, 1),
    ]
]
# Large M: 128-row weight tiles (one warpgroup-wide wgmma A operand per 64 rows).
LARGE_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(128, 64, 8, 4),
    _cfg(128, 128, 8, 3),
    _cfg(64, 64, 4, 4),
    _cfg(64, 128, 4, 3),
]
LARGE_BLOCK_M = (128, 256)
SMALL_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in SMALL_CONFIGS)
SMALL_MAX_SPLIT = max(c.kwargs["SPLIT"] for c in SMALL_CONFIGS)


def min_block_k(block_size: int) -> int:
    """Shortest K step: one dot needs K >= 16, and a step must hold whole scale blocks."""
    return max(16, block_size)


def supported(k: int, block_size: int) -> bool:
    """Whether the kernel takes this K (a multiple of the shortest K step)."""
    return k % min_block_k(block_size) == 0


def pairs_apply(dtype: torch.dtype, block_size: int, scale_man_bits: int, scale_bias: int) -> bool:
    """Whether the dot kernel decodes bf16 pairs: bf16 activations, blocks of >= 8 weights (4
    code bytes share a scale) and an E4M3 or UE5M3 scale (every scaled weight is a normal bf16
    after the fixed 2^PAIR_SHIFT; E8M0's range is too wide for that)."""
    return (
        dtype == torch.bfloat16
        and block_size >= 8
        and scale_man_bits == 3
        and scale_bias in (7, 15)
    )


def _step(c: triton.Config, block_size: int) -> int:
    return min_block_k(block_size) * (2 if c.kwargs["HALVES"] else 1)


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose K step divides K and holds whole scale blocks; else the shortest step."""
    args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    k, b = args["K"], args["BLOCK"]
    ok = [
        c
        for c in configs
        if k % c.kwargs["BLOCK_K"] == 0
        and c.kwargs["BLOCK_K"] % _step(c, b) == 0
        and (k // c.kwargs["BLOCK_K"]) % c.kwargs["SPLIT"] == 0
    ]
    if ok:
        return ok
    c = configs[0]
    kw = {**c.kwargs, "BLOCK_K": min_block_k(b), "HALVES": False, "SPLIT": 1}
    return [triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)]


_AUTOTUNE_KEY = [
    "N",
    "K",
    "BLOCK",
    "MAN",
    "HAS_GLOBAL",
    "HAS_BIAS",
    "DOT_BF16",
    "USE_ASM",
    "PAIRS",
    "BLOCK_M",
]


_small = triton.autotune(
    SMALL_CONFIGS,
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=bench_graph,
)(_fp4_gemm_kernel)
_large_configs = [
    triton.Config({**c.kwargs, "BLOCK_M": bm}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in LARGE_CONFIGS
    for bm in LARGE_BLOCK_M
]
_large = triton.autotune(
    _large_configs,
    key=[k for k in _AUTOTUNE_KEY if k != "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=bench_graph,
)(_fp4_gemm_kernel)


@dataclass(frozen=True)
class GemmConfig:
    """A fixed launch configuration (bypasses autotuning; tests and the interpreter use it)."""

    block_n: int
    block_m: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    halves: bool = False  # two half-depth dots (low/high nibbles) instead of an interleave
    split: int = 1  # K slices a tile (split-K); must divide K / block_k
    pairs: bool = True  # bf16 pair decoding where it applies (`pairs_apply`); False: fp32 decode
    unroll: int = 1  # K-loop unroll factor (more independent work between waits)


def _small_block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _check_shapes(x: torch.Tensor, codes: torch.Tensor, block_size: int) -> int:
    k = codes.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    if not supported(k, block_size):
        raise ValueError(f"K = {k} is not a multiple of {min_block_k(block_size)}")
    return k


def linear_call(
    x2: torch.Tensor,
    out: torch.Tensor,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
    config: GemmConfig | _gemv.GemvConfig | None = None,
) -> Call:
    """The launch that writes out [M, N] = x2 [M, K] · dequant(W)ᵀ + bias (x2's rows have unit
    column stride; M, N > 0): the GEMV up to `gemv.GEMV_M_MAX` tokens (or with a GemvConfig),
    else the dot kernel (skinny tiles up to SMALL_M_MAX tokens, large ones above)."""
    m, k = x2.shape
    n = codes.shape[0]
    if isinstance(config, _gemv.GemvConfig) or (config is None and m <= _gemv.GEMV_M_MAX):
        args = (codes, scale_codes, global_scale, bias, block_size, scale_man_bits, scale_bias)
        return _gemv.gemv_call(x2, out, *args, USE_ASM, config)
    if config is None and INTERPRET:
        bm = _small_block_m(m) if m <= SMALL_M_MAX else 64
        config = GemmConfig(16, bm, min_block_k(block_size))
    small = config is not None or m <= SMALL_M_MAX
    named = dict(
        codes_ptr=codes,
        scales_ptr=scale_codes,
        g_ptr=global_scale if global_scale is not None else codes,  # unread without a global
        bias_ptr=bias if bias is not None else codes,
        ws_ptr=codes,  # unread when SPLIT == 1
        cnt_ptr=codes,
        M=m,
        N=n,
        K=k,
        stride_xm=x2.stride(0),
        BLOCK=block_size,
        MAN=scale_man_bits,
        BIAS=scale_bias,
        HAS_GLOBAL=global_scale is not None,
        HAS_BIAS=bias is not None,
        # The interpreter's numpy dot misreads bf16 operands, so there the dot runs in fp32.
        DOT_BF16=x2.dtype == torch.bfloat16 and not INTERPRET,
        USE_ASM=USE_ASM,
        PAIRS=pairs_apply(x2.dtype, block_size, scale_man_bits, scale_bias)
        and codes.data_ptr() % 4 == 0  # read as int32 words
        and (config is None or config.pairs),
    )
    # split-K scratch (fp32 partials) and tile counters, for the tiles that may split K
    split = config.split if config is not None else SMALL_MAX_SPLIT
    if small and split > 1:
        bn = config.block_n if config is not None else SMALL_MIN_BLOCK_N
        named["ws_ptr"] = workspace(x2.device, split * m * n)
        named["cnt_ptr"] = counters(x2.device, triton.cdiv(n, bn) * triton.cdiv(m, 16))
    dyn, views = (x2, out), (None, None)
    if config is not None:
        step = min_block_k(block_size) * (2 if config.halves else 1)
        if k % config.block_k or config.block_k % step or (k // config.block_k) % config.split:
            raise ValueError(
                f"BLOCK_K = {config.block_k} must divide K = {k} and be a multiple of {step}, "
                f"and split = {config.split} must divide the {k // config.block_k} K steps"
            )
        tile = dict(
            BLOCK_N=config.block_n,
            BLOCK_M=config.block_m,
            BLOCK_K=config.block_k,
            HALVES=config.halves,
            SPLIT=config.split,
            UNROLL=config.unroll,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split)
        return Call(_fp4_gemm_kernel, grid, dyn, named, views, tile)
    if small:
        named["BLOCK_M"] = bm = _small_block_m(m)
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(n, meta["BLOCK_N"]),
            triton.cdiv(m, bm),
            meta["SPLIT"],
        )
        return Call(_fp4_gemm_kernel, grid, dyn, named, views, tuner=_small)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), 1)  # noqa: E731
    return Call(_fp4_gemm_kernel, grid, dyn, named, views, tuner=_large)


def fp4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
    config: GemmConfig | _gemv.GemvConfig | None = None,
) -> torch.Tensor:
    """x [..., K] · dequant(W)ᵀ + bias, in x's dtype, for codes [N, K/2] (uint8) and block-scale
    codes [N, K/B] (uint8 storage of any codec). Up to `gemv.GEMV_M_MAX` tokens (or with a
    GemvConfig) the GEMV kernel of `gemv.py` runs; otherwise the dot kernel here, where bf16
    activations use a bf16 dot and fp16 and fp32 activations an fp32 (tf32 on GPU) dot, which
    holds fp16 values without loss."""
    k = _check_shapes(x, codes, block_size)
    n = codes.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] and n:
        args = (codes, scale_codes, global_scale, bias, block_size, scale_man_bits, scale_bias)
        linear_call(x2, out, *args, config=config).launch()
    return out.reshape(*x.shape[:-1], n)


def planned_linear(
    x: torch.Tensor,
    stream: int,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
) -> tuple[torch.Tensor, Launcher]:
    """`fp4_linear` for a contiguous x (at least one token) that also returns a Launcher for
    the tile it ran: `launcher(stream, x', out')` computes the same for any x' of x's shape,
    dtype, device and 16-byte alignment on this stream, into a fresh contiguous out' of the
    result's shape. On a kernel's first specialization the direct launch is checked bit for
    bit against Triton's own."""
    k = _check_shapes(x, codes, block_size)
    n = codes.shape[0]
    out = x.new_empty((*x.shape[:-1], n))
    args = (codes, scale_codes, global_scale, bias, block_size, scale_man_bits, scale_bias)
    call = linear_call(x.view(-1, k), out.view(-1, n), *args)
    launcher = call.launcher(call.launch())
    check_direct(launcher, stream, (x, torch.empty_like(out)), out)
    return out, launcher


def quantized_linear(x: torch.Tensor, qt, bias: torch.Tensor | None = None, config=None):
    """`fp4_linear` on a QuantizedTensor's bytes (block-scale codes read as uint8, whatever
    their storage dtype); `config` fixes the tile (GemmConfig or gemv.GemvConfig)."""
    sc = qt.format.scale
    return fp4_linear(
        x,
        qt.codes,
        qt.scales.view(torch.uint8),
        qt.global_scale,
        bias,
        qt.format.block_size,
        sc.man_bits,
        sc.bias,
        config=config,
    )
