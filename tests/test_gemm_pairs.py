"""The dot kernel's bf16 pair decoder and its split-K (kernels/gemm.py).

The pair decoder turns one int32 word of 8 codes into 8 bf16 weights E2M1·S·2^(PAIR_SHIFT-126).
Its inline PTX is checked by executing the PTX text on every byte in every position and on
scales of every E4M3 / UE5M3 code; the plain-Triton twin runs in the interpreter, in a kernel
and inside the GEMM, where it must give bit for bit what the fp32 decoder gives.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ptx_exec import ASM_CASES, asm_text, bf16_bits, run_ptx

from mxptq import QuantizedTensor, dequantize, get_format, quantize_tensor
from mxptq.formats import e2m1_values

try:
    from mxptq.kernels import gemm, splitk
except ImportError:  # triton missing or broken
    gemm = splitk = None

pytestmark = pytest.mark.skipif(gemm is None, reason="triton is not importable")


def _run_words_ptx(word: int, scale_pair: int) -> list[int]:
    """`_WORDS_ASM` executed on one word and scale pair: $0..$7 (bf16 bits)."""
    reg = run_ptx(asm_text(gemm._WORDS_ASM), {"$8": word, "$9": scale_pair})
    return [reg[f"${i}"] for i in range(8)]


def _scale_values(codec) -> list[float]:
    """S of every finite code of a codec with a mantissa (E4M3 0..126, UE5M3 0..254)."""
    return [codec.value_of(c) for c in range(codec.max_code + 1)]


@pytest.mark.parametrize("scale", ["e4m3", "ue5m3", "ue5m3-ieee"])
def test_words_ptx_every_byte_every_scale(scale):
    codec = get_format("nvfp4-ue5m3", 16, scale=scale).scale if scale != "e4m3" else None
    codec = codec or get_format("nvfp4", 16).scale
    e2m1 = e2m1_values().double().numpy()
    rng = np.random.default_rng(0)
    shift = 2.0 ** (gemm.PAIR_SHIFT - 126)
    scales = _scale_values(codec)
    for i, s in enumerate(scales):
        sb = bf16_bits(s * 2.0**gemm.PAIR_SHIFT)
        pair = sb | (sb << 16)
        for b in range(256) if i % 32 == 0 else rng.integers(0, 256, 4):  # all: 1 in 32
            for pos in range(4):
                others = rng.integers(0, 256, 4)
                others[pos] = b
                word = int(sum(int(v) << (8 * j) for j, v in enumerate(others)))
                got = _run_words_ptx(word, pair)
                want = [bf16_bits(e2m1[(word >> (4 * k)) & 15] * s * shift) for k in range(8)]
                assert got == want, (s, b, pos)


@pytest.mark.parametrize("scale", ["e4m3", "ue5m3", "ue5m3-ieee"])
def test_scale_ptx_every_code(scale):
    """`_scale_asm` executed on every finite code of the codec: bf16 S·2^PAIR_SHIFT in both
    halves, bit for bit (subnormal scale codes go through bf16 subnormals)."""
    codec = (
        get_format("nvfp4", 16).scale
        if scale == "e4m3"
        else get_format("nvfp4-ue5m3", 16, scale=scale).scale
    )
    asm = asm_text(gemm._SCALE_ASM_E4M3 if codec.bias == 7 else gemm._SCALE_ASM_UE5M3)
    for c, s in enumerate(_scale_values(codec)):
        got = run_ptx(asm, {"$1": c}, min_ops=5)["$0"]
        b = bf16_bits(s * 2.0**gemm.PAIR_SHIFT)
        assert got == b | (b << 16), (c, s)


def _decode_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _k(q_ptr, c_ptr, o_ptr, MAN: tl.constexpr, BIAS: tl.constexpr, USE_ASM: tl.constexpr):
        r = tl.arange(0, 32)
        w = tl.arange(0, 16)
        q = tl.load(q_ptr + r[:, None] * 16 + w[None, :])
        sp = gemm._scale_pairs(tl.load(c_ptr + r).to(tl.int32), BIAS, USE_ASM)
        out = gemm._decode_words(q, tl.broadcast_to(sp[:, None], (32, 16)), USE_ASM)
        tl.store(o_ptr + r[:, None] * 128 + tl.arange(0, 128)[None, :], out)

    return _k


@pytest.mark.parametrize("use_asm", ASM_CASES)
@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4-ue5m3"])
def test_decode_words_kernel_matches_definition(fmt, use_asm):
    """`_scale_pairs` + `_decode_words` in a kernel: 32 rows, each a scale code, 16 words of
    random codes; weight i of a word is its nibble i, times S·2^(PAIR_SHIFT-126), exactly."""
    f = get_format(fmt, 16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (32, 64), generator=gen, dtype=torch.int32).to(torch.uint8)
    sc = torch.linspace(0, f.scale.max_code, 32).round().to(torch.int32)
    out = torch.empty(32, 128, dtype=torch.bfloat16, device=dev)
    q = codes.to(dev).view(torch.int32)
    _decode_kernel()[(1,)](
        q, sc.to(torch.uint8).to(dev), out, f.scale.man_bits, f.scale.bias, use_asm
    )
    w = e2m1_values().double()[torch.stack([codes & 15, codes >> 4], -1).reshape(32, 128).long()]
    s = torch.tensor([f.scale.value_of(int(c)) for c in sc], dtype=torch.float64)
    want = (w * s[:, None] * 2.0 ** (gemm.PAIR_SHIFT - 126)).to(torch.bfloat16)
    assert torch.equal(want.double(), want.float().double())  # exact in bf16
    assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))


def _quantized(n: int, k: int, fmt, seed: int = 0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    return quantize_tensor(w, fmt, "absmax", backend="torch")


@pytest.mark.parametrize(
    ("name", "block", "codec"),
    [
        ("nvfp4", 8, None),
        ("nvfp4", 16, None),
        ("nvfp4", 64, None),
        ("nvfp4-ue5m3", 16, None),
        ("nvfp4-ue5m3", 32, "ue5m3-ieee"),
    ],
)
@pytest.mark.parametrize("split", [1, 2, 4])
def test_pairs_equal_fp32_decoder_bit_for_bit(name, block, codec, split):
    """bf16 activations: the pair decoder's GEMM equals the fp32 decoder's exactly (the same
    products, scaled by a power of two), with split-K, bias, odd N and M."""
    fmt = get_format(name, block) if codec is None else get_format(name, block, scale=codec)
    assert gemm.pairs_apply(torch.bfloat16, block, fmt.scale.man_bits, fmt.scale.bias)
    qt = _quantized(45, 256, fmt, seed=block + split)
    bias = torch.randn(45).bfloat16()
    x = torch.randn(2, 5, 256).bfloat16()
    cfg = gemm.GemmConfig(16, 16, max(32, block), split=split)
    got = gemm.quantized_linear(x, qt, bias, cfg)
    want = gemm.quantized_linear(x, qt, bias, dataclasses.replace(cfg, pairs=False))
    assert torch.equal(got, want)
    ref = F.linear(x.double(), dequantize(qt).double(), bias.double())
    assert float((got.double() - ref).norm() / ref.norm()) < 8e-3  # the bf16 output rounding


@pytest.mark.parametrize("codes", ["e4m3", "ue5m3"])
def test_pairs_read_every_scale_code_back(codes):
    """x = identity (bf16) reads each weight back through the pair decoder: every E2M1 code
    and every finite scale code, subnormal E4M3 and UE5M3 scales included."""
    fmt = get_format("nvfp4") if codes == "e4m3" else get_format("nvfp4-ue5m3")
    hi = fmt.scale.max_code
    gen = torch.Generator().manual_seed(hi)
    c = torch.randint(0, 256, (64, 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    sc = torch.arange(64 * 4, dtype=torch.int32).reshape(64, 4) % (hi + 1)
    qt = QuantizedTensor(c, fmt.scale.to_storage(sc), torch.tensor(1.0), fmt)
    out = gemm.quantized_linear(torch.eye(64).bfloat16(), qt, None, gemm.GemmConfig(16, 16, 16))
    assert torch.equal(out, dequantize(qt).T.bfloat16())


def test_pairs_not_used_where_they_would_be_inexact():
    assert not gemm.pairs_apply(torch.bfloat16, 32, 0, 127)  # E8M0: range too wide for one shift
    assert not gemm.pairs_apply(torch.bfloat16, 4, 3, 7)  # a word would span two scale blocks
    assert not gemm.pairs_apply(torch.float16, 16, 3, 7)  # fp16/fp32 activations: fp32 dot


def test_split_k_and_unroll():
    qt = _quantized(40, 512, get_format("nvfp4"), seed=5)
    x = torch.randn(9, 512).bfloat16()
    ref = F.linear(x.double(), dequantize(qt).double())
    for split in (2, 4, 8):
        out = gemm.quantized_linear(x, qt, None, gemm.GemmConfig(16, 16, 64, split=split))
        assert float((out.double() - ref).norm() / ref.norm()) < 8e-3
    pools = [bufs for key, bufs in splitk._POOLS.items() if key[0] == "counters"]
    assert pools and all(int(b.abs().sum()) == 0 for bufs in pools for b in bufs)
    cfg = gemm.GemmConfig(16, 16, 64, split=2)  # the unrolled K loop sums in the same order
    unrolled = dataclasses.replace(cfg, unroll=2)
    assert torch.equal(
        gemm.quantized_linear(x, qt, None, unrolled), gemm.quantized_linear(x, qt, None, cfg)
    )
    with pytest.raises(ValueError, match="split"):
        gemm.quantized_linear(x, qt, None, gemm.GemmConfig(16, 16, 128, split=3))
