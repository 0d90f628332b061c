"""W4A4: activation global scales 2688/amax (shared by fused sets), their two on-disk forms,
and NVFP4 activation fake-quant."""

import pytest
import torch
from torch import nn

from mxptq import dequantize, quantize_tensor
from mxptq.calibration import (
    LinearStats,
    activation_scales,
    attach_activation_fake_quant,
    fake_quantize_activation,
)
from mxptq.scales import global_encode_scale


def stats_with_amax(amax: float) -> LinearStats:
    s = LinearStats(16)
    s.add(torch.full((1, 16), -amax))
    return s


def test_scales_are_2688_over_amax_and_fused_sets_share_the_max():
    stats = {
        "l.q_proj": stats_with_amax(3.0), "l.k_proj": stats_with_amax(5.0),
        "l.v_proj": stats_with_amax(4.0), "l.o_proj": stats_with_amax(7.0),
    }
    sc = activation_scales(stats, [["l.q_proj", "l.k_proj", "l.v_proj"]])
    assert {sc[n].amax for n in ("l.q_proj", "l.k_proj", "l.v_proj")} == {5.0}
    assert sc["l.o_proj"].amax == 7.0
    ct = sc["l.q_proj"].compressed_tensors()["input_global_scale"]
    assert ct.dtype == torch.float32 and ct.shape == (1,)
    assert float(ct) == pytest.approx(2688 / 5.0, rel=1e-7)
    mo = sc["l.o_proj"].modelopt()["input_scale"]
    assert mo.dtype == torch.float32 and mo.shape == ()
    assert float(mo) == pytest.approx(7.0 / 2688, rel=1e-7)
    assert float(sc["l.o_proj"].global_scale) * float(mo) == pytest.approx(1.0, rel=1e-6)


def test_fake_quant_is_exact_on_representable_values():
    """Values built as E2M1 · s/g with each block's max at 6·s/g come back unchanged."""
    g = torch.Generator().manual_seed(0)
    amax = 10.0
    gs = global_encode_scale(torch.tensor(amax), 448.0)  # fp32, as dequantize divides by it
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    codes = grid[torch.randint(0, 8, (32, 4, 16), generator=g)]
    codes *= torch.where(torch.rand(codes.shape, generator=g) < 0.5, -1.0, 1.0)
    codes[..., 3] = 6.0
    s = torch.tensor([8.0, 56.0, 224.0, 448.0])[torch.randint(0, 4, (32, 4, 1), generator=g)]
    x = (codes * (s / gs)).reshape(32, 64)
    torch.testing.assert_close(fake_quantize_activation(x, amax), x, rtol=0, atol=0)


def test_fake_quant_matches_weight_quantizer_and_is_nearly_idempotent():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 48, generator=g) * 3
    y = fake_quantize_activation(x, amax=12.0)
    ref = dequantize(quantize_tensor(x.reshape(-1, 48), "nvfp4", "absmax", global_amax=12.0))
    torch.testing.assert_close(y, ref.view(2, 5, 48), rtol=0, atol=0)
    y2 = fake_quantize_activation(y, amax=12.0)
    assert float((y2 - y).abs().max()) <= 0.25 * float((y - x).abs().max())
    assert float((y2 != y).float().mean()) < 0.1


def test_fake_quant_pads_widths_the_block_does_not_divide():
    x = torch.randn(3, 8)
    y = fake_quantize_activation(x)
    padded = fake_quantize_activation(torch.nn.functional.pad(x, (0, 8)))
    torch.testing.assert_close(y, padded[:, :8], rtol=0, atol=0)


def test_hooks_fake_quantize_linear_inputs_and_are_removable():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 8))
    x = torch.randn(4, 32)
    ref = lin(x)
    stats = {"0": LinearStats(32)}
    stats["0"].add(x)
    handles = attach_activation_fake_quant(lin, activation_scales(stats))
    out = lin(x)
    torch.testing.assert_close(out, nn.functional.linear(
        fake_quantize_activation(x, stats["0"].amax), lin[0].weight, lin[0].bias))
    assert not torch.equal(out, ref)
    for h in handles:
        h.remove()
    torch.testing.assert_close(lin(x), ref)
