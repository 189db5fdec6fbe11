"""Inputs mxmoe.ops accepts beyond contiguous torch tensors of the native dtypes: torch.topk's
int64 ids and bf16/fp16/fp32 weights, numpy arrays and other __dlpack__ objects, zero-size
tensors with any strides."""

import numpy as np
import pytest
import torch
from expectations import expect_error, random_activations

import mxmoe
from mxmoe import ops

E, H, I, T, TOP_K = 4, 64, 32, 6, 2


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(E, 2 * I, H, generator=g).to(torch.bfloat16)
    w2 = torch.randn(E, H, I, generator=g).to(torch.bfloat16)
    return mxmoe.MoELayer.from_float(w13, w2)


class DlpackOnly:
    """An array-like that only speaks DLPack (as CuPy and JAX arrays do)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, **kwargs):
        return self._t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_int64_ids_and_16_bit_weights(layer, weight_dtype):
    hidden = random_activations((T, H), seed=1)
    probs = torch.softmax(torch.randn(T, E), -1)
    top = torch.topk(probs, TOP_K)  # int64 indices
    weights = top.values.to(weight_dtype)
    got = layer.forward_topk(hidden, top.indices, weights)
    # The same call with the native dtypes: the weights widen exactly.
    want = layer.forward_topk(hidden, top.indices.to(torch.int32), weights.to(torch.float32))
    assert torch.equal(got, want), f"{weight_dtype=}"
    expect_error(lambda: layer.forward_topk(hidden, top.indices.to(torch.int16), weights),
                 "topk_ids must have dtype int32 or int64, got int16")
    expect_error(lambda: layer.forward_topk(hidden, top.indices, weights.double()),
                 "topk_weights must have dtype float32 or bfloat16 or float16, got float64")
    bad = top.indices.clone()
    bad[0, 0] = E  # out of range after the int32 conversion too: the C API's check
    expect_error(lambda: layer.forward_topk(hidden, bad, weights), "topk_ids")


def test_numpy_and_dlpack_objects_where_tensors_go():
    x = random_activations((3, 64), seed=2)
    want_p, want_s = ops.quantize(x)
    xh = x.to(torch.float16)  # numpy has no bfloat16
    want_hp, want_hs = ops.quantize(xh)
    for arg in (xh.numpy(), DlpackOnly(xh)):
        p, s = ops.quantize(arg)
        assert torch.equal(p, want_hp) and torch.equal(s, want_hs), type(arg).__name__
    p, s = ops.quantize(DlpackOnly(x))
    assert torch.equal(p, want_p) and torch.equal(s, want_s)
    # Offsets from numpy (int32) and a plain list of counts.
    eo, bo = ops.expert_offsets_from_counts([1, 0, 2])
    a1 = ops.experts_quantize(x, eo.numpy(), DlpackOnly(bo))
    a2 = ops.experts_quantize(x, eo, bo)
    assert all(torch.equal(u, v) for u, v in zip(a1, a2, strict=True))
    expect_error(lambda: ops.quantize([[1.0] * 32]), "x must be a torch.Tensor, numpy.ndarray "
                 "or an object with __dlpack__, got list")


@pytest.mark.parametrize("strides", [(0, 0), (1, 1), (0, 1)])
def test_zero_size_tensors_with_odd_strides(layer, strides):
    empty = torch.empty(0, dtype=torch.bfloat16).as_strided((0, 64), strides)
    p, s = ops.quantize(empty)
    assert p.shape == (0, 32) and s.shape == (0, 2)
    p, s = ops.quantize(np.lib.stride_tricks.as_strided(np.empty(0, np.float16), (0, 32),
                                                        (0, 0)))
    assert p.shape == (0, 16) and s.shape == (0, 1)
    logits = torch.empty(0, dtype=torch.float32).as_strided((0, E), strides)
    out = layer(empty, logits, TOP_K)
    assert out.shape == (0, H) and out.dtype == torch.bfloat16
    ids = torch.empty(0, dtype=torch.int64).as_strided((0, TOP_K), strides)
    weights = torch.empty(0, dtype=torch.float32).as_strided((0, TOP_K), strides)
    assert layer.forward_topk(empty, ids, weights).shape == (0, H)
    # [4, 0] shaped scales from numpy: rows pad to 128, zero columns stay zero.
    s0 = np.lib.stride_tricks.as_strided(np.empty(0, np.uint8), (4, 0), (0, 0))
    assert ops.swizzle_scales(s0).shape == (128, 0)
