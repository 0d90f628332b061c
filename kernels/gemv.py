"""FP4 GEMV for a few tokens (W4A16, M <= GEMV_M_MAX): no tensor-core dot, one pass over K.

Each program owns BLOCK_N weight rows and one token; grid (M, N / BLOCK_N) with the token axis
fastest, so the programs reading the same weight rows for different tokens run together and all
but the first find the rows in L2. A K step loads codes as a 3-D tile [BLOCK_N, BLOCK_K/B, B/2]
(rows, scale blocks, code bytes of a block) by pointer arithmetic, decodes the low and high
nibbles to fp32 E2M1·2^-14 (`fp4_codes.decode_bytes`: inline PTX on the GPU, two weights
per integer instruction), multiplies them by x's even and odd columns, sums each scale block inside
the thread and only then multiplies the block's partial sum by its decoded scale (one multiply
per block, not per weight). The [BLOCK_N, BLOCK_K/B] fp32 accumulator is reduced across threads
once, after the K loop; the global scale divides the result, the bias is added in fp32.

bf16 activations are read as int32 pairs (even column in the low half): shifting a pair by 16
bits, or masking its high half, is the exact fp32 value of each, with no strided loads.

MoE experts (`fp4_gemv_experts`): the rows kernel with EXPERTS on reads, for each "token" p, the
weight of expert eid[p] (a 3-D stack [E, N, K/2], expert strides given) and x row p // XDIV, so
all (token, expert) pairs of a decode step run in one launch, with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fp4_codes import INTERPRET, USE_ASM, decode_bytes, scale_times_2pow14
from .launch import Call, Launcher, bench_graph, check_direct
from .splitk import counters, split_k_sum, workspace

GEMV_M_MAX = 2  # fp4_linear sends M at or under this here (M = 4 was faster on the dot kernel)


@triton.jit
def _e4m3_times_2pow_m8(code):
    """E4M3 scale codes (int32, 0..127) -> fp32 value·2^-8: the code's bits moved into an fp16
    (exponent field = E4M3's, mantissa's top 3 bits; subnormals land on fp16 subnormals)."""
    return ((code & 127) << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp4_gemv_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    g_ptr,
    bias_ptr,
    N,
    K: tl.constexpr,
    stride_xm,
    BLOCK: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_PAIRS: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out[m, n] = Σ_k x[m, k]·W'[n, k] for one token m and BLOCK_N rows; BLOCK_K divides K.

    X_PAIRS: x_ptr is x viewed as int32 (two bf16 a word) and stride_xm counts words."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    NB: tl.constexpr = BLOCK_K // BLOCK  # scale blocks a step
    HB: tl.constexpr = BLOCK // 2  # code bytes a block
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_n = tl.where(n_ok, offs_n, 0)  # out-of-range rows reread row 0, never stored
    ob = tl.arange(0, NB)
    oj = tl.arange(0, HB)
    pair = ob[:, None] * HB + oj[None, :]  # code byte j holds columns 2j (low) and 2j+1 (high)
    c_ptrs = codes_ptr + offs_n[:, None, None] * (K // 2) + pair[None, :, :]
    s_ptrs = scales_ptr + offs_n[:, None] * (K // BLOCK) + ob[None, :]
    x_ptrs = x_ptr + pid_m * stride_xm + (pair if X_PAIRS else 2 * pair)
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        lo, hi = decode_bytes(tl.load(c_ptrs), USE_ASM)
        if X_PAIRS:
            xp = tl.load(x_ptrs)
            x_even = (xp << 16).to(tl.float32, bitcast=True)
            x_odd = (xp & -65536).to(tl.float32, bitcast=True)
        else:
            x_even = tl.load(x_ptrs).to(tl.float32)
            x_odd = tl.load(x_ptrs + 1).to(tl.float32)
        part = tl.sum(lo * x_even[None, :, :] + hi * x_odd[None, :, :], axis=2)
        s = scale_times_2pow14(tl.load(s_ptrs).to(tl.int32), MAN, BIAS)
        acc += part * s
        c_ptrs += BLOCK_K // 2
        s_ptrs += NB
        if X_PAIRS:
            x_ptrs += BLOCK_K // 2
        else:
            x_ptrs += BLOCK_K
    res = tl.sum(acc, axis=1)
    if HAS_GLOBAL:
        res = res / tl.load(g_ptr)
    if HAS_BIAS:
        res += tl.load(bias_ptr + offs_n).to(tl.float32)
    tl.store(out_ptr + pid_m * N + offs_n, res.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["one"])
def _fp4_gemv_rows_kernel(
    x_ptr,
    out_ptr,
    eid_ptr,
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
    one,
    stride_ec,
    stride_es,
    BLOCK: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_PAIRS: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    SPLIT: tl.constexpr,
    VB: tl.constexpr,
    EXPERTS: tl.constexpr,
    XDIV: tl.constexpr,
):
    """out[m, n] = Σ_k x[m, k]·W'[n, k] for one token m and BLOCK_N rows (BLOCK >= 8).

    A K step reads the code bytes as WB = BLOCK/(2·VB) tiles [NB, BLOCK_N, VB] (VB = 4 or 8
    bytes = 8 or 16 weights of each scale block) and x as the matching [NB, VB] tiles of int32
    bf16 pairs: both get Triton's VB-wide layout with the scale blocks across threads and the
    rows inside each thread, so x is loaded and unpacked once a thread for all its rows and no
    tile changes layout. `one` (a runtime 1) hides the scales' contiguity so that they share
    that layout.

    SPLIT > 1 (split-K): grid axis 0 is (K slice, token), token fastest; each program sums
    its slice of the K steps and stores the fp32 partial in ws [SPLIT, M, N]; the program that
    finds the tile's counter (cnt_ptr, int32, zero between launches) at SPLIT - 1 is the last
    one: it adds the SPLIT partials in slice order (the same sum whichever program comes last),
    runs the epilogue and puts the counter back to 0.

    EXPERTS: row p of the output uses expert eid[p]'s weight (codes, scales and global scale
    stride_ec, stride_es and 1 elements apart) and x row p // XDIV (no bias)."""
    pid_m = tl.program_id(0) % M
    pid_k = tl.program_id(0) // M
    pid_n = tl.program_id(1)
    pid_x = pid_m
    if EXPERTS:
        tl.static_assert(not HAS_BIAS)
        e = tl.load(eid_ptr + pid_m).to(tl.int64)
        codes_ptr += e * stride_ec
        scales_ptr += e * stride_es
        g_ptr += e
        pid_x = pid_m // XDIV
    NB: tl.constexpr = BLOCK_K // BLOCK
    HB: tl.constexpr = BLOCK // 2
    WB: tl.constexpr = BLOCK // (2 * VB)  # VB code bytes (2·VB weights) a load
    NSTEP: tl.constexpr = K // BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_n = tl.where(n_ok, offs_n, 0)
    ob = tl.arange(0, NB)
    ov = tl.arange(0, VB)
    byte = ob[:, None] * HB + ov[None, :]  # [NB, VB]: byte j of the first load of each block
    c_ptrs = codes_ptr + offs_n[None, :, None] * (K // 2) + byte[:, None, :]
    s_ptrs = scales_ptr + offs_n[None, :] * (K // BLOCK) + ob[:, None] * one
    if X_PAIRS:
        x_ptrs = x_ptr + tl.multiple_of(pid_x * stride_xm, 4) + byte
    else:
        x_ptrs = x_ptr + pid_x * stride_xm + 2 * byte
    if SPLIT > 1:  # SPLIT divides the K steps
        s0 = pid_k * (NSTEP // SPLIT)
        c_ptrs += s0 * (BLOCK_K // 2)
        s_ptrs += s0 * NB
        x_ptrs += s0 * (BLOCK_K // 2 if X_PAIRS else BLOCK_K)
    acc = tl.zeros((NB, BLOCK_N), dtype=tl.float32)
    for _ in tl.range(0, NSTEP // SPLIT, num_stages=STAGES):
        part = tl.zeros((NB, BLOCK_N, VB), dtype=tl.float32)
        for w in tl.static_range(WB):
            lo, hi = decode_bytes(tl.load(c_ptrs + VB * w), USE_ASM)
            if X_PAIRS:
                xp = tl.load(x_ptrs + VB * w)
                x_even = (xp << 16).to(tl.float32, bitcast=True)
                x_odd = (xp & -65536).to(tl.float32, bitcast=True)
            else:
                x_even = tl.load(x_ptrs + 2 * VB * w).to(tl.float32)
                x_odd = tl.load(x_ptrs + 2 * VB * w + 1).to(tl.float32)
            part += lo * x_even[:, None, :]
            part += hi * x_odd[:, None, :]
        code = tl.load(s_ptrs).to(tl.int32)
        if MAN == 3 and BIAS == 7:
            s = _e4m3_times_2pow_m8(code)
        else:
            s = scale_times_2pow14(code, MAN, BIAS)
        acc += tl.sum(part, axis=2) * s
        c_ptrs += BLOCK_K // 2
        s_ptrs += NB
        if X_PAIRS:
            x_ptrs += BLOCK_K // 2
        else:
            x_ptrs += BLOCK_K
    res = tl.sum(acc, axis=0)
    last = True
    if SPLIT > 1:
        cnt = cnt_ptr + pid_m * tl.num_programs(1) + pid_n
        last, res = split_k_sum(res, ws_ptr + pid_m * N + offs_n, n_ok, M * N, pid_k, cnt, SPLIT)
    if last:
        _rows_epilogue(
            res, g_ptr, bias_ptr, out_ptr, pid_m, N, offs_n, n_ok, MAN, BIAS, HAS_GLOBAL, HAS_BIAS
        )


@triton.jit
def _rows_epilogue(
    res,
    g_ptr,
    bias_ptr,
    out_ptr,
    pid_m,
    N,
    offs_n,
    n_ok,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    if MAN == 3 and BIAS == 7:
        res = res * 4194304.0  # 2^22: the E4M3 decode's 2^-8 back to the 2^14 convention
    if HAS_GLOBAL:
        res = res / tl.load(g_ptr)
    if HAS_BIAS:
        res += tl.load(bias_ptr + offs_n).to(tl.float32)
    tl.store(out_ptr + pid_m * N + offs_n, res.to(out_ptr.dtype.element_ty), mask=n_ok)


@dataclass(frozen=True)
class GemvConfig:
    """A fixed GEMV launch (bypasses autotuning; tests and the interpreter use it)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1  # > 1: the K loop's loads are software-pipelined (cp.async)
    rows: bool = True  # the rows-in-thread kernel (block sizes >= 8); False: the 3-D tile one
    split: int = 1  # rows kernel: K slices a tile (split-K, reduced by the last program)
    wide: bool = False  # rows kernel: 8-byte code loads (16 weights) where B >= 16, else 4


def _cfg(
    bn: int, bk: int, warps: int, stages: int = 1, split: int | None = None, vb: int = 4
) -> triton.Config:
    kw = {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages}
    if split is not None:  # rows kernel
        kw["SPLIT"] = split
        kw["VB"] = vb
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Few rows a program (enough programs to fill 132 SMs at N = 4096) and long K steps. On the
# H100 at M = 1, 4- and 8-row tiles with 1024-weight steps were fastest (32 and 64 rows: 1.2x
# to 3.5x slower); software pipelining (STAGES > 1) never gave the fastest tile.
GEMV_CONFIGS = [
    _cfg(4, 1024, 4),
    _cfg(8, 1024, 4),
    _cfg(4, 2048, 4),
    _cfg(2, 1024, 1),
    _cfg(4, 1024, 1),
    _cfg(4, 1024, 2),
    _cfg(8, 1024, 2),
    _cfg(8, 512, 4, 3),
]


def _fit_block_k(bk: int, k: int, block_size: int) -> int:
    """The longest K step <= bk that divides K and holds whole scale blocks (powers of two)."""
    while bk > block_size and (k % bk or bk % block_size):
        bk //= 2
    return max(bk, block_size)


def _fit_split(split: int, steps: int) -> int:
    """The most K slices <= split that divide the K steps evenly."""
    split = max(1, min(split, steps))
    while steps % split:
        split -= 1
    return split


def _fit_vb(vb: int, block_size: int) -> int:
    """Code bytes a load in the rows kernel: 8 needs B >= 16 (a block holds B/2 bytes)."""
    return 8 if vb == 8 and block_size >= 16 else 4


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    k, b = args["K"], args["BLOCK"]
    out, seen = [], set()
    for c in configs:
        bk = _fit_block_k(c.kwargs["BLOCK_K"], k, b)
        split = c.kwargs.get("SPLIT")
        vb = 4
        if split is not None:
            split = _fit_split(split, k // bk)
            vb = _fit_vb(c.kwargs["VB"], b)
        key = (c.kwargs["BLOCK_N"], bk, c.num_warps, c.kwargs["STAGES"], split, vb)
        if key not in seen:
            seen.add(key)
            out.append(_cfg(*key))
    return out


_gemv = triton.autotune(
    GEMV_CONFIGS,
    key=["N", "K", "BLOCK", "MAN", "HAS_GLOBAL", "HAS_BIAS", "X_PAIRS", "USE_ASM"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=bench_graph,
)(_fp4_gemv_kernel)


# Rows-in-thread kernel, H100, M = 1 (fixed-tile sweep, CUDA-graph timing): the fastest tiles
# per shape: 2 rows/1024-weight steps/2 warps and 4 rows/4096/4 warps at 4096x4096, 4/1024/1
# at 6144x4096 and 28672x4096, 8/1024/2 with 2 K slices at 4096x14336; split-K lost at K = 4096
# and num_stages > 1 was 4x-6x slower everywhere. Each tile with 4- and 8-byte code loads.
ROWS_CONFIGS = [
    _cfg(bn, bk, w, 1, split, vb)
    for bn, bk, w, split in [
        (4, 1024, 1, 1),
        (2, 1024, 2, 1),
        (4, 4096, 4, 1),
        (2, 2048, 2, 1),
        (8, 4096, 4, 1),
        (8, 2048, 4, 1),
        (8, 1024, 2, 2),
        (4, 1024, 1, 2),
    ]
    for vb in (4, 8)
]
ROWS_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in ROWS_CONFIGS)
ROWS_MAX_SPLIT = max(c.kwargs["SPLIT"] for c in ROWS_CONFIGS)

_gemv_rows = triton.autotune(
    ROWS_CONFIGS,
    key=[
        "N",
        "K",
        "BLOCK",
        "MAN",
        "BIAS",
        "HAS_GLOBAL",
        "HAS_BIAS",
        "X_PAIRS",
        "USE_ASM",
        "EXPERTS",
    ],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=bench_graph,
)(_fp4_gemv_rows_kernel)


def gemv_supported(k: int, block_size: int) -> bool:
    """K a multiple of the block (and of 2); every block size 4..128 works."""
    return k % block_size == 0 and k % 2 == 0


def gemv_call(
    x2: torch.Tensor,
    out: torch.Tensor,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
    use_asm: bool = USE_ASM,
    config: GemvConfig | None = None,
    eid: torch.Tensor | None = None,
    xdiv: int = 1,
) -> Call:
    """The launch that writes out [M, N] = x2 [M, K] · dequant(W)ᵀ + bias (x2's rows have unit
    column stride). With `eid` (int [M]): codes/scales are 3-D expert stacks [E, N, ...] (rows
    contiguous, any expert stride), global_scale is [E], and row p uses expert eid[p] and x2
    row p // xdiv (the rows kernel only, so block sizes >= 8; no bias)."""
    m = x2.shape[0] if eid is None else eid.shape[0]
    k, n = codes.shape[-1] * 2, codes.shape[-2]
    rows = block_size >= 8 and (config is None or config.rows)
    if eid is not None and (not rows or bias is not None):
        raise ValueError("the expert GEMV needs the rows kernel (block size >= 8) and no bias")
    # int32 pairs: the rows kernel reads 4 pairs at once, so its rows start 16-byte aligned
    pairs = x2.dtype == torch.bfloat16 and x2.stride(0) % (8 if rows else 2) == 0
    xv = x2.view(torch.int32) if pairs else x2
    stride = x2.stride(0) // 2 if pairs else x2.stride(0)
    named = dict(
        codes_ptr=codes,
        scales_ptr=scale_codes,
        g_ptr=global_scale if global_scale is not None else codes,  # unread without a global
        bias_ptr=bias if bias is not None else codes,
        N=n,
        K=k,
        stride_xm=stride,
        BLOCK=block_size,
        MAN=scale_man_bits,
        BIAS=scale_bias,
        HAS_GLOBAL=global_scale is not None,
        HAS_BIAS=bias is not None,
        X_PAIRS=pairs,
        USE_ASM=use_asm,
    )
    if config is None and INTERPRET:
        config = GemvConfig(16, 64)
    if rows:
        # split-K scratch: fp32 partials for the largest split, and the tiles' counters
        split_max = config.split if config is not None else ROWS_MAX_SPLIT
        bn_min = config.block_n if config is not None else ROWS_MIN_BLOCK_N
        if eid is None:
            named["eid_ptr"] = codes  # unread without EXPERTS
        named.update(
            ws_ptr=workspace(x2.device, split_max * m * n),
            cnt_ptr=counters(x2.device, m * triton.cdiv(n, bn_min)),
            M=m,
            one=1,
            stride_ec=codes.stride(0) if eid is not None else 0,
            stride_es=scale_codes.stride(0) if eid is not None else 0,
            EXPERTS=eid is not None,
            XDIV=xdiv,
        )
        kernel, tuner = _fp4_gemv_rows_kernel, _gemv_rows
        grid = lambda meta: (m * meta["SPLIT"], triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    else:
        kernel, tuner = _fp4_gemv_kernel, _gemv
        grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    tile = None
    if config is not None:
        bk = _fit_block_k(config.block_k, k, block_size)
        tile = dict(
            BLOCK_N=config.block_n,
            BLOCK_K=bk,
            STAGES=config.num_stages,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if rows:
            tile["SPLIT"] = _fit_split(config.split, k // bk)
            tile["VB"] = _fit_vb(8 if config.wide else 4, block_size)
    dyn = (xv, out) if eid is None else (xv, out, eid)
    views = (torch.int32 if pairs else None, None, None)[: len(dyn)]
    return Call(kernel, grid, dyn, named, views, tile, tuner)


def fp4_gemv(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
    use_asm: bool,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x2 [M, K] (rows contiguous) · dequant(W)ᵀ + bias -> [M, N] in x2's dtype."""
    m, n = x2.shape[0], codes.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m and n:
        args = (codes, scale_codes, global_scale, bias, block_size, scale_man_bits, scale_bias)
        gemv_call(x2, out, *args, use_asm, config).launch()
    return out


def fp4_gemv_experts(
    x2: torch.Tensor,
    eid: torch.Tensor,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
    xdiv: int = 1,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """out[p] = x2[p // xdiv] · dequant(W[eid[p]])ᵀ for expert stacks codes [E, N, K/2] and
    scale codes [E, N, K/B] (uint8 storage), global scales [E] or None -> [len(eid), N]."""
    m, n = eid.shape[0], codes.shape[-2]
    if x2.shape[-1] != codes.shape[-1] * 2 or x2.shape[0] * xdiv != m:
        raise ValueError(
            f"x {tuple(x2.shape)} does not fit {m} pairs of {xdiv} and K = {codes.shape[-1] * 2}"
        )
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m and n:
        args = (codes, scale_codes, global_scale, None, block_size, scale_man_bits, scale_bias)
        gemv_call(x2, out, *args, USE_ASM, config, eid=eid, xdiv=xdiv).launch()
    return out


def planned_experts(
    x2: torch.Tensor,
    eid: torch.Tensor,
    stream: int,
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    global_scale: torch.Tensor | None,
    block_size: int,
    scale_man_bits: int,
    scale_bias: int,
    xdiv: int,
) -> tuple[torch.Tensor, Launcher]:
    """`fp4_gemv_experts` for a contiguous x2 that also returns a Launcher for the tile it ran:
    `launcher(stream, x2', out', eid')` computes the same for inputs of the same shapes,
    dtypes, device and 16-byte alignment on this stream (direct launch checked once against
    Triton's own, as `gemm.planned_linear`)."""
    m, n = eid.shape[0], codes.shape[-2]
    out = x2.new_empty((m, n))
    args = (codes, scale_codes, global_scale, None, block_size, scale_man_bits, scale_bias)
    call = gemv_call(x2, out, *args, USE_ASM, None, eid=eid, xdiv=xdiv)
    launcher = call.launcher(call.launch())
    check_direct(launcher, stream, (x2, torch.empty_like(out), eid), out)
    return out, launcher
