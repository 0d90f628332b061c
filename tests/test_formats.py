"""Element grid, scale codecs and packing against their definitions and against torch."""

import math

import pytest
import torch

from mxptq.formats import (
    E2M1_MAGNITUDES,
    E4M3,
    E8M0,
    UE5M3,
    UE5M3_IEEE,
    e2m1_decode,
    e2m1_encode,
    e8m0_code,
    get_format,
    pack_e2m1,
    unpack_e2m1,
)


def test_e2m1_grid_from_bits():
    assert E2M1_MAGNITUDES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@pytest.mark.parametrize(
    "value,expected",
    [
        (0.0, 0.0), (0.25, 0.0), (0.2500001, 0.5), (0.7499999, 0.5), (0.75, 1.0), (1.25, 1.0),
        (1.2500001, 1.5), (1.75, 2.0), (2.5, 2.0), (2.5000002, 3.0), (3.5, 4.0), (5.0, 4.0),
        (5.0000005, 6.0), (6.0, 6.0), (7.0, 6.0), (100.0, 6.0), (0.9, 1.0), (0.2, 0.0),
    ],
)
def test_e2m1_rne_ties_and_saturation(value, expected):
    for sign in (1.0, -1.0):
        code = e2m1_encode(torch.tensor([sign * value]))
        got = float(e2m1_decode(code)[0])
        assert got == sign * expected
        assert int(code[0]) >> 3 == (1 if sign < 0 and value > 0 else 0)


def test_e2m1_signed_zero_codes():
    codes = e2m1_encode(torch.tensor([-0.1, -0.0, 0.0, 0.1]))
    assert codes.tolist() == [8, 0, 0, 0]


def test_e2m1_encode_is_nearest_value():
    v = torch.linspace(-7, 7, 200_001)
    got = e2m1_decode(e2m1_encode(v))
    grid = torch.tensor(E2M1_MAGNITUDES)
    dist = (v.abs().clamp(max=6).unsqueeze(-1) - grid).abs().min(-1).values
    assert torch.allclose((v.abs().clamp(max=6) - got.abs()).abs(), dist)


def test_pack_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0])
    assert torch.equal(packed[:, 0] >> 4, codes[:, 1])
    assert torch.equal(unpack_e2m1(packed), codes)
    with pytest.raises(ValueError, match="odd"):
        pack_e2m1(codes[:, :3])


def test_codec_limits_from_bits():
    assert E4M3.max_value == 448.0 and E4M3.min_positive == 2.0**-9
    assert E4M3.value_of(8) == 2.0**-6  # min normal
    assert UE5M3.max_value == 114688.0 and UE5M3.min_positive == 2.0**-17
    assert UE5M3.value_of(8) == 2.0**-14
    assert UE5M3_IEEE.max_value == 61440.0
    assert E8M0.value_of(0) == 2.0**-127 and E8M0.max_value == 2.0**127
    for codec in (E4M3, UE5M3, UE5M3_IEEE, E8M0):
        t = codec.table()
        assert bool((t[1:] > t[:-1]).all()), codec.name  # code order is value order


@pytest.mark.parametrize(
    "value,code",
    [
        (2.0**-10, 0),
        (2.0**-10 * (1 + 2.0**-20), 1),
        (1.5 * 2.0**-9, 2),
        (0.3, 42),
        (0.0166015625, 8),
        (440.0, 126),
        (448.0, 126),
        (1e6, 126),
        (0.0, 0),
    ],
)
def test_e4m3_vectors(value, code):
    assert int(E4M3.encode(torch.tensor([value]))[0]) == code


def _all_finite_half_precision_values(limit: float) -> torch.Tensor:
    bits = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16)
    out = []
    for dt in (torch.bfloat16, torch.float16):
        v = bits.view(dt).float()
        out.append(v[torch.isfinite(v) & (v <= limit)])
    return torch.cat(out)


def test_e4m3_encode_matches_torch_cast():
    """Every non-negative bf16 and fp16 value up to 448, every E4M3 midpoint and its fp32
    neighbours, and a million log-uniform fp32 values: our RNE equals torch's cast."""
    t = E4M3.table()
    mids = (t[1:] + t[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros(1)), torch.nextafter(mids, t[-1:])])
    g = torch.Generator().manual_seed(0)
    logu = torch.exp2(torch.empty(1_000_000).uniform_(-12, math.log2(448), generator=g))
    v = torch.cat([_all_finite_half_precision_values(448.0), t, near, logu]).clamp(max=448)
    ours = E4M3.encode(v).to(torch.uint8)
    theirs = v.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("codec", [UE5M3, UE5M3_IEEE])
def test_ue5m3_encode_is_rne_onto_table(codec):
    t = codec.table().double()
    mids = (t[1:] + t[:-1]) / 2
    # exact midpoints tie to the even code; values just off them go to the nearer code
    assert torch.equal(codec.encode(mids.float()) % 2, torch.zeros(len(mids), dtype=torch.int32))
    up = torch.nextafter(mids.float(), torch.tensor(float("inf")))
    assert torch.equal(codec.encode(up), torch.arange(1, len(t), dtype=torch.int32))
    assert int(codec.encode(torch.tensor([1e9]))[0]) == codec.max_code


def test_e8m0_rules():
    bmax = torch.tensor([6.0, 7.9, 8.0, 1.5, 1.6, 0.0, 3.0 * 2.0**-100])
    floor = e8m0_code(bmax, "floor") - 127
    ceil = e8m0_code(bmax, "ceil") - 127
    # floor: bmax/2^e in [4, 8); ceil: smallest e with 6·2^e >= bmax
    assert floor.tolist()[:5] == [0, 0, 1, -2, -2]
    assert ceil.tolist()[:5] == [0, 1, 1, -2, -1]
    assert int(floor[5]) == -127 and int(ceil[5]) == -127  # zero block -> code 0
    assert int(ceil[6]) == -101
    v = bmax[:5]
    assert bool((6 * torch.exp2(ceil[:5].float()) >= v).all())
    assert bool((6 * torch.exp2(ceil[:5].float() - 1) < v).all())


def test_get_format_overrides_and_errors():
    f = get_format("nvfp4", block_size=8, has_global=False)
    assert f.block_size == 8 and not f.has_global and f.scale is E4M3
    assert get_format("nvfp4", scale="ue5m3").scale is UE5M3
    with pytest.raises(ValueError, match="unknown format"):
        get_format("nvfp5")
    with pytest.raises(ValueError, match="block size"):
        get_format("nvfp4", block_size=12)
    with pytest.raises(ValueError, match="E8M0"):
        get_format("mxfp4", has_global=True)
