"""The pure-torch reference against the data contract's own examples (docs/format.md).

These pin the reference to the text of the contract, so that the CPU-backend tests that compare
against it are meaningful.
"""

import math

import pytest
import torch

from mxmoe import reference


def codes_of(values, dtype=torch.float32):
    x = torch.zeros(1, 32, dtype=torch.float32)
    x[0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    codes, scales = reference.quantize_codes(x.to(dtype))
    return codes[0, : len(values)].tolist(), int(scales[0, 0])


def test_ties_to_even_on_the_grid():
    # amax 6 -> scale 129 (2^2 * 1.5 mantissa: no round-up), multiplier 2^-2... use amax 4 so
    # the multiplier is 1: amax 4 = 2^2 -> e = 129, s = 127, x * 2^0.
    values = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.0]
    codes, s = codes_of(values)
    assert s == 127
    grid = [reference.E2M1_GRID[c] for c in codes]
    assert grid == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 4.0]


def test_values_between_thresholds_and_signs():
    codes, s = codes_of([0.2, 0.3, 0.74, 0.76, -0.1, -0.0, 0.0, -6.0, 4.0])
    assert s == 127
    assert codes == [0, 1, 1, 2, 8, 8, 0, 15, 6]


def test_saturation_at_six():
    # amax 7 has mantissa 1.75 -> rounds up to 8 -> s = 128, multiplier 1/2: 7 -> 3.5 -> 4.
    codes, s = codes_of([7.0, 6.5, 1.0])
    assert s == 128
    assert [reference.E2M1_GRID[c & 7] for c in codes] == [4.0, 3.0, 0.5]


@pytest.mark.parametrize("amax,expected", [
    (1.0, 125),            # 2^0 -> e = 127 -> s = 125
    (1.7421875, 125),      # mantissa just below 1.75 (bf16 0x3FDF): no round-up
    (1.75, 126),           # mantissa 1.75 rounds up to 2
    (2.0**-126, 0),        # e = 1 -> s = 0
    (2.0**-130, 0),        # subnormal
    (0.0, 0),
    (2.0**127, 252),       # e = 254
    (3.4e38, 253),         # mantissa >= 1.75 rounds to 2^128: e = 255; the 254 clamp never bites
])
def test_scale_rule(amax, expected):
    _, s = codes_of([amax])
    assert s == expected


def test_all_zero_block_and_nan_inf():
    codes, s = codes_of([0.0] * 32)
    assert s == 0 and codes == [0] * 32
    codes, s = codes_of([1.0, float("nan"), 2.0])
    assert s == 0xFF and codes == [0, 0, 0]
    codes, s = codes_of([float("inf"), -float("inf"), 1e38, 1.0])
    assert s == 253
    assert codes[:2] == [7, 15]
    assert reference.E2M1_GRID[codes[2]] == 1.0  # 1e38 * 2^-126 = 1.18 -> 1
    assert codes[3] == 0


def test_dequantize_inverts_the_grid():
    packed, scales = reference.quantize(torch.tensor([[0.5, -1.0, 6.0, -4.0] + [0.0] * 28]))
    values = reference.dequantize(packed, scales)
    assert values[0, :4].tolist() == [0.5, -1.0, 6.0, -4.0]
    nan_scales = torch.full_like(scales, 0xFF)
    assert torch.isnan(reference.dequantize(packed, nan_scales)).all()


def test_packing_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert reference.pack_codes(codes).tolist() == [[0x21, 0x43]]
    assert reference.unpack_codes(reference.pack_codes(codes)).tolist() == codes.tolist()


@pytest.mark.parametrize("rows,cols", [(1, 1), (128, 4), (129, 5), (300, 90), (37, 8)])
def test_swizzle_formula_matches_the_blocked_permutation(rows, cols):
    # The 128x4 layout is [rows/128, cols/4, 32, 4, 4] with (m%32, m/32%4, k%4) innermost:
    # the same as vLLM's view(M/128, 4, 32, K/4, 4).permute(0, 3, 2, 1, 4).
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    s = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    pr, pc = reference._round_up(rows, 128), reference._round_up(cols, 4)
    padded = torch.zeros(pr, pc, dtype=torch.uint8)
    padded[:rows, :cols] = s
    blocked = padded.view(pr // 128, 4, 32, pc // 4, 4).permute(0, 3, 2, 1, 4).reshape(pr, pc)
    assert torch.equal(reference.swizzle_scales(s), blocked)
    assert torch.equal(reference.unswizzle_scales(blocked, rows, cols), s)


def test_fma_emulation_is_single_rounding():
    # 641 * 6700417 = 2^32 + 1, so a*b = 2^-24 + 2^-56 and a*b + 1 lies just above the float32
    # tie 1 + 2^-24. A float64 sum rounds to the tie itself and then (ties to even) to 1; the
    # correctly rounded fmaf gives 1 + 2^-23.
    a = torch.tensor([641 * 2.0**-10], dtype=torch.float32)
    b = torch.tensor([6700417 * 2.0**-46], dtype=torch.float32)
    c = torch.tensor([1.0], dtype=torch.float32)
    naive = (a.double() * b.double() + c.double()).float()
    assert naive.item() == 1.0
    assert reference.fma_f32(a, b, c).item() == 1.0 + 2.0**-23


def test_exp_and_silu_close_to_math():
    x = torch.linspace(-20, 20, 4001)
    e = reference.exp_f32(x).double()
    want = torch.exp(x.double())
    assert float(((e - want).abs() / want).max()) < 4e-7
    g = torch.tensor([-math.inf, math.inf, math.nan, -0.0, 0.0, 1.0, -100.0])
    s = reference.silu_f32(g)
    assert math.copysign(1.0, s[0].item()) == -1.0 and s[0].item() == 0.0
    assert s[1].item() == math.inf and math.isnan(s[2].item())
    assert s[5].item() == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-6)
    assert s[6].item() == pytest.approx(-100 * math.exp(-100), rel=1e-5)


def test_expert_offsets_from_counts():
    eo, bo = reference.expert_offsets_from_counts([3, 0, 129, 1])
    assert eo.tolist() == [0, 3, 3, 132, 133]
    assert bo.tolist() == [0, 128, 128, 384, 512]
