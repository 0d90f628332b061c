"""`--importance hessian`: every selector minimises the block quadratic form dᵀ H_b d.

The torch reference (mxptq.scales) is the definition a kernel must equal: its fp32 evaluation
order is checked against an explicit scalar implementation, and its choice against a float64
brute force over the selector's candidate codes, which it must match up to near-ties. The
tolerance is the fp32 rounding bound of the reference's evaluation: d_i = x_i·g − q_i·s costs
two roundings (q·s is exact), t_i = Σ_j H_ij d_j one per product plus log2 B levels of the
tree, err = Σ_i d_i t_i the same again, so |err32 − err64| <= γ_n · Σ_ij |d_i H_ij d_j| with
n = 2·log2 B + 6 and γ_n = n·u / (1 − n·u), u = 2^-24. Two candidates whose float64 errors
differ by less than the sum of their bounds may be ordered either way in fp32.
"""

import math

import numpy as np
import pytest
import torch

from mxptq import dequantize, quantize_tensor
from mxptq import scales as S
from mxptq.calibration import CalibOptions, LinearStats, gptq_quantize
from mxptq.formats import e2m1_decode, get_format

B = 16


def covariances(k: int, t: int, seed: int) -> torch.Tensor:
    """Block covariances of correlated inputs with uneven channel scales, [K/B, B, B]."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.5 * torch.eye(k)
    x = (torch.randn(t, k, generator=g) @ mix) * torch.linspace(0.3, 3.0, k)
    s = LinearStats(k, block=B)
    s.add(x)
    return s.block_covariance()


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g) * torch.linspace(0.05, 2.0, 64)
    w[3, :16] = 0.0  # an all-zero block
    w[5, 16:32] *= 1e-3  # a small one
    return w, covariances(64, 512, 2)


def errors64(x, q_of, s_vals, g, hb):
    """float64 dᵀ H d and Σ|d_i H_ij d_j| of blocks x [NB, B] for each candidate scale value."""
    x64, h64 = x.double(), hb.double()
    out, mag = [], []
    for s in s_vals:  # s: fp32 [NB]
        q = q_of(s)
        d = x64 * float(g) - q.double() * s.double().unsqueeze(-1)
        out.append(torch.einsum("ni,nij,nj->n", d, h64, d))
        mag.append(torch.einsum("ni,nij,nj->n", d.abs(), h64.abs(), d.abs()))
    return torch.stack(out, -1), torch.stack(mag, -1)


def candidates(fmt, cfg, c0: torch.Tensor) -> torch.Tensor:
    """Each block's candidate codes [NB, C]: c0, then every valid code in the selector's
    range (c0 again where one is out of it)."""
    lo, hi = cfg.window if cfg.name == "search" else (-999, 999)
    codes = torch.arange(fmt.scale.min_code, fmt.scale.max_code + 1)
    cand = codes.unsqueeze(0).expand(c0.numel(), -1)
    ok = (cand - c0.unsqueeze(-1) >= lo) & (cand - c0.unsqueeze(-1) <= hi)
    return torch.cat([c0.unsqueeze(-1), torch.where(ok, cand, c0.unsqueeze(-1))], -1)


@pytest.mark.parametrize("scale", ["search", "exhaustive", "4over6"])
def test_reference_is_the_float64_optimum_up_to_rounding(case, scale):
    w, hb = case
    fmt = get_format("nvfp4")
    cfg = S.resolve_selector(fmt, scale)
    n, k = w.shape
    qt = quantize_tensor(w, "nvfp4", scale, importance=hb, backend="torch")
    g = qt.global_scale
    x = w.view(-1, B)
    h = hb.repeat(n, 1, 1)  # block (r, j) uses hb[j]
    chosen = qt.scale_codes().flatten()
    table = fmt.scale.table("cpu")
    bmax = x.abs().amax(-1)
    c0 = S.absmax_code(fmt, bmax, g)
    if scale == "4over6":
        cand = torch.stack([c0, S.absmax_code(fmt, bmax, g, mult=1.5)], -1)
    else:
        cand = candidates(fmt, cfg, c0)
    inv_g = S.reciprocal(g)

    def q_of(s):
        return e2m1_decode(S.quantize_codes(x, s, inv_g))

    e, mag = errors64(x, q_of, [table[cand[:, i]] for i in range(cand.shape[1])], g, h)
    best = e.min(-1).values
    at = cand == chosen.unsqueeze(-1)
    assert bool(at.any(-1).all())  # the choice is one of the candidates
    idx = at.float().argmax(-1)
    e_ref = e.gather(-1, idx.unsqueeze(-1))[:, 0]
    m_ref = mag.gather(-1, idx.unsqueeze(-1))[:, 0]
    m_best = mag.gather(-1, e.argmin(-1, keepdim=True))[:, 0]
    u = 2.0**-24
    nn = 2 * math.log2(B) + 6
    gamma = nn * u / (1 - nn * u)
    assert bool((e_ref - best <= gamma * (m_ref + m_best)).all())
    # the bound is not vacuous: most blocks are far from a near-tie, and search moves off c0
    assert float((chosen != c0).float().mean()) > 0.05


def test_reference_follows_its_fp32_evaluation_order():
    """block_error with covariances equals the definition evaluated one fp32 operation at a
    time: t_i = tree_j(fl(H_ij·d_j)), err = tree_i(fl(d_i·t_i))."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, B, generator=g)
    hb = covariances(B * 6, 64, 6)
    s = torch.full((6,), 0.37)
    y = x * 1.0
    got = S.block_error(x, y, s, torch.tensor(1.0), hb)
    f32 = np.float32

    def tree(v):
        v = list(v)
        while len(v) > 1:
            v = [f32(v[i] + v[i + 1]) for i in range(0, len(v), 2)]
        return v[0]

    q = e2m1_decode(S.quantize_codes(x, s, torch.tensor(1.0)))
    for b in range(6):
        d = [f32(f32(y[b, i]) - f32(q[b, i] * s[b])) for i in range(B)]
        h = hb[b].numpy()
        t = [tree([f32(h[i, j] * d[j]) for j in range(B)]) for i in range(B)]
        assert np.float32(got[b]) == tree([f32(d[i] * t[i]) for i in range(B)])


def test_zero_covariance_keeps_the_absmax_code(case):
    """All candidates tie at 0: the tie rule keeps c0."""
    w, hb = case
    a = quantize_tensor(w, "nvfp4", "search", importance=torch.zeros_like(hb))
    assert torch.equal(a.scale_codes(), quantize_tensor(w, "nvfp4", "absmax").scale_codes())


def test_hessian_lowers_the_quadratic_form_against_diag(case):
    w, hb = case
    diag = hb.diagonal(dim1=-2, dim2=-1).flatten()

    def qf(qt):
        d = (w - dequantize(qt)).view(w.shape[0], -1, B).double()
        return float(torch.einsum("rni,nij,rnj->", d, hb.double(), d))

    for scale in ("search", "exhaustive"):
        h = qf(quantize_tensor(w, "nvfp4", scale, importance=hb))
        assert h < qf(quantize_tensor(w, "nvfp4", scale, importance=diag))
        assert h < qf(quantize_tensor(w, "nvfp4", scale))


def test_bad_covariance_shapes_are_refused(case):
    w, hb = case
    with pytest.raises(ValueError, match="block covariances"):
        quantize_tensor(w, "nvfp4", "search", importance=hb[:2])
    with pytest.raises(ValueError, match="finite"):
        quantize_tensor(w, "nvfp4", "search", importance=hb * float("nan"))


def test_stats_collect_the_block_covariances():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 50, 32, generator=g)
    s = LinearStats(32, block=B)
    s.add(x[0])
    s.add(x[1:])
    xb = x.reshape(-1, 2, B).double()
    want = torch.einsum("tni,tnj->nij", xb, xb) / 150
    assert torch.allclose(s.block_covariance().double(), want, rtol=1e-6)
    assert torch.allclose(s.block_covariance().diagonal(dim1=-2, dim2=-1).flatten(),
                          s.second_moment(), rtol=1e-6)


# GPTQ with block-covariance scales.
@pytest.fixture(scope="module")
def gptq_case():
    g = torch.Generator().manual_seed(8)
    k = 64
    w = torch.randn(19, k, generator=g)
    x = torch.randn(256, k, generator=g) * torch.linspace(0.5, 2.0, k)
    s = LinearStats(k, True, block=B)
    s.add(x)
    return w, s.hessian(), s.block_covariance()


def test_gptq_static_scales_are_the_hessian_rtn_scales(gptq_case):
    w, h, hb = gptq_case
    r = gptq_quantize(w, h, "nvfp4", "search", scales="static", importance=hb)
    want = quantize_tensor(w, "nvfp4", "search", importance=hb).scale_codes()
    assert torch.equal(r.qt.scale_codes(), want)
    assert torch.equal(dequantize(r.qt), r.weight)


def test_gptq_lazy_scales_use_the_quadratic_form_on_updated_weights(gptq_case):
    w, h, hb = gptq_case
    r = gptq_quantize(w, h, "nvfp4", "search", scales="lazy", importance=hb)
    static = quantize_tensor(w, "nvfp4", "search", importance=hb).scale_codes()
    plain = gptq_quantize(w, h, "nvfp4", "search", scales="lazy").qt.scale_codes()
    codes = r.qt.scale_codes()
    assert torch.equal(codes[:, 0], static[:, 0])  # the first group has seen no update yet
    assert not torch.equal(codes[:, 1:], static[:, 1:])
    assert not torch.equal(codes, plain)
    assert torch.equal(dequantize(r.qt), r.weight)


@pytest.mark.parametrize("mode", ["lazy", "static"])
def test_gptq_triton_backend_equals_the_torch_loop(gptq_case, mode):
    """Lazy: each group's scale by kernels/hessian.py inside the column kernel; static: by the
    torch reference up front."""
    w, h, hb = gptq_case
    w = w[:5]  # the interpreter runs every column's numpy ops
    kw = dict(scales=mode, importance=hb, block=32)
    ref = gptq_quantize(w, h, "nvfp4", "search", backend="torch", **kw)
    out = gptq_quantize(w, h, "nvfp4", "search", backend="triton", **kw)
    assert torch.equal(out.qt.codes, ref.qt.codes)
    assert torch.equal(out.qt.scale_codes(), ref.qt.scale_codes())
    assert torch.equal(out.weight, ref.weight)


# Through `mxptq quantize`.
def test_cli_hessian_writes_the_library_gptq_result(tmp_path):
    from quant_helpers import tiny_llama_dir
    from real_assets import english_text
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from mxptq.calibration import calibrate, load_calibration, quantize_layer
    from mxptq.checkpoint import read_checkpoint
    from mxptq.cli import app

    text, model = english_text(), tiny_llama_dir()
    out = tmp_path / "h"
    r = CliRunner().invoke(app, ["quantize", "--model", str(model), "--out", str(out),
                                 "--calib", str(text), "--calib-samples", "2",
                                 "--calib-seqlen", "16", "--algo", "gptq",
                                 "--importance", "hessian"])
    assert r.exit_code == 0, r.output + r.stderr
    ids = load_calibration(text, AutoTokenizer.from_pretrained(model), 2, 16, 0)
    opts = CalibOptions(importance="hessian", algo="gptq")
    lib = {}
    calibrate(model, ids, hessian=True, blocks=opts.covariance_block, keep_stats=False,
              on_layer=lambda run: lib.update(quantize_layer(run, opts)))
    got = read_checkpoint(out)
    assert sorted(got) == sorted(lib)
    for m, qt in lib.items():
        assert torch.equal(got[m].codes, qt.codes), m
        assert torch.equal(got[m].scales.view(torch.uint8), qt.scales.view(torch.uint8)), m
    rep = (out / "mxptq_report.json").read_text()
    assert '"importance": "hessian"' in rep


def test_recipe_booleans_and_bad_modes():
    from mxptq.errors import MxptqError
    from mxptq.quantize_cmd import check_calibration
    from mxptq.recipes import DEFAULTS

    opts = dict(DEFAULTS, calib="t.txt", importance=True)
    check_calibration(opts)
    assert opts["importance"] == "diag"  # recipes written before the modes
    with pytest.raises(MxptqError, match="unknown --importance"):
        check_calibration(dict(DEFAULTS, calib="t.txt", importance="full"))
    with pytest.raises(ValueError, match="importance"):
        CalibOptions(importance="full")




# The Triton quantizer with covariances (kernels/hessian.py) against the torch reference.
HESS_KERNEL_CASES = [
    # format, block size, selector, weight dtype, rows, K
    ("nvfp4", None, "search", torch.float32, 5, 48),
    ("nvfp4", None, "4over6", torch.bfloat16, 3, 32),
    ("nvfp4-ue5m3", None, "search", torch.float32, 2, 32),
    ("mxfp4", None, "search", torch.float32, 2, 64),
    ("nvfp4", 4, "exhaustive", torch.float32, 1, 8),
]


@pytest.mark.parametrize(("fmt", "bs", "scale", "dtype", "n", "k"), HESS_KERNEL_CASES)
def test_triton_quantizer_with_covariances_gives_the_reference_bytes(fmt, bs, scale, dtype,
                                                                     n, k):
    b = get_format(fmt, bs).block_size
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(n, k, generator=g) * torch.linspace(0.05, 2.0, k)).to(dtype)
    w[0, :b] = 0.0
    x = torch.randn(4 * k, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    s = LinearStats(k, block=b)
    s.add(x)
    hb = s.block_covariance()
    kw = dict(block_size=bs, importance=hb)
    ref = quantize_tensor(w, fmt, scale, backend="torch", **kw)
    out = quantize_tensor(w, fmt, scale, backend="triton", **kw)
    assert torch.equal(out.codes, ref.codes)
    assert torch.equal(out.scale_codes(), ref.scale_codes())
    assert (out.global_scale is None) == (ref.global_scale is None)
    if ref.global_scale is not None:
        assert torch.equal(out.global_scale, ref.global_scale)


def test_block_covariances_survive_the_resume_state(tmp_path):
    """A layer's saved statistics keep the block covariances (--resume quantizes with them)."""
    from mxptq.calibration.state import CalibState

    s = LinearStats(32, block=B)
    s.add(torch.randn(40, 32, generator=torch.Generator().manual_seed(10)))
    st = CalibState(tmp_path / "c", "sig", 2)
    st.start(torch.zeros(1, 4, dtype=torch.long))
    st.save_layer(0, {"l.q_proj": s}, {})
    back, _ = st.load_layer(0, "nvfp4", None)
    assert torch.equal(back["l.q_proj"].block_covariance(), s.block_covariance())
    assert torch.equal(back["l.q_proj"].second_moment(), s.second_moment())
