"""Triton kernels (run by the interpreter on CPU) give the reference's bytes exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from adversarial_blocks import adversarial  # noqa: E402

import mxptq  # noqa: E402
from mxptq.formats import get_format  # noqa: E402
from mxptq.scales import resolve_selector  # noqa: E402
from mxptq.tensor import tensor_amax as ref_amax  # noqa: E402

kernels = pytest.importorskip("mxptq.kernels")
# The interpreter runs on numpy, which warns on the overflows that IEEE arithmetic defines.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (format, overrides): every scale codec, with and without a global scale, both MX rules.
FORMATS = [
    ("nvfp4", {}),
    ("nvfp4", {"has_global": False}),
    ("nvfp4-ue5m3", {}),
    ("nvfp4-ue5m3", {"has_global": True}),
    ("nvfp4-ue5m3", {"scale": "ue5m3-ieee", "has_global": True}),
    ("mxfp4", {}),
    ("mxfp4", {"mx_rule": "ceil"}),
]


def weights(n: int, k: int, b: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Heavy-tailed blocks at magnitudes from 2^-60 to 2^60 (fp16: its range), with adversarial
    rows: all zero, one non-zero per block, constant blocks, values on the E2M1 grid (ties),
    and blocks whose elements lie on the rounding midpoints."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.randn(n, k, generator=gen).exp()
    lo, hi = (-20, 8) if dtype == torch.float16 else (-60, 60)
    mag = torch.randint(lo, hi + 1, (n, k // b), generator=gen).float().exp2()
    w = (w.view(n, k // b, b) * mag.unsqueeze(-1)).view(n, k)
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5])
    special = [
        torch.zeros(k),
        torch.where(torch.arange(k) % b == 0, 3.0, 0.0),
        torch.full((k,), -0.3),
        grid[torch.randint(0, 8, (k,), generator=gen)] * 2.0**-3,
        grid[torch.randint(8, 15, (k,), generator=gen)] * torch.randn(k, generator=gen).sign(),
    ]
    for i, row in enumerate(special):
        if i < n:
            w[(i * 7) % n] = row
    return w.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else w.to(dtype)


def assert_same(w: torch.Tensor, fmt, scale: str, **kw) -> None:
    ref = mxptq.quantize_tensor(w, fmt, scale, backend="torch", **kw)
    out = mxptq.quantize_tensor(w, fmt, scale, backend="triton", **kw)
    assert out.codes.dtype == ref.codes.dtype and out.scales.dtype == ref.scales.dtype
    assert torch.equal(out.scale_codes(), ref.scale_codes()), "scale codes differ"
    assert torch.equal(out.codes, ref.codes), "packed E2M1 codes differ"
    if ref.global_scale is None:
        assert out.global_scale is None
    else:
        assert out.global_scale.shape == ()
        assert torch.equal(out.global_scale.view(torch.int32), ref.global_scale.view(torch.int32))


def _cases():
    """Every format x selector, with block size, dtype, floor and importance rotated through
    their values so that each value meets every format without the full product."""
    i = 0
    for (name, over), scale in itertools.product(FORMATS, mxptq.SELECTORS):
        if scale == "4over6" and name == "mxfp4":
            continue
        b = (4, 8, 16, 32, 64, 128)[i % 6]
        yield pytest.param(
            name,
            over,
            scale,
            b,
            DTYPES[i % 3],
            i % 4 != 3,
            i % 2 == 1,
            id=f"{name}-{'-'.join(map(str, over.values()))}-{scale}-b{b}-{i}",
        )
        i += 1


@pytest.mark.parametrize("name,over,scale,b,dtype,floor,use_h", list(_cases()))
def test_bytes_match_reference(name, over, scale, b, dtype, floor, use_h):
    fmt = get_format(name, b, **over)
    n, k = 7, max(2 * b, 64)
    w = weights(n, k, b, dtype, seed=b + len(over))
    h = None
    if use_h:
        h = torch.rand(k, generator=torch.Generator().manual_seed(1)) * 4
        h[::5] = 0.0
    assert_same(w, fmt, scale, importance=h, underflow_floor=floor)


@pytest.mark.parametrize("b", [4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("scale", ["search", "exhaustive"])
def test_every_block_size(b, scale):
    for name in ("nvfp4", "mxfp4"):
        assert_same(weights(3, 2 * b, b, torch.bfloat16, seed=b), get_format(name, b), scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mag", [1e-38, 1e-30, 1e-12, 1e30, 3e38])
def test_tiny_and_huge_magnitudes(dtype, mag):
    """Subnormal scales, overflowing 1/x and saturated global scales."""
    if dtype == torch.float16:
        mag = min(max(mag, 1e-7), 6e4)
    gen = torch.Generator().manual_seed(3)
    top = 6e4 if dtype == torch.float16 else 3.3e38
    w = (torch.randn(5, 64, generator=gen) * mag).clamp(-top, top).to(dtype)
    w[1, :16] = w[1, :16] * 1e-3
    for name, scale in [
        ("nvfp4", "search"),
        ("nvfp4", "exhaustive"),
        ("mxfp4", "exhaustive"),
        ("nvfp4-ue5m3", "4over6"),
    ]:
        for floor in (True, False):
            assert_same(w, name, scale, underflow_floor=floor)


@pytest.mark.parametrize("scale", mxptq.SELECTORS)
def test_global_amax_and_norm_overrides(scale):
    w = weights(5, 64, 16, torch.bfloat16, seed=9)
    for amax in (0.0, 1e-3, 7.5, torch.tensor(123.0, dtype=torch.float64), 1e38):
        assert_same(w, "nvfp4", scale, global_amax=amax)
    assert_same(w, "nvfp4", scale, global_norm=3.3)


@pytest.mark.parametrize("window", [(0, 0), (-3, 0), (0, 2), (-40, 40)])
def test_search_windows(window):
    w = weights(5, 64, 16, torch.float32, seed=4)
    assert_same(w, "nvfp4", "search", window=window)
    assert_same(w, "mxfp4", "search", window=window)


def test_exhaustive_is_the_brute_force_argmin():
    """Adversarial blocks for the pruning: the optimum far from c0, and exact ties between
    codes (a lone element is represented exactly at several scales)."""
    gen = torch.Generator().manual_seed(5)
    rows = [torch.where(torch.arange(64) % 16 == 3, 2.0 ** (i - 10), 0.0) for i in range(20)]
    outlier = torch.randn(64, generator=gen) * 1e-3
    outlier[::16] = 100.0
    rows += [outlier, torch.randn(64, generator=gen).round() * 0.5]
    w = torch.stack(rows)
    h = torch.rand(64, generator=gen)
    h[3::16] = 0.0
    for name in ("nvfp4", "nvfp4-ue5m3", "mxfp4"):
        assert_same(w, name, "exhaustive")
        assert_same(w, name, "exhaustive", importance=h)
        assert_same(w.to(torch.bfloat16), name, "exhaustive", underflow_floor=False)


@pytest.mark.parametrize(
    "name,over,b,imp",
    [
        ("nvfp4", {}, 16, False),
        ("nvfp4", {"has_global": False}, 8, True),
        ("nvfp4-ue5m3", {"scale": "ue5m3-ieee", "has_global": True}, 128, True),
        ("mxfp4", {"mx_rule": "ceil"}, 4, False),
    ],
)
def test_exact_window_path_on_adversarial_blocks(name, over, b, imp):
    """The certified window (and, for the blocks it rejects, the pruned search) gives the
    reference's exhaustive bytes; for B = 16 path="pruned", the pruned search alone, gives them
    too."""
    fmt = get_format(name, b, **over)
    kinds = adversarial(2, b, seed=b, spread=4 if fmt.has_global else 60)
    w = torch.cat(kinds).to(torch.bfloat16 if b == 16 else torch.float32)
    h = torch.rand(2 * b, generator=torch.Generator().manual_seed(b)) if imp else None
    cfg = resolve_selector(fmt, "exhaustive")
    ref = mxptq.quantize_tensor(w, fmt, "exhaustive", backend="torch", importance=h)
    for path in ("window", "pruned") if b == 16 else ("window",):
        out = kernels.quantize(w, fmt, cfg, h, path=path)
        assert torch.equal(out.scale_codes(), ref.scale_codes())
        assert torch.equal(out.codes, ref.codes)


def test_odd_rows_and_empty():
    assert_same(weights(1, 32, 16, torch.bfloat16, seed=2), "nvfp4", "search")
    assert_same(weights(13, 32, 32, torch.float16, seed=2), "mxfp4", "search")
    assert_same(torch.zeros(0, 32), "nvfp4", "exhaustive")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_amax(dtype):
    w = weights(9, 4096 + 64, 64, dtype, seed=6)
    assert torch.equal(kernels.tensor_amax(w), ref_amax(w))
    assert kernels.tensor_amax(torch.zeros(0, 16)).item() == 0.0


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name,over", [("nvfp4", {}), ("nvfp4-ue5m3", {"has_global": True}), ("mxfp4", {})]
)
def test_dequantize_matches_reference(name, over, out_dtype):
    fmt = get_format(name, 32, **over)
    w = weights(6, 128, 32, torch.bfloat16, seed=8)
    qt = mxptq.quantize_tensor(w, fmt, "search", backend="torch")
    ref = mxptq.dequantize(qt, out_dtype)
    out = kernels.dequantize(qt, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(
        out.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
        ref.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
    )


def test_a_wrong_byte_is_caught():
    """The comparison itself can fail: a one-code change in the scales is detected."""
    w = weights(3, 32, 16, torch.bfloat16, seed=1)
    qt = mxptq.quantize_tensor(w, "nvfp4-ue5m3", "search", backend="triton")
    qt.scales[0, 0] ^= 1
    ref = mxptq.quantize_tensor(w, "nvfp4-ue5m3", "search", backend="torch")
    assert not torch.equal(qt.scale_codes(), ref.scale_codes())
