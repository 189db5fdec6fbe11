"""CPU backend quantize / dequantize / quantize_weights against the pure-torch reference, bit for
bit (codes and scales), on random, exhaustive and adversarial inputs (hypothesis for the rule)."""

import numpy as np
import pytest
import torch
from expectations import random_activations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxmoe import ops, reference

DTYPES = [torch.bfloat16, torch.float16]


def assert_same_quantization(x, scale_layout="linear"):
    packed, scales = ops.quantize(x, scale_layout)
    want_packed, want_scales = reference.quantize(x, scale_layout)
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
    for _ in range(3):
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
_ROW_BYTES = 64 * 2  # one row of 64 16-bit values


def _structured_block(values) -> torch.Tensor:
    """(grid point or midpoint, power of two, bf16-ulp nudge, sign) tuples -> bf16 [rows, 32]."""
    base = torch.tensor([v[0] for v in values], dtype=torch.float64)
    exponent = torch.tensor([v[1] for v in values], dtype=torch.float64)
    x = torch.ldexp(base, exponent).to(torch.float32).to(torch.bfloat16)
    bits = x.view(torch.int16).to(torch.int32)
    nudge = torch.tensor([v[2] for v in values], dtype=torch.int32) * (bits != 0)
    x = (bits + nudge).to(torch.int16).view(torch.bfloat16)
    negative = torch.tensor([v[3] for v in values])
    return torch.where(negative, -x, x).reshape(-1, 32)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 6).flatmap(lambda rows: st.binary(min_size=rows * _ROW_BYTES,
                                                        max_size=rows * _ROW_BYTES)),
       st.sampled_from(DTYPES))
def test_hypothesis_arbitrary_bits(raw, dtype):
    # Any 16-bit patterns: NaN, Inf, subnormals and huge values all appear.
    bits = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy())
    assert_same_quantization(bits.view(dtype).reshape(-1, 64), "linear")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4).flatmap(lambda rows: st.lists(
    st.tuples(st.sampled_from(_MIDPOINTS), st.integers(-140, 125), st.sampled_from([-1, 0, 1]),
              st.booleans()),
    min_size=32 * rows, max_size=32 * rows)))
def test_hypothesis_ties_thresholds_and_ranges(values):
    # Grid points and midpoints (ties), one bf16 ulp either side (thresholds), over the whole
    # exponent range (subnormal inputs to scales near 254).
    x = _structured_block(values)
    assert_same_quantization(x, "linear")
    assert_same_quantization(x, "swizzled")


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
    want = reference.dequantize(packed, scales, dtype)
    s = scales if scale_layout == "linear" else reference.swizzle_scales(scales)
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
    assert torch.equal(out, reference.dequantize(packed, scales, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_layout", ["linear", "swizzled"])
@pytest.mark.parametrize("e,n,k", [(1, 32, 32), (3, 130, 96), (2, 64, 2880)])
def test_quantize_weights_matches_reference(dtype, scale_layout, e, n, k):
    w = random_activations((e, n, k), seed=e * n + k, dtype=dtype, scale=0.02)
    packed, scales = ops.quantize_weights(w, scale_layout)
    want_packed, want_scales = reference.quantize_weights(w, scale_layout)
    assert torch.equal(scales, want_scales), f"{e=} {n=} {k=} {scale_layout=}"
    assert torch.equal(packed, want_packed), f"{e=} {n=} {k=} {scale_layout=}"


def test_numpy_input_through_dlpack():
    x = random_activations((4, 64), seed=9, dtype=torch.float16)
    packed, scales = ops.quantize(x.numpy())
    want_packed, want_scales = reference.quantize(x)
    assert torch.equal(packed, want_packed) and torch.equal(scales, want_scales)
    out = ops.dequantize(packed.numpy(), scales.numpy(), dtype=torch.float32)
    assert torch.equal(out, reference.dequantize(want_packed, want_scales, torch.float32))


def test_views_with_storage_offset():
    # A contiguous slice starts inside its storage: DLPack's data + byte_offset must be honoured.
    x = random_activations((6, 64), seed=12)
    packed, scales = ops.quantize(x[2:5])
    want_packed, want_scales = reference.quantize(x[2:5])
    assert torch.equal(packed, want_packed) and torch.equal(scales, want_scales)
