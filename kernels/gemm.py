"""Fused FP4 dequantize-GEMM (W4A16): out = x · dequant(W)ᵀ (+ b), weights kept packed.

The kernel computes the transposed product outᵀ[N, M] = W'[N, K] · xᵀ[K, M] ("swap AB"), so the
dequantized weight tile is the register-resident A operand of the tensor-core dot (on Hopper a
wgmma may take A from registers, B from shared memory) and the token dimension M is the dot's
narrow N side: a single token pads to 16 columns, not to 64 rows.

Dequantization is exact and runs in registers. A nibble's bits are moved into an fp16 pattern
((c & 7) << 9 | (c & 8) << 12) whose value is E2M1(c)·2^-14 (code 1, the value 0.5, lands on
an fp16 subnormal), and the block scale is decoded with 2^14 folded in, so the product is
E2M1·S exactly; it has at most 5 significant bits and so is exact in bf16 too. The global scale
divides the fp32 accumulator once in the epilogue, not every weight.

Compiled kernels decode four code bytes at once with inline PTX (`_decode_bytes`: a shift of
the whole 32-bit register moves one nibble of each 16-bit half, so one shift/mask/or makes two
fp16 weights); the interpreter runs the same formula in plain Triton.

`fp4_linear` sends up to `gemv.GEMV_M_MAX` tokens to the GEMV of `gemv.py`; above that one
jitted body serves two autotuned launchers chosen by M: narrow tiles for M <= 64 (many
programs along N, long K steps so that each row read is 128 bytes wide) and 128-wide tiles
with deeper pipelines for the compute-bound large-M case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_M_MAX = 64  # M at or under this uses the skinny launcher
# Inline-PTX nibble decoding in compiled kernels; the interpreter runs the plain-Triton formula.
USE_ASM = not _INTERPRET


@triton.jit
def _e2m1_times_2pow_m14(c):
    """fp16 holding E2M1(c)·2^-14 for codes c (uint16, 0..15): a bit move, no table."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.float16, bitcast=True)


# PTX for `_decode_bytes` on the GPU: 4 code bytes (one 32-bit register) -> 8 fp32 values.
# Each 16-bit half of r holds two bytes; shifting r moves one nibble of each half into the fp16
# bit positions at once (magnitude bits to 9..11, sign bit to 15), so one shift/mask/or makes
# an fp16 pair (two weights), and cvt.f32.f16 unpacks it (exact, subnormals included).
# Outputs $0..$3: low nibbles of bytes 0..3; $4..$7: high nibbles; $8: the 4 bytes.
_DECODE_ASM = tl.constexpr("""
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
def _decode_bytes(c, USE_ASM: tl.constexpr):
    """Code bytes (uint8) -> (low nibble, high nibble) as fp32 E2M1·2^-14 each.

    USE_ASM (compiled GPU code): two weights per integer instruction (`_DECODE_ASM`);
    otherwise (and in the interpreter) the same bit move one nibble at a time."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            _DECODE_ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r",
            [c],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=4,
        )
    else:
        c16 = c.to(tl.uint16)
        lo = _e2m1_times_2pow_m14(c16 & 15).to(tl.float32)
        hi = _e2m1_times_2pow_m14(c16 >> 4).to(tl.float32)
    return lo, hi


@triton.jit
def _scale_times_2pow14(code, MAN: tl.constexpr, BIAS: tl.constexpr):
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


@triton.jit
def _dot(w, xt, acc, DOT_BF16: tl.constexpr):
    """acc += w · xt in bf16 (bf16 activations) or fp32/tf32 (fp16 and fp32 activations)."""
    if DOT_BF16:
        return tl.dot(w.to(tl.bfloat16), xt.to(tl.bfloat16), acc)
    return tl.dot(w, xt.to(tl.float32), acc)


@triton.jit
def _fp4_gemm_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    g_ptr,
    bias_ptr,
    out_ptr,
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
):
    """outᵀ tile [BLOCK_N, BLOCK_M] = Σ_k W'[n, k]·x[m, k]; K must be a multiple of BLOCK_K."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    offs_n = tl.where(n_ok, offs_n, 0)  # clamp: out-of-range rows reread row 0, never stored
    offs_m = tl.where(m_ok, offs_m, 0)
    offs_c = tl.arange(0, BLOCK_K // 2)
    offs_s = tl.arange(0, BLOCK_K // BLOCK)
    c_ptrs = codes_ptr + offs_n[:, None] * (K // 2) + offs_c[None, :]
    s_ptrs = scales_ptr + offs_n[:, None] * (K // BLOCK) + offs_s[None, :]
    if HALVES:  # x's even and odd columns, for the low and the high nibbles
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + 2 * offs_c[:, None]
    else:
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + tl.arange(0, BLOCK_K)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        lo, hi = _decode_bytes(tl.load(c_ptrs), USE_ASM)
        s = _scale_times_2pow14(tl.load(s_ptrs).to(tl.int32), MAN, BIAS)
        if HALVES:
            # Two dots of depth BLOCK_K/2 (low nibbles · even x, high · odd x): no interleave.
            s = tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // BLOCK, BLOCK // 2))
            s = tl.reshape(s, (BLOCK_N, BLOCK_K // 2))
            acc = _dot(lo * s, tl.load(x_ptrs), acc, DOT_BF16)
            acc = _dot(hi * s, tl.load(x_ptrs + 1), acc, DOT_BF16)
        else:
            q = tl.interleave(lo, hi)
            s = tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // BLOCK, BLOCK))
            acc = _dot(q * tl.reshape(s, (BLOCK_N, BLOCK_K)), tl.load(x_ptrs), acc, DOT_BF16)
        c_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // BLOCK
        x_ptrs += BLOCK_K
    if HAS_GLOBAL:
        acc = acc / tl.load(g_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[:, None]
    o_ptrs = out_ptr + offs_m[None, :] * N + offs_n[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def _cfg(bn: int, bk: int, warps: int, stages: int, halves: bool = False) -> triton.Config:
    kw = {"BLOCK_N": bn, "BLOCK_K": bk, "HALVES": halves}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Skinny (GEMV_M_MAX < M <= 64): each program streams BLOCK_N weight rows; narrow BLOCK_N keeps
# >= 1 wave of programs on 132 SMs even at N = 4096, long BLOCK_K gives 128-byte code rows per
# load; nibble order interleaved into one dot, or "halves" (two half-depth dots). At M = 16 on
# the H100, 32-row tiles were fastest on three Llama shapes and 128-row ones on 28672x4096.
SMALL_CONFIGS = [
    _cfg(bn, bk, w, st, h)
    for bn, bk, w, st, h in [
        (32, 256, 4, 4, False),
        (32, 512, 4, 3, False),
        (64, 128, 4, 4, True),
        (128, 128, 8, 3, False),
        (64, 256, 4, 3, True),
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


def min_block_k(block_size: int) -> int:
    """Shortest K step: one dot needs K >= 16, and a step must hold whole scale blocks."""
    return max(16, block_size)


def supported(k: int, block_size: int) -> bool:
    """Whether the kernel takes this K (a multiple of the shortest K step)."""
    return k % min_block_k(block_size) == 0


def _step(c: triton.Config, block_size: int) -> int:
    return min_block_k(block_size) * (2 if c.kwargs["HALVES"] else 1)


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose K step divides K and holds whole scale blocks; else the shortest step."""
    args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    k, b = args["K"], args["BLOCK"]
    ok = [
        c
        for c in configs
        if k % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] % _step(c, b) == 0
    ]
    if ok:
        return ok
    c = configs[0]
    kw = {**c.kwargs, "BLOCK_K": min_block_k(b), "HALVES": False}
    return [triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)]


_AUTOTUNE_KEY = [
    "N", "K", "BLOCK", "MAN", "HAS_GLOBAL", "HAS_BIAS", "DOT_BF16", "USE_ASM", "BLOCK_M"
]


def _bench_graph(kernel_call, quantiles):
    """Autotune on GPU time: replaying a CUDA graph keeps Python launch cost out of the choice
    (skinny calls take less GPU time than their launch takes on the host)."""
    return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


_small = triton.autotune(
    SMALL_CONFIGS,
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_bench_graph,
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
    do_bench=_bench_graph,
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


def _small_block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


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
    n, k = codes.shape[0], codes.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    if not supported(k, block_size):
        raise ValueError(f"K = {k} is not a multiple of {min_block_k(block_size)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if isinstance(config, _gemv.GemvConfig) or (config is None and m <= _gemv.GEMV_M_MAX):
        args = (x2, codes, scale_codes, global_scale, bias, block_size, scale_man_bits)
        out = _gemv.fp4_gemv(*args, scale_bias, USE_ASM, config=config)
        return out.reshape(*x.shape[:-1], n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    g = global_scale if global_scale is not None else codes  # unread when HAS_GLOBAL is False
    b = bias if bias is not None else codes
    args = (x2, codes, scale_codes, g, b, out, m, n, k, x2.stride(0))
    meta = dict(
        BLOCK=block_size,
        MAN=scale_man_bits,
        BIAS=scale_bias,
        HAS_GLOBAL=global_scale is not None,
        HAS_BIAS=bias is not None,
        # The interpreter's numpy dot misreads bf16 operands, so there the dot runs in fp32.
        DOT_BF16=x.dtype == torch.bfloat16 and not _INTERPRET,
        USE_ASM=USE_ASM,
    )
    if config is None and _INTERPRET:
        bm = _small_block_m(m) if m <= SMALL_M_MAX else 64
        config = GemmConfig(16, bm, min_block_k(block_size))
    if config is not None:
        step = min_block_k(block_size) * (2 if config.halves else 1)
        if k % config.block_k or config.block_k % step:
            raise ValueError(
                f"BLOCK_K = {config.block_k} must divide K = {k} and be a multiple of {step}"
            )
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
        _fp4_gemm_kernel[grid](
            *args,
            **meta,
            BLOCK_N=config.block_n,
            BLOCK_M=config.block_m,
            BLOCK_K=config.block_k,
            HALVES=config.halves,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    elif m <= SMALL_M_MAX:
        bm = _small_block_m(m)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, bm))  # noqa: E731
        _small[grid](*args, **meta, BLOCK_M=bm)
    else:
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(n, meta["BLOCK_N"]),
            triton.cdiv(m, meta["BLOCK_M"]),
        )
        _large[grid](*args, **meta)
    return out.reshape(*x.shape[:-1], n)


from . import gemv as _gemv  # noqa: E402  (gemv imports this module's jitted helpers)


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
