"""The exact path's candidate window and certificate (scales.exhaustive_by_window) give the
exhaustive codes for every block: random and adversarial data, every codec and block size,
with and without importance weights and global scale."""

import itertools

import pytest
import torch
from adversarial_blocks import adversarial

from mxptq import scales as S
from mxptq.formats import BLOCK_SIZES, get_format

FORMATS = [
    ("nvfp4", {}),
    ("nvfp4", {"has_global": False}),
    ("nvfp4-ue5m3", {}),
    ("nvfp4-ue5m3", {"scale": "ue5m3-ieee", "has_global": True}),
    ("mxfp4", {}),
    ("mxfp4", {"mx_rule": "ceil"}),
]


def _codes(w, fmt, h, norm, floor):
    """(exhaustive codes, window-path codes, certified, window-only codes) per block."""
    cfg = S.resolve_selector(fmt, "exhaustive", underflow_floor=floor, global_norm=norm)
    g = torch.ones(())
    if fmt.has_global:
        g = S.global_encode_scale(w.abs().amax(), cfg.global_norm)
    x = w.view(w.shape[0], -1, fmt.block_size)
    hb = None if h is None else h.view(-1, fmt.block_size)
    ref = S.select_codes(x, fmt, cfg, g, hb)
    got, ok = S.exhaustive_by_window(x, fmt, cfg, g, hb)
    window = S.exact_window(fmt, h is not None)
    win = S.select_codes(x, fmt, S.SelectorConfig("search", window, floor), g, hb)
    return ref, got, ok, win


# Every format once, every block size once.
CASES = [(f, o, BLOCK_SIZES[(5 * i) % 6]) for i, (f, o) in enumerate(FORMATS)]


@pytest.mark.parametrize("name,over,b", CASES)
def test_window_path_equals_exhaustive(name, over, b):
    fmt = get_format(name, b, **over)
    kinds = adversarial(4, b, seed=b, spread=4 if fmt.has_global else 12)
    # Kinds of similar magnitude share a tensor (and a global scale): the reference's offset
    # range, and so its time, grows with the spread of c0 within one call.
    groups = [[0, 1, 3, 5], [2], [4], [6, 7]]
    kinds = [torch.cat([kinds[i] for i in grp]) for grp in groups]
    h = torch.rand(2 * b, generator=torch.Generator().manual_seed(b))
    h[0] = 0.0  # importance zero at a block max: the lower bound is useless there
    variants = ((None, None, True), (h, None, False), (None, 6.0, True))
    for w, (imp, norm, floor) in itertools.product(kinds, variants):
        ref, got, ok, _ = _codes(w, fmt, imp, norm if fmt.has_global else None, floor)
        assert torch.equal(got, ref)


def test_certificate_is_needed_and_usually_holds():
    """The adversarial set has blocks whose optimum lies outside the window (the certificate
    must reject those: importance zero at the block max leaves the cluster below free), and on
    Gaussian weights the certificate accepts nearly every block."""
    fmt = get_format("nvfp4", 16, has_global=False)
    h = torch.ones(32)
    h[0] = h[16] = 0.0
    ref, got, ok, win = _codes(torch.cat(adversarial(10, 16, seed=3)), fmt, h, None, True)
    assert bool((win != ref).any())
    assert not bool(ok[win != ref].any())
    gauss = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    for name, b in (("nvfp4", 16), ("nvfp4-ue5m3", 16), ("mxfp4", 32)):
        _, _, ok, _ = _codes(gauss, get_format(name, b), None, None, True)
        assert float(ok.float().mean()) > 0.97
