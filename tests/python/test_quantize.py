"""CPU backend quantize / dequantize / quantize_weights against the pure-torch reference, bit for
bit (codes and scales), on random, exhaustive and adversarial inputs (hypothesis for the rule)."""

import numpy as np
import pytest
import torch
from expectations import random_activations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxmoe import ops
from mxmoe import reference as R

DTYPES = [torch.bfloat16, torch.float16]


def assert_same_quantization(x, scale_layout="linear"):
    packed, scales = ops.quantize(x, scale_layout)
    want_packed, want_scales = R.quantize(x, scale_layout)
    shape = list(x.shape)
    assert packed.shape == want_packed.shape, f"{shape=}"
    assert scales.shape == want_scales.shape, f"{shape=}"
    bad_scales = (scales != want_scales).nonzero()
    assert bad_scales.numel() == 0, (
        f"{shape=} {scale_layout=}: scales differ at {bad_scales[:5].tolist()}: "
        f"got {scales[tuple(bad_scales[:5].T)].tolist()} "
        f"want {want_scales[tuple(bad_scales[:5].T)].tolist()}")
    bad = (packed != want_packed).nonzero()
    assert bad.numel() == 0, (
        f"{shape=} {scale_layout=}: codes differ at {bad[:5].tolist()}: "
        f"got {packed[tuple(bad[:5].T)].tolist()} want {want_packed[tuple(bad[:5].T)].tolist()}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k", [(1, 32), (7, 64), (128, 2880), (129, 96), (300, 160)])
@pytest.mark.parametrize("scale_layout", ["linear", "swizzled"])
def test_random_rows_match_reference(dtype, rows, k, scale_layout):
    x = random_activations((rows, k), seed=rows * 31 + k, dtype=dtype, scale=3.0)
    assert_same_quantization(x, scale_layout)


def test_zero_rows():
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    packed, scales = ops.quantize(x)
    assert packed.shape == (0, 32) and scales.shape == (0, 2)
    packed, scales = ops.quantize(x, "swizzled")
    assert packed.shape == (0, 32) and scales.shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_bit_pattern(dtype):
    # All 65536 bf16/fp16 patterns (NaN, Inf, subnormals, huge values included), shuffled into
    # blocks so each pattern meets different block maxima.
    g = torch.Generator().manual_seed(7)
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for trial in range(3):
        perm = torch.randperm(65536, generator=g)
        x = bits[perm].view(dtype).reshape(-1, 256)
        assert_same_quantization(x, "linear")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_finite_pattern_without_nan_neighbours(dtype):
    # Same, without non-finite values, so that every finite pattern is really quantized (a NaN
    # in a block zeroes the block's codes).
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x)]
    x = x[: x.numel() // 32 * 32].reshape(-1, 32)
    g = torch.Generator().manual_seed(3)
    assert_same_quantization(x[torch.randperm(x.shape[0], generator=g)], "linear")


def test_adversarial_blocks():
    # One row per case; each row is one 32-element block.
    rows = []

    def block(values):
        row = torch.zeros(32)
        row[: len(values)] = torch.tensor(values, dtype=torch.float32)
        rows.append(row)

    for e in (-133, -126, -100, -1, 0, 1, 30, 120, 126, 127):
        scale = 2.0**e
        # Ties and just-off-ties of every grid midpoint, amax 4 * scale (exact multiplier).
        block([v * scale for v in (4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0)])
        # amax mantissa just below 1.75 and at 1.75 (bf16 1.7421875 and 1.75).
        block([1.7421875 * scale, 0.5 * scale, -0.875 * scale])
        block([1.75 * scale, 0.5 * scale, -0.875 * scale])
    block([])                                   # all zero
    block([-0.0] * 32)                          # all negative zero
    block([float("inf"), 1.0, -3.0])            # Inf: scale 253, finite values -> +-0
    block([-float("inf"), 3.0e38])
    block([float("nan"), 1.0, 2.0])             # NaN: scale 0xFF, all codes 0
    block([3.3895e38, -3.3895e38])              # largest bf16
    x = torch.stack(rows).to(torch.bfloat16)
    assert_same_quantization(x, "linear")
    assert_same_quantization(x, "swizzled")


def test_nan_and_inf_rule_documented_in_mxmoe_h():
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    x[1, 41] = 1.0
    x[2, :] = 1.0
    packed, scales = ops.quantize(x)
    assert scales[0].tolist() == [0xFF, 0]        # NaN block: 0xFF, other block untouched
    assert packed[0, :16].eq(0).all()
    assert scales[1].tolist() == [0, 253]          # Inf block: 253
    assert packed[1, 20].item() == 0x07            # Inf -> +6 (code 7), 1.0 -> +0
    assert scales[2].tolist() == [125, 125]        # other rows unaffected


# ---- hypothesis: the rule on arbitrary and structured blocks -----------------------------------

_MIDPOINTS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0]


def _structured_value():
    # A grid point or midpoint (possibly nudged by one bf16 ulp) times a power of two.
    return st.tuples(st.sampled_from(_MIDPOINTS), st.integers(-140, 125), st.sampled_from(
        [-1, 0, 1]), st.booleans()).map(lambda t: (t[0], t[1], t[2], t[3]))


def _to_bf16_value(t):
    base, exponent, nudge, negative = t
    v = torch.tensor(base * 2.0**exponent, dtype=torch.float32).to(torch.bfloat16)
    if nudge and v.item() != 0:
        bits = v.view(torch.int16).item() + nudge
        v = torch.tensor([bits], dtype=torch.int16).view(torch.bfloat16)[0]
    return -v if negative else v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 0xFFFF), min_size=64, max_size=64 * 6).filter(
    lambda v: len(v) % 64 == 0), st.sampled_from(DTYPES))
def test_hypothesis_arbitrary_bits(bit_list, dtype):
    bits = torch.tensor(np.array(bit_list, dtype=np.uint16).view(np.int16))
    x = bits.view(dtype).reshape(-1, 64)
    assert_same_quantization(x, "linear")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_structured_value(), min_size=32, max_size=32 * 4).filter(
    lambda v: len(v) % 32 == 0))
def test_hypothesis_ties_thresholds_and_ranges(values):
    x = torch.stack([_to_bf16_value(v) for v in values]).reshape(-1, 32)
    assert_same_quantization(x, "linear")
    assert_same_quantization(x.reshape(1, -1) if x.shape[0] > 1 else x, "swizzled")


# ---- dequantize and weights --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale_layout", ["linear", "swizzled"])
def test_dequantize_matches_reference(dtype, scale_layout):
    g = torch.Generator().manual_seed(11)
    packed = torch.randint(0, 256, (130, 48), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (130, 3), generator=g, dtype=torch.uint8)
    scales[0, 0] = 0xFF
    scales[1, 0] = 254
    scales[2, 0] = 0
    want = R.dequantize(packed, scales, dtype)
    s = scales if scale_layout == "linear" else R.swizzle_scales(scales)
    out = ops.dequantize(packed, s, scale_layout, dtype=dtype)
    assert out.dtype == dtype and out.shape == (130, 96)
    same = (out == want) | (torch.isnan(out) & torch.isnan(want))
    assert bool(same.all()), f"{dtype=} {scale_layout=}: {(~same).sum().item()} differ"


def test_dequantize_roundtrip_leading_dims():
    x = random_activations((2, 3, 64), seed=5)
    packed, scales = ops.quantize(x)
    assert packed.shape == (2, 3, 32) and scales.shape == (2, 3, 2)
    out = ops.dequantize(packed, scales)
    assert out.shape == (2, 3, 64)
    assert torch.equal(out, R.dequantize(packed, scales, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_layout", ["linear", "swizzled"])
@pytest.mark.parametrize("e,n,k", [(1, 32, 32), (3, 130, 96), (2, 64, 2880)])
def test_quantize_weights_matches_reference(dtype, scale_layout, e, n, k):
    w = random_activations((e, n, k), seed=e * n + k, dtype=dtype, scale=0.02)
    packed, scales = ops.quantize_weights(w, scale_layout)
    want_packed, want_scales = R.quantize_weights(w, scale_layout)
    assert torch.equal(scales, want_scales), f"{e=} {n=} {k=} {scale_layout=}"
    assert torch.equal(packed, want_packed), f"{e=} {n=} {k=} {scale_layout=}"


def test_numpy_input_through_dlpack():
    x = random_activations((4, 64), seed=9, dtype=torch.float16)
    packed, scales = ops.quantize(x.numpy())
    want_packed, want_scales = R.quantize(x)
    assert torch.equal(packed, want_packed) and torch.equal(scales, want_scales)
    out = ops.dequantize(packed.numpy(), scales.numpy(), dtype=torch.float32)
    assert torch.equal(out, R.dequantize(want_packed, want_scales, torch.float32))
