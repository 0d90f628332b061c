"""Selectors and the tensor API against the hand vector, vLLM's and compressed-tensors' NVFP4,
and the properties every argmin must have."""

import pytest
import torch

import mxptq
from mxptq import scales as S
from mxptq.formats import E4M3, e2m1_decode, e2m1_encode, get_format, pack_e2m1, unpack_e2m1

HAND = [3.0, -2.6, 2.4, 2.2, -1.9, 1.7, -1.4, 1.2, 1.0, -0.8, 0.6, 0.45, -0.3, 0.2, -0.1, 0.0]
HAND_SSE = {-3: 0.571787, -2: 0.459336, -1: 0.469688, 0: 0.490000, 1: 0.463242, 2: 0.481406,
            3: 0.444102, 4: 0.418125, 5: 0.397227, 6: 0.534531}


def _hand_tensor(other_block_max: float) -> torch.Tensor:
    """The §7.3 block plus a block holding the tensor max, so that g = norm·6/amax = 1."""
    other = torch.zeros(16)
    other[0] = other_block_max
    return torch.stack([torch.tensor(HAND), other])


@pytest.mark.parametrize(
    "scale,norm,amax,code",
    [("absmax", 448, 2688, 48), ("search", 448, 2688, 53), ("exhaustive", 448, 2688, 53),
     ("4over6", 256, 1536, 52)],
)
def test_hand_vector_scale_per_selector(scale, norm, amax, code):
    qt = mxptq.quantize_tensor(_hand_tensor(amax), "nvfp4", scale, global_norm=norm)
    assert float(qt.global_scale) == 1.0
    assert int(qt.scale_codes()[0, 0]) == code


def test_hand_vector_codes():
    qt = mxptq.quantize_tensor(_hand_tensor(2688), "nvfp4", "absmax")
    got = e2m1_decode(unpack_e2m1(qt.codes))[0].tolist()
    assert got == [6, -6, 4, 4, -4, 3, -3, 2, 2, -1.5, 1, 1, -0.5, 0.5, -0.0, 0]
    qt46 = mxptq.quantize_tensor(_hand_tensor(1536), "nvfp4", "4over6", global_norm=256)
    got = e2m1_decode(unpack_e2m1(qt46.codes))[0].tolist()
    assert got == [4, -3, 3, 3, -3, 2, -2, 1.5, 1.5, -1, 1, 0.5, -0.5, 0.5, -0.0, 0]


def test_hand_vector_sse_of_every_offset():
    x = torch.tensor([HAND])
    one = torch.tensor(1.0)
    for f, sse in HAND_SSE.items():
        e = S.block_error(x, x, E4M3.table()[torch.tensor([48 + f])], one)
        assert float(e[0]) == pytest.approx(sse, abs=1.5e-6), f


# ---- vLLM's ref_nvfp4_quant and cast_to_fp4, verbatim in logic (tests/kernels of vLLM) ----


def _get_reciprocal(x):
    if isinstance(x, torch.Tensor):
        return torch.where(x == 0, torch.tensor(0.0, dtype=x.dtype), 1.0 / x)
    return 0.0 if x == 0 else 1.0 / x


def _vllm_cast_to_fp4(x):
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def _vllm_ref_nvfp4_quant(x, global_scale, block_size=16):
    m, n = x.shape
    x = torch.reshape(x, (m, n // block_size, block_size))
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * _get_reciprocal(6.0))
    scale = torch.clamp(scale, max=448, min=-448)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = _get_reciprocal(scale * _get_reciprocal(global_scale))
    scaled_x = x.to(torch.float32) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return _vllm_cast_to_fp4(clipped_x), scale.squeeze(-1)


def _weights(seed: int, n: int = 256, k: int = 512, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(1.5 * torch.randn(n, k, generator=g))
    w[3] = 0.0  # an all-zero row
    w[5, :16] *= 1e-7  # blocks whose scale underflows without the floor
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_absmax_bit_exact_with_vllm_reference(dtype):
    for seed in range(3):
        w = _weights(seed, dtype=dtype)
        qt = mxptq.quantize_tensor(w, "nvfp4", "absmax", underflow_floor=False)
        g = (448.0 * 6.0) / w.abs().max().to(torch.float32)
        assert torch.equal(qt.global_scale, g)
        vals, scale = _vllm_ref_nvfp4_quant(w, g)
        want = scale.to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(qt.scales.view(torch.uint8), want)
        ours = e2m1_decode(unpack_e2m1(qt.codes))
        assert torch.equal(ours, vals)  # -0.0 == 0.0 here; signs are checked against CT below


def test_absmax_bit_exact_with_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16,
                            symmetric=True, dynamic=False, scale_dtype=torch.float8_e4m3fn)
    cases = [_weights(s) for s in range(4)]
    for w in cases:  # CT replaces zero scales by its eps: keep every block's scale non-zero
        w[5, :16] = w[6, :16]
        w[3] = w[4]
    for w in cases + [_hand_tensor(2688.0)]:
        n, k = w.shape
        gs = generate_gparam(w.amin(), w.amax())
        xb = w.view(n, k // 16, 16)
        sc, _ = calculate_qparams(xb.amin(-1), xb.amax(-1), args, global_scale=gs)
        packed = quantize_and_pack_fp4(w, sc, gs, group_size=16)
        qt = mxptq.quantize_tensor(w, "nvfp4", "absmax", underflow_floor=False)
        assert torch.equal(qt.global_scale.reshape(1), gs)
        want = sc.to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(qt.scales.view(torch.uint8), want)
        assert torch.equal(qt.codes, packed)


def test_dequantize_matches_vllm_values():
    w = _weights(7)
    qt = mxptq.quantize_tensor(w, "nvfp4", "absmax", underflow_floor=False)
    vals, scale = _vllm_ref_nvfp4_quant(w, qt.global_scale)
    expect = (vals.view(256, 32, 16) * (scale / qt.global_scale).unsqueeze(-1)).view(256, 512)
    assert torch.equal(mxptq.dequantize(qt), expect)


# ---- properties of the argmin ----


def _block_errors(w, qt) -> torch.Tensor:
    """Per-block SSE in original units of a quantized tensor."""
    b = qt.format.block_size
    d = (mxptq.dequantize(qt) - w.float()).view(w.shape[0], -1, b)
    return (d * d).sum(-1)


def _heavy(seed, n, k):
    """Student-t(3) samples times 0.02: normal / sqrt(chi2_3 / 3)."""
    g = torch.Generator().manual_seed(seed)
    chi2 = (torch.randn(3, n, k, generator=g) ** 2).sum(0)
    return 0.02 * torch.randn(n, k, generator=g) / torch.sqrt(chi2 / 3)


def _adversarial(seed, n, k):
    """Blocks with one outlier, near-tie values on E2M1 boundaries, and tiny blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, ::16] *= 30.0
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    idx = torch.randint(0, 7, (n, k // 4), generator=g)
    w[:, 1::4] = bounds[idx] * torch.sign(torch.randn(n, k // 4, generator=g))
    w[: n // 4] *= 1e-6
    return w


DATA = {
    "gaussian": lambda s, n, k: torch.randn(n, k, generator=torch.Generator().manual_seed(s)),
    "student_t": _heavy,
    "adversarial": _adversarial,
}
FORMAT_CASES = [
    ("nvfp4", None, {}),
    ("nvfp4", 8, {}),
    ("nvfp4", 32, {"has_global": False}),
    ("nvfp4-ue5m3", None, {}),
    ("mxfp4", None, {}),
    ("mxfp4", None, {"mx_rule": "ceil"}),
]


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("fmt_name,block,over", FORMAT_CASES)
def test_exhaustive_le_search_le_absmax(data, fmt_name, block, over):
    fmt = get_format(fmt_name, block, **over)
    torch.manual_seed(0)
    w = DATA[data](1, 48, 256)
    kw = {"global_norm": 448.0} if fmt.has_global else {}
    errs = {}
    for scale in ("absmax", "search", "exhaustive"):
        qt = mxptq.quantize_tensor(w, fmt, scale, **kw)
        errs[scale] = _block_errors(w, qt).double()
    # per block, up to the fp32 rounding of the error itself
    tol = 1e-5 * errs["absmax"] + 1e-30
    assert bool((errs["exhaustive"] <= errs["search"] + tol).all())
    assert bool((errs["search"] <= errs["absmax"] + tol).all())
    assert errs["exhaustive"].sum() < errs["absmax"].sum()
    if fmt.scale.has_zero:
        qt46 = mxptq.quantize_tensor(w, fmt, "4over6", **kw)
        e46 = _block_errors(w, qt46).double()
        assert bool((errs["exhaustive"] <= e46 + tol).all())


@pytest.mark.parametrize("fmt_name,block,over", FORMAT_CASES)
def test_wide_search_equals_exhaustive(fmt_name, block, over):
    fmt = get_format(fmt_name, block, **over)
    w = _adversarial(2, 32, 256)
    m = fmt.scale.max_code
    ex = mxptq.quantize_tensor(w, fmt, "exhaustive")
    wide = mxptq.quantize_tensor(w, fmt, "search", window=(-m, m))
    assert torch.equal(ex.scale_codes(), wide.scale_codes())
    assert torch.equal(ex.codes, wide.codes)


@pytest.mark.parametrize("scale", ["absmax", "4over6", "search", "exhaustive"])
def test_importance_of_ones_changes_nothing(scale):
    w = _heavy(3, 32, 128)
    a = mxptq.quantize_tensor(w, "nvfp4", scale)
    b = mxptq.quantize_tensor(w, "nvfp4", scale, importance=torch.ones(128))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale_codes(), b.scale_codes())


def test_importance_weights_are_used():
    w = _heavy(4, 64, 128)
    h = torch.exp(3 * torch.randn(128, generator=torch.Generator().manual_seed(1)))
    a = mxptq.quantize_tensor(w, "nvfp4", "search")
    b = mxptq.quantize_tensor(w, "nvfp4", "search", importance=h)
    assert not torch.equal(a.scale_codes(), b.scale_codes())

    def weighted(qt):
        d = mxptq.dequantize(qt) - w
        return float((d * d * h).sum())

    assert weighted(b) < weighted(a)


def test_search_never_worse_and_picks_offsets_in_window():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    c0 = mxptq.quantize_tensor(w, "nvfp4", "absmax").scale_codes()
    c = mxptq.quantize_tensor(w, "nvfp4", "search", window=(-2, 3)).scale_codes()
    off = c - c0
    assert int(off.min()) >= -2 and int(off.max()) <= 3 and bool((off != 0).any())


def test_underflow_floor():
    fmt = get_format("nvfp4", has_global=False)
    w = torch.full((2, 16), 0.002)  # bmax/6 = 3.3e-4 < 2^-10: RNE gives a zero E4M3 scale
    off = mxptq.quantize_tensor(w, fmt, "absmax", underflow_floor=False)
    on = mxptq.quantize_tensor(w, fmt, "absmax")
    assert int(off.scale_codes().max()) == 0 and float(mxptq.dequantize(off).abs().max()) == 0
    assert int(on.scale_codes().min()) == 1
    assert float(_block_errors(w, on).sum()) < float(_block_errors(w, off).sum())


def test_all_zero_tensor_and_blocks():
    for fmt in ("nvfp4", "nvfp4-ue5m3", "mxfp4"):
        for scale in ("absmax", "search", "exhaustive"):
            qt = mxptq.quantize_tensor(torch.zeros(4, 64), fmt, scale)
            assert int(qt.codes.max()) == 0 and int(qt.scale_codes().max()) == 0
            assert torch.equal(mxptq.dequantize(qt), torch.zeros(4, 64))


def test_bad_inputs_raise_value_error():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        mxptq.quantize_tensor(torch.randn(4, 40), "nvfp4", "absmax")
    bad = w.clone()
    bad[1, 2] = float("nan")
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="1 NaN and 1 Inf"):
        mxptq.quantize_tensor(bad, "nvfp4", "absmax")
    with pytest.raises(ValueError, match="unknown format"):
        mxptq.quantize_tensor(w, "int4", "absmax")
    with pytest.raises(ValueError, match="unknown scale selector"):
        mxptq.quantize_tensor(w, "nvfp4", "mse")
    with pytest.raises(ValueError, match="4over6"):
        mxptq.quantize_tensor(w, "mxfp4", "4over6")
    with pytest.raises(ValueError, match="2-D"):
        mxptq.quantize_tensor(torch.randn(64), "nvfp4", "absmax")
    with pytest.raises(ValueError, match="importance"):
        mxptq.quantize_tensor(w, "nvfp4", "search", importance=torch.ones(10))
    with pytest.raises(ValueError, match="window"):
        mxptq.quantize_tensor(w, "nvfp4", "search", window=(1, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_equal_their_fp32_values(dtype):
    w = _heavy(6, 16, 128).to(dtype)
    a = mxptq.quantize_tensor(w, "nvfp4", "search")
    b = mxptq.quantize_tensor(w.float(), "nvfp4", "search")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales.view(torch.uint8),
                                                         b.scales.view(torch.uint8))


def test_tensor_api_shapes_and_dtypes():
    w = torch.randn(24, 96)
    nv = mxptq.quantize_tensor(w, "nvfp4", "absmax")
    assert nv.codes.shape == (24, 48) and nv.codes.dtype == torch.uint8
    assert nv.scales.shape == (24, 6) and nv.scales.dtype == torch.float8_e4m3fn
    assert nv.global_scale.dtype == torch.float32 and nv.global_scale.dim() == 0
    mx = mxptq.quantize_tensor(w, "mxfp4", "absmax")
    assert mx.scales.shape == (24, 3) and mx.scales.dtype == torch.uint8 and mx.global_scale is None
    ue = mxptq.quantize_tensor(w, "nvfp4-ue5m3", "search")
    assert ue.scales.dtype == torch.uint8 and ue.global_scale is None
    assert mxptq.dequantize(nv).shape == (24, 96) and mxptq.dequantize(nv).dtype == torch.float32


def test_mxfp4_floor_rule_matches_ocp_formula():
    w = torch.randn(8, 64) * 10
    qt = mxptq.quantize_tensor(w, "mxfp4", "absmax")
    bmax = w.view(8, 2, 32).abs().amax(-1)
    e = torch.floor(torch.log2(bmax)) - 2
    assert torch.equal(qt.scale_codes(), (e + 127).to(torch.int32))
    q = e2m1_encode((w.view(8, 2, 32) / torch.exp2(e).unsqueeze(-1)).clamp(-6, 6))
    assert torch.equal(qt.codes, pack_e2m1(q.view(8, 64)))


@pytest.mark.parametrize("fmt_name,block,over", FORMAT_CASES)
def test_exhaustive_is_the_float64_brute_force_optimum(fmt_name, block, over):
    """An independent brute force in float64 over every finite code: no code beats ours."""
    fmt = get_format(fmt_name, block, **over)
    w = torch.cat([_heavy(8, 8, 128), _adversarial(9, 8, 128)])
    qt = mxptq.quantize_tensor(w, fmt, "exhaustive")
    b = fmt.block_size
    x = w.double().view(16, -1, b, 1)
    g = float(qt.global_scale) if fmt.has_global else 1.0
    table = fmt.scale.table().double()[fmt.scale.min_code:]
    s = table / g  # scales in original units
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    y = (x.abs() / s).clamp(max=6)  # [rows, blocks, B, codes]
    q = grid[(y.unsqueeze(-1) - grid).abs().argmin(-1)]  # nearest; ties do not change the error
    err_all = ((x.abs() - q * s) ** 2).sum(2)  # [rows, blocks, codes]
    best = err_all.min(-1).values
    ours = _block_errors(w, qt).double()
    assert bool((ours <= best * (1 + 1e-5) + 1e-30).all())
