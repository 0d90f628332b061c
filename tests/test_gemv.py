"""The few-token FP4 GEMV (kernels/gemv.py) and the nibble decoder it shares with the GEMM.

The kernel runs in the Triton interpreter (plain-Triton decoding); the inline-PTX decoder that
compiled kernels use is checked here by executing its PTX text on every byte value, and on a
GPU (when there is one) against the plain formula.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ptx_exec import ASM_CASES, asm_text, run_ptx
from quant_helpers import KERNEL_FORMATS

from mxptq import QuantizedTensor, dequantize, get_format, quantize_tensor
from mxptq.formats import e2m1_values

try:
    from mxptq.kernels import fp4_codes, gemm, gemv, splitk
except ImportError:  # triton missing or broken
    gemm = gemv = fp4_codes = splitk = None

pytestmark = pytest.mark.skipif(gemv is None, reason="triton is not importable")

FORMATS = KERNEL_FORMATS


def _fmt(name, block, codec):
    return get_format(name, block) if codec is None else get_format(name, block, scale=codec)


def _quantized(n: int, k: int, fmt, seed: int = 0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    return quantize_tensor(w, fmt, "absmax", backend="torch")


def _call(x, qt, bias=None, config=None):
    return gemm.quantized_linear(x, qt, bias, config)


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize(("name", "block", "codec"), FORMATS)
def test_gemv_matches_float64(name, block, codec):
    """Every format and block size, ragged N (45 rows, tiles of 16), 1 and 3 tokens, K steps
    that hold several scale blocks (or one, for B = 128)."""
    qt = _quantized(45, 256, _fmt(name, block, codec), seed=block)
    for m in (1, 3):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        ref = F.linear(x.double(), dequantize(qt).double())
        out = _call(x, qt, config=gemv.GemvConfig(16, 128))
        assert out.shape == (m, 45)
        assert _rel(out, ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_dtypes_bias_3d(dtype, with_bias):
    """bf16 activations take the int32-pair path, fp16/fp32 the strided one; 3-D input."""
    qt = _quantized(37, 512, get_format("nvfp4"), seed=5)
    bias = torch.randn(37).to(dtype) if with_bias else None
    x = torch.randn(2, 2, 512).to(dtype)
    out = _call(x, qt, bias, gemv.GemvConfig(8, 256, num_stages=2))
    b = None if bias is None else bias.double()
    ref = F.linear(x.double(), dequantize(qt).double(), b)
    assert out.shape == (2, 2, 37) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16/fp16: the output's own rounding
    assert _rel(out, ref) < tol


@pytest.mark.parametrize("block", [8, 16, 32])
def test_gemv_rows_and_tile_kernels_agree(block):
    """The rows-in-thread kernel (default for B >= 8, E4M3 scales through their fp16 bit move)
    and the 3-D tile kernel (B = 4, or rows=False) give the same float64-accurate result."""
    qt = _quantized(24, 256, get_format("nvfp4", block), seed=block + 1)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(9))
    ref = F.linear(x.double(), dequantize(qt).double())
    for cfg in (gemv.GemvConfig(8, 128, 1), gemv.GemvConfig(8, 128, 1, rows=False)):
        assert _rel(_call(x, qt, config=cfg), ref) < 1e-6
    xb = x.to(torch.bfloat16)  # int32 pairs, 4 a thread
    a = _call(xb, qt, config=gemv.GemvConfig(8, 128, 1))
    b = _call(xb, qt, config=gemv.GemvConfig(8, 128, 1, rows=False))
    assert _rel(a, F.linear(xb.double(), dequantize(qt).double())) < 8e-3
    torch.testing.assert_close(a.float(), b.float(), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize(("name", "block", "codec"), [f for f in FORMATS if f[1] >= 8])
def test_gemv_split_k(name, block, codec):
    """Split-K (rows kernel; 8-byte loads in the bf16 case): K slices summed by the tile's
    last program in slice order. Same float64 accuracy for every format the rows kernel takes,
    1 and 3 tokens, ragged N, bias; bit-identical run to run, and the tile counters are back at
    zero after each launch."""
    qt = _quantized(21, 512, _fmt(name, block, codec), seed=block + 7)
    bias = torch.randn(21, generator=torch.Generator().manual_seed(3))
    for m in (1, 3):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
        ref = F.linear(x.double(), dequantize(qt).double(), bias.double())
        bk = max(128, block)
        cfg = gemv.GemvConfig(8, bk, 1, split=512 // bk)
        out = _call(x, qt, bias, cfg)
        assert _rel(out, ref) < 1e-6
        assert torch.equal(out, _call(x, qt, bias, cfg))
        assert not splitk.counters(x.device, 1).any()
        xb = x.to(torch.bfloat16)
        ob = _call(xb, qt, bias.to(torch.bfloat16), gemv.GemvConfig(16, bk, 1, split=2, wide=True))
        refb = F.linear(xb.double(), dequantize(qt).double(), bias.double())
        assert _rel(ob, refb) < 8e-3


def test_split_fitting():
    assert gemv._fit_split(4, 4) == 4
    assert gemv._fit_split(4, 14) == 2  # slices hold whole, equal numbers of K steps
    assert gemv._fit_split(8, 7) == 7
    assert gemv._fit_split(4, 1) == 1
    cfgs = gemv._prune(gemv.ROWS_CONFIGS, {"K": 14336, "BLOCK": 16})
    for c in cfgs:
        assert (14336 // c.kwargs["BLOCK_K"]) % c.kwargs["SPLIT"] == 0


def test_gemv_pairs_need_even_row_stride():
    """A bf16 view whose rows start at odd elements cannot be read as int32 pairs: the
    strided path must serve it, with the same result."""
    qt = _quantized(20, 64, get_format("nvfp4"), seed=2)
    big = torch.randn(3, 65).to(torch.bfloat16)
    x = big[:, 1:]  # row stride 65 (odd), unit column stride
    out = _call(x, qt, config=gemv.GemvConfig(16, 64))
    ref = F.linear(x.double(), dequantize(qt).double())
    assert _rel(out, ref) < 8e-3
    torch.testing.assert_close(out, _call(x.contiguous(), qt, config=gemv.GemvConfig(16, 64)))


@pytest.mark.parametrize(
    ("fmt", "lo", "hi"),
    [
        (get_format("nvfp4"), 0, 126),  # every finite E4M3 code, subnormals included
        (get_format("nvfp4-ue5m3"), 0, 254),
        (get_format("mxfp4"), 100, 160),
        (get_format("nvfp4", 4), 0, 126),
    ],
    ids=["e4m3", "ue5m3", "e8m0", "e4m3-b4"],
)
def test_gemv_exact_on_every_code(fmt, lo, hi):
    """x = identity reads the weight back through the GEMV: out[m, n] = w[n, m], exact but
    for the global scale's division."""
    gen = torch.Generator().manual_seed(lo + hi)
    n, k = 16, 64
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    sc = torch.randint(lo, hi + 1, (n, k // fmt.block_size), generator=gen, dtype=torch.int32)
    g = torch.tensor(3.7, dtype=torch.float32) if fmt.has_global else None
    qt = QuantizedTensor(codes, fmt.scale.to_storage(sc), g, fmt)
    out = _call(torch.eye(k), qt, config=gemv.GemvConfig(8, 32))
    rtol = 2e-7 if fmt.has_global else 0.0
    torch.testing.assert_close(out, dequantize(qt).T, rtol=rtol, atol=0)


def test_default_dispatch_uses_gemv_up_to_its_m(monkeypatch):
    """fp4_linear sends M <= GEMV_M_MAX to the GEMV and larger M to the dot kernel."""
    calls = []
    real = gemv.gemv_call
    monkeypatch.setattr(gemv, "gemv_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    qt = _quantized(20, 128, get_format("nvfp4"), seed=4)
    for m in (1, gemv.GEMV_M_MAX, gemv.GEMV_M_MAX + 1):
        x = torch.randn(m, 128)
        assert _rel(_call(x, qt), F.linear(x.double(), dequantize(qt).double())) < 1e-6
    assert len(calls) == 2


def test_block_k_fitting():
    assert gemv._fit_block_k(1024, 4096, 16) == 1024
    assert gemv._fit_block_k(1024, 14336, 16) == 1024
    assert gemv._fit_block_k(1024, 3 * 128, 16) == 128  # largest power of two dividing K
    assert gemv._fit_block_k(64, 256, 128) == 128  # at least one whole scale block


# ------------------------------------------------------------------------------------------
# The decoder: plain formula and the inline PTX.


def _expected_nibbles() -> tuple[np.ndarray, np.ndarray]:
    """E2M1(c)·2^-14 of the low and the high nibble of every byte 0..255."""
    v = e2m1_values().double().numpy() * 2.0**-14
    b = np.arange(256)
    return v[b & 15], v[b >> 4]


def _run_decode_ptx(word: int) -> list[float]:
    """`DECODE_ASM` executed on one 32-bit register (tests/ptx_exec.py): $0..$7."""
    reg = run_ptx(asm_text(fp4_codes.DECODE_ASM), {"$8": word})
    return [reg[f"${i}"] for i in range(8)]


def test_decode_ptx_on_every_byte_in_every_position():
    lo, hi = _expected_nibbles()
    rng = np.random.default_rng(0)
    for b in range(256):
        for pos in range(4):
            others = rng.integers(0, 256, 4)
            others[pos] = b
            word = int(sum(int(v) << (8 * i) for i, v in enumerate(others)))
            got = _run_decode_ptx(word)
            for i in range(4):  # $0..$3 low nibbles of bytes 0..3, $4..$7 high nibbles
                assert got[i] == lo[others[i]] and got[4 + i] == hi[others[i]], (b, pos, i)


@pytest.mark.parametrize("use_asm", ASM_CASES)
def test_decode_bytes_kernel(use_asm):
    """`decode_bytes` inside a kernel on all 256 bytes: the plain formula (interpreter or
    GPU) and, on a GPU, the inline PTX."""
    import triton
    import triton.language as tl

    @triton.jit
    def _k(c_ptr, lo_ptr, hi_ptr, USE_ASM: tl.constexpr):
        o = tl.arange(0, 256)
        lo, hi = fp4_codes.decode_bytes(tl.load(c_ptr + o), USE_ASM)
        tl.store(lo_ptr + o, lo)
        tl.store(hi_ptr + o, hi)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = torch.arange(256, dtype=torch.int32, device=dev).to(torch.uint8)
    lo = torch.empty(256, device=dev)
    hi = torch.empty(256, device=dev)
    _k[(1,)](c, lo, hi, USE_ASM=use_asm)
    want_lo, want_hi = _expected_nibbles()
    np.testing.assert_array_equal(lo.cpu().double().numpy(), want_lo)
    np.testing.assert_array_equal(hi.cpu().double().numpy(), want_hi)
