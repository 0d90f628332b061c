"""GPTQ with block-scaled FP4: beats RTN on the output error, lazy/static scales, damping,
act_order with groups in original column order, and bytes that dequantize to the result."""

import pytest
import torch

from mxptq import dequantize, quantize_tensor
from mxptq.calibration import gptq_quantize
from mxptq.errors import MxptqError

N, K, T = 32, 160, 1024  # K spans two column blocks of 128 and ten groups of 16


@pytest.fixture(scope="module")
def problem():
    """A weight and correlated inputs with uneven channel scales, as in real layers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    mix = torch.randn(K, K, generator=g) / K**0.5 + 0.3 * torch.eye(K)
    x = (torch.randn(T, K, generator=g) @ mix) * torch.linspace(0.2, 3.0, K)
    return w, x, 2.0 / T * x.T @ x


def out_err(w, wq, x):
    return float(((w - wq) @ x.T).pow(2).sum())


@pytest.mark.parametrize("scale", ["absmax", "search"])
@pytest.mark.parametrize("mode", ["lazy", "static"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_bytes_match(problem, scale, mode, act_order):
    w, x, h = problem
    r = gptq_quantize(w, h, "nvfp4", scale, scales=mode, act_order=act_order)
    assert torch.equal(dequantize(r.qt), r.weight)
    assert r.qt.global_scale == quantize_tensor(w, "nvfp4", scale).global_scale
    rtn = dequantize(quantize_tensor(w, "nvfp4", scale))
    assert out_err(w, r.weight, x) < 0.85 * out_err(w, rtn, x)


def test_static_scales_are_the_rtn_scales_of_the_original_weight(problem):
    w, _, h = problem
    r = gptq_quantize(w, h, "nvfp4", "search", scales="static", act_order=True)
    assert torch.equal(r.qt.scale_codes(), quantize_tensor(w, "nvfp4", "search").scale_codes())


def test_lazy_scales_are_chosen_on_the_updated_weights(problem):
    w, _, h = problem
    lazy = gptq_quantize(w, h, "nvfp4", "search", scales="lazy")
    static = quantize_tensor(w, "nvfp4", "search").scale_codes()
    codes = lazy.qt.scale_codes()
    assert torch.equal(codes[:, 0], static[:, 0])  # the first group has seen no update yet
    assert not torch.equal(codes[:, 1:], static[:, 1:])


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_batch_updates_do_not_change_the_result(problem, act_order):
    """Lazy scales must see pending updates: with act_order a group's columns sit in later
    column blocks, so a 32-column block run equals a single-block run only if they do."""
    w, _, h = problem
    one = gptq_quantize(w, h, "nvfp4", "search", act_order=act_order, block=K)
    many = gptq_quantize(w, h, "nvfp4", "search", act_order=act_order, block=32)
    assert (one.qt.scale_codes() != many.qt.scale_codes()).float().mean() < 0.01
    assert (one.weight != many.weight).float().mean() < 0.01


def test_lazy_scale_equals_selector_on_current_weights_without_act_order():
    """With an identity Hessian GPTQ propagates nothing: lazy scales equal RTN scales."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    r = gptq_quantize(w, torch.eye(64), "nvfp4", "search", percdamp=0.0)
    rtn = quantize_tensor(w, "nvfp4", "search")
    assert torch.equal(r.qt.codes, rtn.codes)
    assert torch.equal(r.qt.scale_codes(), rtn.scale_codes())


@pytest.mark.parametrize("mode", ["lazy", "static"])
def test_act_order_groups_stay_in_original_column_order(mode):
    """A diagonal Hessian propagates no error, so GPTQ must equal RTN exactly, also when
    act_order visits the columns in a shuffled order (scales looked up by original column)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, K, generator=g)
    h = torch.diag(torch.rand(K, generator=g) + 0.1)
    r = gptq_quantize(w, h, "nvfp4", "search", scales=mode, act_order=True, percdamp=0.0)
    rtn = quantize_tensor(w, "nvfp4", "search")
    assert torch.equal(r.qt.codes, rtn.codes)
    assert torch.equal(r.qt.scale_codes(), rtn.scale_codes())


def test_damping_is_needed_for_a_singular_hessian_and_changes_the_result(problem):
    w, x, _ = problem
    low_rank = x[:64]  # 64 tokens for 160 channels: H is singular
    h = 2.0 / 64 * low_rank.T @ low_rank
    with pytest.raises(MxptqError, match="damp"):
        gptq_quantize(w, h, "nvfp4", "absmax", percdamp=0.0)
    a = gptq_quantize(w, h, "nvfp4", "absmax", percdamp=0.01).weight
    b = gptq_quantize(w, h, "nvfp4", "absmax", percdamp=0.5).weight
    assert not torch.equal(a, b)


def test_dead_channels_are_zeroed_and_fused_amax_is_used(problem):
    w, _, h = problem
    h = h.clone()
    h[5, :] = 0
    h[:, 5] = 0
    r = gptq_quantize(w, h, "nvfp4", "absmax", global_amax=2 * w.abs().max())
    assert bool((r.weight[:, 5] == 0).all())
    expected = quantize_tensor(w, "nvfp4", "absmax", global_amax=2 * w.abs().max())
    assert r.qt.global_scale == expected.global_scale


def test_mxfp4_and_importance(problem):
    w, x, h = problem
    r = gptq_quantize(w[:, :128], h[:128, :128], "mxfp4", "search")
    assert r.qt.global_scale is None and torch.equal(dequantize(r.qt), r.weight)
    rtn = dequantize(quantize_tensor(w[:, :128], "mxfp4", "search"))
    assert out_err(w[:, :128], r.weight, x[:, :128]) < out_err(w[:, :128], rtn, x[:, :128])
    imp = h.diagonal() / 2
    ri = gptq_quantize(w, h, "nvfp4", "search", importance=imp)
    assert torch.equal(dequantize(ri.qt), ri.weight)


def test_importance_reduces_the_weighted_error(problem):
    w, x, h = problem
    imp = (x * x).mean(0)
    plain = dequantize(quantize_tensor(w, "nvfp4", "search"))
    weighted = dequantize(quantize_tensor(w, "nvfp4", "search", importance=imp))
    werr = lambda wq: float((((w - wq) ** 2) * imp).sum())  # noqa: E731
    assert werr(weighted) < werr(plain)


# The Triton column-block kernel against the torch loop: same bytes, same values. Small shapes
# (the interpreter runs every column's numpy ops); rows ragged against the 16-row programs.
KERNEL_CASES = [
    # format, block size, selector, scale mode, importance, GPTQ column block, K
    ("nvfp4", None, "search", "lazy", True, 128, 160),
    ("nvfp4", None, "absmax", "static", False, 32, 64),
    ("mxfp4", None, "search", "lazy", False, 32, 64),
    ("nvfp4-ue5m3", None, "4over6", "lazy", True, 64, 64),
    ("nvfp4", 4, "exhaustive", "lazy", False, 16, 32),
    ("mxfp4", 128, "absmax", "lazy", False, 128, 256),
]


@pytest.mark.parametrize(("fmt", "bs", "scale", "mode", "imp", "block", "k"), KERNEL_CASES)
def test_triton_column_blocks_equal_the_torch_loop(problem, fmt, bs, scale, mode, imp, block, k):
    w, x, h = problem
    if k > K:
        g = torch.Generator().manual_seed(3)
        w = torch.randn(N, k, generator=g)
        xk = torch.randn(256, k, generator=g) * torch.linspace(0.5, 2.0, k)
        h = 2.0 / 256 * xk.T @ xk
    w, h = w[:19, :k].contiguous(), h[:k, :k].contiguous()
    importance = h.diagonal() / 2 if imp else None
    kw = dict(scales=mode, importance=importance, block=block, block_size=bs)
    ref = gptq_quantize(w, h, fmt, scale, backend="torch", **kw)
    out = gptq_quantize(w, h, fmt, scale, backend="triton", **kw)
    assert torch.equal(out.qt.codes, ref.qt.codes)
    assert torch.equal(out.qt.scale_codes(), ref.qt.scale_codes())
    assert torch.equal(out.weight, ref.weight)
    assert out.qt.global_scale == ref.qt.global_scale


def test_triton_backend_takes_the_torch_loop_where_the_kernel_cannot():
    """act_order scatters a group over column blocks, a 48-column block splits groups: both run
    the torch loop (same result as asking for it), not a wrong kernel launch."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 96, generator=g)
    h = torch.eye(96) + 0.05
    for kw in (dict(act_order=True), dict(block=40)):
        a = gptq_quantize(w, h, "nvfp4", "search", backend="torch", **kw)
        b = gptq_quantize(w, h, "nvfp4", "search", backend="triton", **kw)
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="backend"):
        gptq_quantize(w, h, "nvfp4", "search", backend="cuda")
