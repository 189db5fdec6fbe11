"""experts_quantize and silu_mul_experts_quantize (CPU backend) against the reference, bit for
bit: grouped rows, per-expert swizzled scales, empty and one-row experts, silu edge values."""

import pytest
import torch
from expectations import random_activations, random_expert_counts

from mxmoe import ops, reference

CASES = [
    # (name, counts, k)
    ("one expert one row", [1], 64),
    ("empty experts", [0, 5, 0, 0, 130, 0], 96),
    ("one-row experts", [1, 1, 200, 1], 2880),
    ("128 boundary", [128, 129, 127], 32),
]


def check_experts(x, counts, silu_mul, scale_rows=None):
    eo, bo = ops.expert_offsets_from_counts(counts)
    op = ops.silu_mul_experts_quantize if silu_mul else ops.experts_quantize
    ref_op = reference.silu_mul_experts_quantize if silu_mul else reference.experts_quantize
    packed, scales = op(x, eo, bo, scale_rows)
    want_packed, want_scales = ref_op(x, eo, bo, scale_rows)
    used = int(eo[-1])
    assert packed.shape == want_packed.shape and scales.shape == want_scales.shape, f"{counts=}"
    assert torch.equal(scales, want_scales), f"{counts=} {silu_mul=}: scales differ"
    assert torch.equal(packed[:used], want_packed[:used]), f"{counts=} {silu_mul=}: codes differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,counts,k", CASES)
def test_experts_quantize(dtype, name, counts, k):
    x = random_activations((sum(counts), k), seed=len(counts) + k, dtype=dtype, scale=2.0)
    check_experts(x, counts, silu_mul=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,counts,n", CASES)
def test_silu_mul_experts_quantize(dtype, name, counts, n):
    x = random_activations((sum(counts), 2 * n), seed=len(counts) * 3 + n, dtype=dtype, scale=4.0)
    check_experts(x, counts, silu_mul=True)


def test_many_experts_with_spare_rows_and_scale_rows():
    counts = random_expert_counts(256, 300, seed=1, zero_experts=(0, 255), one_row_experts=(7,))
    x = random_activations((sum(counts) + 5, 64), seed=2)  # 5 rows past the last expert
    eo, bo = ops.expert_offsets_from_counts(counts)
    scale_rows = int(bo[-1]) + 256  # extra scale rows stay zero
    packed, scales = ops.experts_quantize(x, eo, bo, scale_rows)
    want_packed, want_scales = reference.experts_quantize(x, eo, bo, scale_rows)
    assert scales.shape == (scale_rows, 4)
    assert torch.equal(scales, want_scales)
    assert torch.equal(packed[: int(eo[-1])], want_packed[: int(eo[-1])])


def test_silu_edge_values():
    # gate values where exp over/underflows, zeros of both signs, NaN and Inf in one expert each.
    n = 32
    gates = [-120.0, -104.0, -88.0, -20.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 20.0, 88.0, 89.0,
             1000.0, float("inf"), -float("inf")]
    x = torch.zeros(3, 2 * n)
    x[0, : len(gates)] = torch.tensor(gates)
    x[0, n : n + len(gates)] = torch.linspace(-3, 3, len(gates))
    x[1, 0] = float("nan")
    x[1, n + 1] = 1.0
    x[2, 3] = float("inf")
    x[2, n + 3] = 2.0
    x = x.to(torch.bfloat16)
    check_experts(x, [1, 1, 1], silu_mul=True)


def test_silu_mul_fp32_bits_on_a_dense_sweep():
    # 2 x 65536 gates: every finite bf16 gate value against random up values, one expert.
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    gate = bits.view(torch.bfloat16)
    gate = gate[torch.isfinite(gate)]
    gate = gate[: gate.numel() // 32 * 32].reshape(-1, 32)
    up = random_activations(gate.shape, seed=4, scale=3.0)
    x = torch.cat([gate, up], dim=1)
    check_experts(x, [x.shape[0]], silu_mul=True)
