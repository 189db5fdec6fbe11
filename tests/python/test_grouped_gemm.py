"""Grouped GEMM (CPU backend) against the float64 matmul of the dequantized operands.

Gate: relative L2 error <= 2e-3 for bf16 output (docs/format.md). The CPU backend computes
essentially the exact product, so almost every element also equals the reference rounded once.
Shapes: K = 2880, N = 2880, an empty expert, a one-row expert, E = 1, E = 256.
"""

import pytest
import torch
from expectations import random_activations, random_expert_counts, rel_l2

from mxmoe import ops, reference


def make_problem(counts, n, k, seed, dtype=torch.bfloat16, b_layout="linear"):
    e = len(counts)
    x = random_activations((sum(counts), k), seed=seed, dtype=dtype)
    eo, bo = ops.expert_offsets_from_counts(counts)
    a, a_scales = ops.experts_quantize(x, eo, bo)
    w = random_activations((e, n, k), seed=seed + 1, dtype=dtype, scale=k**-0.5)
    b, b_scales = ops.quantize_weights(w, b_layout)
    return a, a_scales, b, b_scales, eo, bo


def check(counts, n, k, seed, out_dtype=torch.bfloat16, b_format="linear", problem_sizes=False):
    a, a_scales, b, b_scales, eo, bo = make_problem(counts, n, k, seed, b_layout=b_format)
    ps = None
    if problem_sizes:
        ps = torch.tensor([[m, n, k] for m in counts], dtype=torch.int32).reshape(len(counts), 3)
    c = ops.grouped_gemm(a, a_scales, b, b_scales, eo, bo, ps, out_dtype=out_dtype,
                         b_format=b_format)
    exact = reference.grouped_gemm(a, a_scales, b, b_scales, eo, bo, torch.float64, b_format)
    assert c.shape == (sum(counts), n) and c.dtype == out_dtype
    if sum(counts) == 0:
        return
    err = rel_l2(c, exact)
    assert err <= 2e-3, f"{len(counts)=} {n=} {k=} {b_format=}: rel L2 {err:.3e}"
    same = (c == exact.to(out_dtype)).double().mean().item()
    assert same >= 0.99, f"{n=} {k=}: only {same:.4f} of elements equal the rounded reference"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gpt_oss_dims_with_empty_and_one_row_experts(out_dtype):
    # K = N = 2880 (22.5 x 128): expert 1 empty, expert 2 one row.
    check([37, 0, 1, 5], n=2880, k=2880, seed=1, out_dtype=out_dtype)


@pytest.mark.parametrize("b_format", ["linear", "swizzled"])
def test_weight_formats(b_format):
    check([3, 130, 0, 9], n=96, k=160, seed=2, b_format=b_format)


def test_single_expert():
    check([200], n=64, k=2880, seed=3)


def test_single_token():
    check([1], n=2880, k=64, seed=4)


def test_256_experts():
    counts = random_expert_counts(256, 400, seed=5, zero_experts=(3, 200), one_row_experts=(4,))
    check(counts, n=64, k=96, seed=5)


def test_problem_sizes_given():
    check([5, 0, 7], n=32, k=64, seed=6, problem_sizes=True)


def test_all_experts_empty():
    check([0, 0], n=32, k=32, seed=7)


def test_prepared_weights_on_cpu():
    a, a_scales, b, b_scales, eo, bo = make_problem([4, 0, 9], n=64, k=96, seed=8)
    prepared = ops.prepare_weights(b, b_scales)
    assert prepared.backend == "cpu" and prepared.n == 64 and prepared.k == 96
    c = ops.grouped_gemm(a, a_scales, prepared, None, eo, bo)
    assert torch.equal(c, ops.grouped_gemm(a, a_scales, b, b_scales, eo, bo))


def test_rows_past_last_expert_are_left_alone():
    a, a_scales, b, b_scales, eo, bo = make_problem([3, 2], n=32, k=64, seed=9)
    a_extra = torch.cat([a, torch.zeros(4, a.shape[1], dtype=torch.uint8)])
    c = ops.grouped_gemm(a_extra, a_scales, b, b_scales, eo, bo)
    assert c.shape == (9, 32)
    assert torch.equal(c[:5], ops.grouped_gemm(a, a_scales, b, b_scales, eo, bo))
