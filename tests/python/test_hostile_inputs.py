"""Hostile inputs through mxmoe.ops: each case once crashed, hung, allocated gigabytes, or was
silently accepted (docs/hostile-input.md lists them with the status each gets now).

Every case must fail fast with an InvalidArgumentError naming the argument and its value (or,
for a zero-byte operation, succeed without work), allocate nothing large before failing, and
leave caller-owned outputs untouched.
"""

import os
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from expectations import assert_untouched, expect_error, poisoned, random_activations

import mxmoe
from mxmoe import _mxmoe, ops


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def weights():
    w = random_activations((3, 64, 64), seed=11, scale=0.1)
    return ops.quantize_weights(w)


# ---- prepared weights: the buffer's length is part of the contract -----------------------------


def test_prepared_buffer_shorter_than_its_size_is_rejected(weights):
    a, a_scales = ops.experts_quantize(random_activations((4, 64), seed=1),
                                       *ops.expert_offsets_from_counts([2, 0, 2]))
    eo, bo = ops.expert_offsets_from_counts([2, 0, 2])
    prepared = ops.prepare_weights(*weights, backend="cpu")
    want = ops.grouped_gemm(a, a_scales, prepared, None, eo, bo)
    assert torch.equal(want, ops.grouped_gemm(a, a_scales, *weights, eo, bo))
    # Once a segfault: 64 experts of 4096 x 4096 declared over a 1-byte buffer.
    tiny = ops.PreparedWeights(torch.zeros(1, dtype=torch.uint8), num_experts=64, n=4096,
                               k=4096, backend="cpu")
    a_big = torch.zeros(1, 2048, dtype=torch.uint8)
    scales_big = torch.zeros(128, 128, dtype=torch.uint8)
    eo64, bo64 = ops.expert_offsets_from_counts([1] + [0] * 63)
    expect_error(lambda: ops.grouped_gemm(a_big, scales_big, tiny, None, eo64, bo64),
                 "b.prepared_bytes", "got 1")
    # One byte short of what prepare_weights wrote.
    short = ops.PreparedWeights(prepared.buffer[:-1], 3, 64, 64, "cpu")
    expect_error(lambda: ops.grouped_gemm(a, a_scales, short, None, eo, bo),
                 "b.prepared_bytes", f"got {prepared.buffer.numel() - 1}")


def test_prepared_weights_fields_are_checked():
    buffer = torch.zeros(16, dtype=torch.uint8)
    expect_error(lambda: ops.PreparedWeights(buffer, 1, 32, 32, backend="tpu"),
                 "PreparedWeights.backend", "'tpu'")
    expect_error(lambda: ops.PreparedWeights(buffer, 1.5, 32, 32, backend="cpu"),
                 "PreparedWeights.num_experts", "1.5")
    expect_error(lambda: ops.PreparedWeights(buffer.view(torch.int8), 1, 32, 32, "cpu"),
                 "PreparedWeights.buffer", "uint8")
    expect_error(lambda: ops.PreparedWeights([0] * 16, 1, 32, 32, "cpu"),
                 "PreparedWeights.buffer", "list")


def test_moe_prepared_weights_short_buffer(weights):
    e, h, i = 2, 64, 32
    w13 = ops.quantize_weights(random_activations((e, 2 * i, h), seed=3, scale=0.1))
    w2 = ops.quantize_weights(random_activations((e, h, i), seed=4, scale=0.1))
    p13, p2 = ops.prepare_weights(*w13), ops.prepare_weights(*w2)
    hidden = random_activations((3, h), seed=5)
    logits = random_activations((3, e), seed=6, dtype=torch.float32)
    want = ops.moe_forward(hidden, *w13, *w2, router_logits=logits, top_k=1)
    assert torch.equal(ops.moe_forward(hidden, p13, None, p2, None, router_logits=logits,
                                       top_k=1), want)
    short = ops.PreparedWeights(p2.buffer[: p2.buffer.numel() // 2], e, h, i, "cpu")
    expect_error(lambda: ops.moe_forward(hidden, p13, None, short, None, router_logits=logits,
                                         top_k=1), "w2.prepared_bytes")


# ---- zero-byte operations with huge dimensions ---------------------------------------------------


def test_zero_byte_swizzles_with_huge_rows_return_at_once():
    # Once a hang: cols = 0 and rows = 2^62 made the CPU loop 2^62 times with the GIL released.
    # Run in a child so that a regression fails on its timeout instead of hanging the suite.
    code = textwrap.dedent("""
        import torch
        from mxmoe import ops
        s = torch.empty((2**62, 0), dtype=torch.uint8)
        assert ops.swizzle_scales(s).shape == (2**62, 0)
        assert ops.unswizzle_scales(s, 2**62, 0).shape == (2**62, 0)
        x = torch.empty((2**61, 0), dtype=torch.bfloat16)
        packed, scales = ops.quantize(x)
        assert packed.shape == (2**61, 0) and scales.shape == (2**61, 0)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_zero_byte_buffers_whose_extents_overflow_are_rejected_everywhere():
    # [0, 2^40, 2^40]: zero bytes, but its extents multiply past int64 (once signed overflow in
    # the DLPack contiguity check). One rule everywhere: extents (a zero counted as one) times
    # the element size must fit int64.
    # torch.empty refuses these extents (so ops cannot allocate such an output), but a view with
    # these strides is "contiguous" to torch and reaches the module.
    s = torch.empty(0, dtype=torch.uint8).as_strided((0, 2**40, 2**40), (1, 2**40, 1))
    expect_error(lambda: _mxmoe.swizzle_scales(s, s), "size of input", "overflows int64")
    expect_error(lambda: _mxmoe.unswizzle_scales(s, s), "overflows int64")
    x = torch.empty((2**62, 0), dtype=torch.bfloat16)  # 2^62 x 2 bytes
    expect_error(lambda: ops.quantize(x), "size of input", "overflows int64")


# ---- outputs are never allocated from unvalidated metadata ---------------------------------------


@pytest.mark.parametrize("silu_mul", [False, True])
def test_experts_quantize_checks_offsets_before_allocating(silu_mul):
    op = ops.silu_mul_experts_quantize if silu_mul else ops.experts_quantize
    x = random_activations((5, 128 if silu_mul else 64), seed=2)
    eo, bo = ops.expert_offsets_from_counts([3, 0, 2])
    packed, scales = op(x, eo, bo)
    # The default is the data-independent bound round_down(5 + 127 * min(5, 3), 128), never the
    # metadata: 2 experts own rows here, blockscale_offsets[E] = 256 rows are written, the rest
    # stay zero.
    assert scales.shape[0] == ops.default_scale_rows(5, 3) == 384
    assert not scales[256:].any()
    before = max_rss_mib()
    # Once a 256 GiB allocation attempt: blockscale_offsets[-1] sized the output unchecked. Now
    # nothing is sized from it, and the C API rejects it.
    bad = bo.clone()
    bad[-1] = 2**31 - 1
    expect_error(lambda: op(x, eo, bad), "blockscale_offsets")
    bad[-1] = -128
    expect_error(lambda: op(x, eo, bad), "blockscale_offsets")
    # An explicit scale_rows is bounded the same way (once a real 8-17 GiB allocation).
    expect_error(lambda: op(x, eo, bo, scale_rows=2**26), "scale_rows must be in [0, 384]",
                 str(2**26))
    expect_error(lambda: op(x, eo, bo, scale_rows=-1), "scale_rows", "-1")
    expect_error(lambda: op(x, eo, bo, scale_rows=256.5), "scale_rows must be an integer",
                 "256.5")
    assert max_rss_mib() - before < 64, "a rejected call allocated its outputs"
    packed2, scales2 = op(x, eo, bo, scale_rows=torch.tensor(256))
    assert torch.equal(packed2[:5], packed[:5]) and torch.equal(scales2, scales[:256])


def test_scale_rows_bound_is_what_a_valid_layout_can_need():
    # 1 row in 64 experts: at most one expert is non-empty, so 128 scale rows, not 64 * 127.
    x = random_activations((1, 32), seed=3)
    eo, bo = ops.expert_offsets_from_counts([0] * 40 + [1] + [0] * 23)
    _, scales = ops.experts_quantize(x, eo, bo, scale_rows=128)
    assert scales.shape == (128, 4)
    expect_error(lambda: ops.experts_quantize(x, eo, bo, scale_rows=129), "[0, 128]")


# ---- small gaps ----------------------------------------------------------------------------------


def test_expert_offsets_from_counts_rejects_negative_and_int32_overflow():
    expect_error(lambda: ops.expert_offsets_from_counts([3, -1, 2]), "counts[1] = -1")
    expect_error(lambda: ops.expert_offsets_from_counts(torch.tensor([-5])), "counts[0] = -5")
    # Once silently 0: the int32 cast wrapped 2**32.
    expect_error(lambda: ops.expert_offsets_from_counts([2**32]), "beyond the int32 offsets")
    expect_error(lambda: ops.expert_offsets_from_counts([2**31 - 100]), "padded scale rows")
    eo, bo = ops.expert_offsets_from_counts([2**31 - 256, 1])  # the largest that fits
    assert int(eo[-1]) == 2**31 - 255 and int(bo[-1]) == 2**31 - 128


def test_top_k_must_be_an_integer():
    e, h, i = 4, 32, 32
    w13 = ops.quantize_weights(random_activations((e, 2 * i, h), seed=3, scale=0.1))
    w2 = ops.quantize_weights(random_activations((e, h, i), seed=4, scale=0.1))
    hidden = random_activations((2, h), seed=5)
    logits = random_activations((2, e), seed=6, dtype=torch.float32)
    # Once ran as top_k=2.
    expect_error(lambda: ops.moe_forward(hidden, *w13, *w2, router_logits=logits, top_k=2.7),
                 "top_k must be an integer", "2.7")
    expect_error(lambda: ops.moe_forward(hidden, *w13, *w2, router_logits=logits, top_k=True),
                 "top_k must be an integer")
    out = ops.moe_forward(hidden, *w13, *w2, router_logits=logits, top_k=np.int64(2))
    assert torch.equal(out, ops.moe_forward(hidden, *w13, *w2, router_logits=logits, top_k=2))


def test_module_level_overflowing_dims_raise_instead_of_overflowing(weights):
    # The nanobind module computes 2 * intermediate_size and E + 1: a huge value must raise, not
    # overflow (UBSan: signed overflow).
    hidden = random_activations((2, 64), seed=1)
    out = poisoned((2, 64), torch.bfloat16)
    packed, scales = weights
    with pytest.raises(mxmoe.InvalidArgumentError, match="intermediate_size"):
        _mxmoe.moe_forward(hidden, packed, scales, packed, scales, _mxmoe.WEIGHT_FORMAT_LINEAR,
                           0, 3, 2**62, 3, 1, True, None, None, None, None, out,
                           _mxmoe.MoeOptions(), None)
    assert_untouched(out, "output")
    c = poisoned((4, 64), torch.bfloat16)
    with pytest.raises(mxmoe.InvalidArgumentError):
        _mxmoe.grouped_gemm(torch.zeros(4, 32, dtype=torch.uint8),
                            torch.zeros(128, 4, dtype=torch.uint8), packed, scales,
                            _mxmoe.WEIGHT_FORMAT_LINEAR, 0, 2**31 - 1, 64, 64,
                            torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
                            None, c, None)
    assert_untouched(c, "c")
