"""Bad inputs for every entry point, at both Python layers.

mxmoe.ops checks in Python and explains (argument, expected shape, value); the nanobind module
checks every buffer through the DLPack helper (mxmoe/dlpack.h); the C API validates dims,
offsets and ids. Each bad input must raise an mxmoe.Error subclass whose message names the
argument and the offending value, and a failed call must leave its outputs untouched (checked
with poisoned outputs through the module, where the caller owns the outputs).
"""

import pytest
import torch
from expectations import assert_untouched, expect_error, poisoned, random_activations

import mxmoe
from mxmoe import _mxmoe, ops

BF16 = torch.bfloat16
LINEAR = _mxmoe.SCALE_LAYOUT_LINEAR
SWIZZLED = _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4


def meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.fixture(scope="module")
def gemm():
    counts = [3, 0, 2]
    x = random_activations((5, 64), seed=1)
    eo, bo = ops.expert_offsets_from_counts(counts)
    a, a_scales = ops.experts_quantize(x, eo, bo)
    w = random_activations((3, 32, 64), seed=2, scale=0.1)
    b, b_scales = ops.quantize_weights(w)
    return {"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales, "eo": eo, "bo": bo}


@pytest.fixture(scope="module")
def moe():
    e, h, i, t = 4, 64, 32, 6
    w13 = random_activations((e, 2 * i, h), seed=3, scale=0.1)
    w2 = random_activations((e, h, i), seed=4, scale=0.1)
    w13_packed, w13_scales = ops.quantize_weights(w13)
    w2_packed, w2_scales = ops.quantize_weights(w2)
    hidden = random_activations((t, h), seed=5)
    logits = random_activations((t, e), seed=6, dtype=torch.float32)
    return {"e": e, "h": h, "i": i, "t": t, "w": (w13_packed, w13_scales, w2_packed, w2_scales),
            "hidden": hidden, "logits": logits}


# ---- quantize / dequantize -----------------------------------------------------------------------


def test_quantize_bad_inputs():
    x = random_activations((4, 64), seed=0)
    expect_error(lambda: ops.quantize(x.float()), "x must have dtype bfloat16 or float16",
                 "got float32")
    expect_error(lambda: ops.quantize(random_activations((4, 48), seed=0)),
                 "x must have K % 32 == 0", "K=48", "[4, 48]")
    expect_error(lambda: ops.quantize(random_activations((2, 3, 64), seed=0), "swizzled"),
                 "x must be 2-D [rows, K]", "[2, 3, 64]")
    expect_error(lambda: ops.quantize(random_activations((4, 128), seed=0)[:, ::2]),
                 "x must be contiguous", "strides [128, 2]")
    expect_error(lambda: ops.quantize(x, "blocked"), "scale_layout", "'blocked'")
    expect_error(lambda: ops.quantize([1.0, 2.0]), "x must be a torch.Tensor", "list")
    expect_error(lambda: ops.quantize(meta_like(x)), "x is on meta",
                 error=mxmoe.UnsupportedError)


def test_dequantize_bad_inputs():
    packed, scales = ops.quantize(random_activations((4, 64), seed=0))
    expect_error(lambda: ops.dequantize(packed.view(torch.int8), scales),
                 "packed must have dtype uint8", "got int8")
    expect_error(lambda: ops.dequantize(packed, scales[:, :1].contiguous()),
                 "scales must have shape [4, 2]", "got [4, 1]")
    expect_error(lambda: ops.dequantize(packed[:, :8].contiguous(), scales),
                 "packed must have K % 32 == 0", "K=16")
    expect_error(lambda: ops.dequantize(packed, scales, "swizzled"),
                 "scales must have shape [128, 4]", "got [4, 2]")
    expect_error(lambda: ops.dequantize(packed, meta_like(scales)),
                 "scales is on meta but packed is on cpu")
    expect_error(lambda: ops.dequantize(packed, scales, dtype=torch.int32), "dtype must be",
                 "int32")


def test_quantize_module_checks_buffers_and_leaves_outputs_untouched():
    x = random_activations((4, 64), seed=0)
    packed, scales = poisoned((4, 32), torch.uint8), poisoned((4, 2), torch.uint8)
    expect_error(lambda: _mxmoe.quantize(x, poisoned((4, 31), torch.uint8), scales, LINEAR),
                 "packed must have shape [4, 32] [rows, k/2], got [4, 31]")
    expect_error(lambda: _mxmoe.quantize(x.reshape(2, 2, 64), packed, scales, LINEAR),
                 "input must be 2-D [rows, k], got shape [2, 2, 64]")
    expect_error(lambda: _mxmoe.quantize(x, packed, scales.view(torch.int8), LINEAR),
                 "scales must have dtype uint8, got int8")
    wide = random_activations((4, 128), seed=0)
    expect_error(lambda: _mxmoe.quantize(wide[:, :64], packed, scales, LINEAR),
                 "input must be contiguous (row-major), got shape [4, 64] strides [128, 1]")
    expect_error(lambda: _mxmoe.quantize(x, packed, scales, SWIZZLED),
                 "scales must have shape [128, 4]", "got [4, 2]")
    # k % 32 is the C API's to report: nothing is written.
    x48 = random_activations((4, 48), seed=0)
    expect_error(lambda: _mxmoe.quantize(x48, packed, scales, LINEAR), "k", "48")
    expect_error(lambda: _mxmoe.quantize(x, packed, scales, 7), "scale_layout", "7")
    assert_untouched(packed, "packed")
    assert_untouched(scales, "scales")


def test_dequantize_module_bad_dtype_and_untouched():
    packed, scales = ops.quantize(random_activations((4, 64), seed=0))
    out = poisoned((4, 64), BF16)
    expect_error(lambda: _mxmoe.dequantize(packed, scales, LINEAR, poisoned((4, 64), torch.int32)),
                 "output must have dtype", "got int32")
    expect_error(lambda: _mxmoe.dequantize(packed, scales, 9, out), "scale_layout", "9")
    assert_untouched(out, "output")


# ---- experts quantize --------------------------------------------------------------------------


@pytest.mark.parametrize("silu_mul", [False, True])
def test_experts_quantize_bad_inputs(silu_mul):
    op = ops.silu_mul_experts_quantize if silu_mul else ops.experts_quantize
    cols = 128 if silu_mul else 64
    x = random_activations((5, cols), seed=0)
    eo, bo = ops.expert_offsets_from_counts([3, 2])
    expect_error(lambda: op(x, eo.long(), bo), "expert_offsets must have dtype int32",
                 "got int64")
    expect_error(lambda: op(x, eo, bo[:2]), "blockscale_offsets must have shape [3]",
                 "got [2]")
    expect_error(lambda: op(x, eo, meta_like(bo)), "blockscale_offsets is on meta but x is on cpu")
    expect_error(lambda: op(x, torch.tensor([0, 4, 3], dtype=torch.int32), bo),
                 "expert_offsets must be non-decreasing", "expert_offsets[2]=3")
    expect_error(lambda: op(x, torch.tensor([0, 3, 9], dtype=torch.int32),
                            torch.tensor([0, 128, 256], dtype=torch.int32)),
                 "expert_offsets[2]=9", "5")
    expect_error(lambda: op(x, torch.tensor([1, 3, 5], dtype=torch.int32), bo),
                 "expert_offsets[0] must be 0, got 1")
    expect_error(lambda: op(x, eo, torch.tensor([0, 128, 200], dtype=torch.int32)),
                 "blockscale_offsets[2]=200")
    expect_error(lambda: op(x, eo, bo, scale_rows=128), "blockscale_offsets[2]=256",
                 "scale_rows=128")
    expect_error(lambda: op(x, eo, bo, scale_rows=-1), "scale_rows must be in [0, ", "got -1")
    bad_width = random_activations((5, 96 if silu_mul else 48), seed=0)
    expect_error(lambda: op(bad_width, eo, bo), "% 32 == 0", "=48")
    expect_error(lambda: op(x.t(), eo, bo), "x must be contiguous")


def test_silu_mul_odd_columns():
    eo, bo = ops.expert_offsets_from_counts([5])
    expect_error(lambda: ops.silu_mul_experts_quantize(random_activations((5, 66), seed=0)[:, :65]
                                                       .contiguous(), eo, bo),
                 "x must have an even number of columns", "[5, 65]")


@pytest.mark.parametrize("silu_mul", [False, True])
def test_experts_quantize_module_leaves_outputs_untouched(silu_mul):
    op = _mxmoe.silu_mul_experts_quantize if silu_mul else _mxmoe.experts_quantize
    x = random_activations((5, 128 if silu_mul else 64), seed=0)
    packed, scales = poisoned((5, 32), torch.uint8), poisoned((256, 4), torch.uint8)
    bo = torch.tensor([0, 128, 256], dtype=torch.int32)
    for eo, fragment in [([0, 4, 3], "non-decreasing"), ([0, 3, 6], "expert_offsets[2]=6"),
                         ([0, -1, 5], "expert_offsets[1]=-1")]:
        offsets = torch.tensor(eo, dtype=torch.int32)
        expect_error(lambda offsets=offsets: op(x, offsets, bo, packed, scales), fragment)
    expect_error(lambda: op(x, torch.tensor([0, 3, 5], dtype=torch.int32), bo[:2], packed,
                            scales),
                 "blockscale_offsets must have shape [3]", "got [2]")
    expect_error(lambda: op(x, torch.tensor([0, 3, 5], dtype=torch.int32), bo, packed,
                            poisoned((256, 3), torch.uint8)),
                 "scales must have shape [*, 4]", "got [256, 3]")
    assert_untouched(packed, "packed")
    assert_untouched(scales, "scales")


# ---- scales and weights -------------------------------------------------------------------------


def test_swizzle_bad_inputs():
    s = torch.zeros(5, 3, dtype=torch.uint8)
    expect_error(lambda: ops.swizzle_scales(s.reshape(-1)), "s must be 2-D [rows, cols] or 3-D",
                 "[15]")
    expect_error(lambda: ops.swizzle_scales(s.int()), "s must have dtype uint8", "int32")
    expect_error(lambda: ops.swizzle_scales(torch.zeros(4, 8, dtype=torch.uint8)[:, ::2]),
                 "s must be contiguous")
    expect_error(lambda: ops.unswizzle_scales(torch.zeros(128, 8, dtype=torch.uint8), 5, 3),
                 "s must have shape [128, 4]", "got [128, 8]")
    expect_error(lambda: ops.unswizzle_scales(torch.zeros(128, 4, dtype=torch.uint8), -5, 3),
                 "rows=-5")
    out = poisoned((1, 128, 4), torch.uint8)
    expect_error(lambda: _mxmoe.swizzle_scales(s.reshape(1, 5, 3), poisoned((1, 128, 3),
                                                                              torch.uint8)),
                 "output must have shape [1, 128, 4]", "got [1, 128, 3]")
    expect_error(lambda: _mxmoe.unswizzle_scales(out, poisoned((1, 5, 5), torch.uint8)),
                 "input must have shape [1, 128, 8]")
    assert_untouched(out, "input")


def test_quantize_weights_bad_inputs():
    w = random_activations((2, 32, 64), seed=0)
    expect_error(lambda: ops.quantize_weights(w[0]), "w must be 3-D [E, N, K]", "[32, 64]")
    expect_error(lambda: ops.quantize_weights(random_activations((2, 32, 40), seed=0)),
                 "w must have K % 32 == 0", "K=40")
    expect_error(lambda: ops.quantize_weights(w.float()), "w must have dtype", "float32")
    expect_error(lambda: ops.quantize_weights(w.transpose(1, 2)), "w must be contiguous")
    packed, scales = poisoned((2, 32, 32), torch.uint8), poisoned((2, 32, 2), torch.uint8)
    expect_error(lambda: _mxmoe.quantize_weights(w, packed, poisoned((2, 32, 3), torch.uint8),
                                                 LINEAR),
                 "scales must have shape [2, 32, 2]", "got [2, 32, 3]")
    expect_error(lambda: _mxmoe.quantize_weights(w, packed, scales, 5), "scale_layout", "5")
    assert_untouched(packed, "packed")
    assert_untouched(scales, "scales")


def test_prepare_weights_bad_inputs(gemm):
    expect_error(lambda: ops.prepare_weights(gemm["b"], None), "scales must not be None")
    expect_error(lambda: ops.prepare_weights(gemm["b"], gemm["b_scales"], backend="tpu"),
                 "backend must be one of", "'tpu'")
    expect_error(lambda: ops.prepare_weights(gemm["b"], gemm["b_scales"][:, :16].contiguous()),
                 "scales must have shape [3, 32, 2]", "got [3, 16, 2]")
    expect_error(lambda: ops.prepare_weights(gemm["b"], gemm["b_scales"], backend="sm90"),
                 "sm90", error=mxmoe.Error)
    prepared = poisoned((16,), torch.uint8)
    expect_error(lambda: _mxmoe.prepare_weights(gemm["b"], gemm["b_scales"], 3, 32, 64,
                                                _mxmoe.BACKEND_CPU, prepared),
                 "prepared_bytes must be at least")
    assert_untouched(prepared, "prepared")


# ---- grouped GEMM --------------------------------------------------------------------------------


def test_grouped_gemm_bad_inputs(gemm):
    a, a_scales, b, b_scales, eo, bo = (gemm[k] for k in ("a", "a_scales", "b", "b_scales", "eo",
                                                          "bo"))

    def call(**kw):
        args = {"a": a, "a_scales": a_scales, "b_packed": b, "b_scales": b_scales,
                "expert_offsets": eo, "blockscale_offsets": bo}
        args.update(kw)
        return lambda: ops.grouped_gemm(**args)

    expect_error(call(a=a[:, :16].contiguous()), "a must have shape [*, 32]",
                 "K = 64 from b_packed", "got [5, 16]")
    expect_error(call(a=a.view(torch.int8)), "a must have dtype uint8", "int8")
    expect_error(call(a_scales=a_scales[:, :2].contiguous()), "a_scales must have shape [*, 4]",
                 f"got [{a_scales.shape[0]}, 2]")
    expect_error(call(expert_offsets=eo[:3]), "expert_offsets must have shape [4]",
                 "E = 3 experts", "got [3]")
    expect_error(call(expert_offsets=torch.tensor([0, 3, 2, 5], dtype=torch.int32)),
                 "non-decreasing", "expert_offsets[2]=2")
    expect_error(call(expert_offsets=torch.tensor([0, 3, 3, 7], dtype=torch.int32),
                      blockscale_offsets=torch.tensor([0, 128, 128, 256], dtype=torch.int32)),
                 "expert_offsets[3]=7", "5")
    expect_error(call(blockscale_offsets=torch.tensor([0, 128, 128, 384], dtype=torch.int32)),
                 "blockscale_offsets[3]=384")
    expect_error(call(a_scales=a_scales[:128].contiguous()), "blockscale_offsets[3]=256",
                 "a_scale_rows=128")
    expect_error(call(problem_sizes=torch.tensor([[3, 32, 64], [0, 32, 64], [2, 32, 63]],
                                                 dtype=torch.int32)),
                 "problem_sizes[2]", "63")
    expect_error(call(problem_sizes=torch.zeros(3, 2, dtype=torch.int32)),
                 "problem_sizes must have shape [3, 3]", "got [3, 2]")
    expect_error(call(out_dtype=torch.float32), "out_dtype must be", "float32")
    expect_error(call(b_format="blocked"), "b_format", "'blocked'")
    expect_error(call(b_scales=None), "b_scales must not be None")
    expect_error(call(b_packed=meta_like(b), b_scales=meta_like(b_scales)),
                 "b_packed is on meta but a is on cpu")
    expect_error(call(expert_offsets=meta_like(eo)), "expert_offsets is on meta but a is on cpu")
    expect_error(call(a=a.t()), "a must be contiguous")


def test_grouped_gemm_module_leaves_output_untouched(gemm):
    a, a_scales, b, b_scales, bo = (gemm[k] for k in ("a", "a_scales", "b", "b_scales", "bo"))
    c = poisoned((5, 32), BF16)
    fmt = _mxmoe.WEIGHT_FORMAT_LINEAR
    for eo, fragment in [([0, 3, 2, 5], "non-decreasing"), ([0, 3, 3, 6], "expert_offsets[3]=6")]:
        offsets = torch.tensor(eo, dtype=torch.int32)
        expect_error(lambda offsets=offsets: _mxmoe.grouped_gemm(
            a, a_scales, b, b_scales, fmt, 0, 3, 32, 64, offsets, bo, None, c, None), fragment)
    eo = gemm["eo"]
    expect_error(lambda: _mxmoe.grouped_gemm(a, a_scales, b, b_scales, fmt, 0, 3, 32, 64, eo, bo,
                                             None, poisoned((5, 31), BF16), None),
                 "c must have shape [5, 32]", "got [5, 31]")
    expect_error(lambda: _mxmoe.grouped_gemm(a, a_scales, b, None, fmt, 0, 3, 32, 64, eo, bo,
                                             None, c, None), "b_scales must not be None")
    expect_error(lambda: _mxmoe.grouped_gemm(a, a_scales, b, b_scales, fmt, 0, 3, 32, 64, eo, bo,
                                             None, poisoned((5, 32), torch.float32), None),
                 "c must have dtype bfloat16 or float16, got float32")
    assert_untouched(c, "c")


# ---- MoE forward ---------------------------------------------------------------------------------


def test_moe_forward_bad_inputs(moe):
    w, hidden, logits = moe["w"], moe["hidden"], moe["logits"]
    ids = torch.zeros(moe["t"], 2, dtype=torch.int32)
    weights = torch.full((moe["t"], 2), 0.5)

    def call(*args, **kw):
        return lambda: ops.moe_forward(*args, **kw)

    expect_error(call(hidden.float(), *w, router_logits=logits, top_k=2),
                 "hidden must have dtype bfloat16 or float16, got float32")
    expect_error(call(random_activations((6, 48), seed=0), *w, router_logits=logits, top_k=2),
                 "hidden must have H % 32 == 0", "H=48")
    expect_error(call(random_activations((6, 96), seed=0), *w, router_logits=logits, top_k=2),
                 "w13_packed must have K = H = 96", "K=64")
    expect_error(call(hidden.t().contiguous().t(), *w, router_logits=logits, top_k=2),
                 "hidden must be contiguous")
    expect_error(call(hidden, *w, router_logits=logits[:, :3].contiguous(), top_k=2),
                 "router_logits must have shape [6, 4]", "got [6, 3]")
    expect_error(call(hidden, *w, router_logits=logits, top_k=0), "top_k must be in [1, 4]",
                 "got 0")
    expect_error(call(hidden, *w, router_logits=logits, top_k=5), "top_k must be in [1, 4]",
                 "got 5")
    expect_error(call(hidden, *w, router_logits=logits), "top_k must be given")
    expect_error(call(hidden, *w, router_logits=logits, top_k=2, topk_ids=ids,
                      topk_weights=weights), "either router_logits or topk_ids")
    expect_error(call(hidden, *w), "pass router_logits")
    expect_error(call(hidden, *w, topk_ids=ids.short(), topk_weights=weights),
                 "topk_ids must have dtype int32 or int64, got int16")
    expect_error(call(hidden, *w, topk_ids=ids, topk_weights=weights[:, :1].contiguous()),
                 "topk_weights must have shape [6, 2]", "got [6, 1]")
    bad_ids = ids.clone()
    bad_ids[3, 1] = 9
    expect_error(call(hidden, *w, topk_ids=bad_ids, topk_weights=weights),
                 "topk_ids[7] (token 3, slot 1)", "got 9")
    # Non-finite topk_weights are accepted (one policy with router logits, mxmoe.h):
    # tests/cc/hostile_input_test.cc checks that they reach only their own token.
    bad_map = torch.tensor([0, 1, 2, 4], dtype=torch.int32)
    expect_error(call(hidden, *w, router_logits=logits, top_k=2, expert_map=bad_map),
                 "expert_map[3]", "got 4")
    expect_error(call(hidden, *w, router_logits=logits, top_k=2,
                      expert_map=torch.zeros(5, dtype=torch.int32)),
                 "router_logits must have shape [6, 5]")
    expect_error(call(hidden, *w, router_logits=random_activations((6, 8), seed=0,
                                                                   dtype=torch.float32),
                      top_k=2), "router_logits must have shape [6, 4]")
    w13_packed, w13_scales, w2_packed, w2_scales = w
    expect_error(call(hidden, w13_packed, w13_scales, w2_packed[:, :, :8].contiguous(),
                      w2_scales[:, :, :0].contiguous(), router_logits=logits, top_k=2),
                 "w2_packed must have K % 32 == 0", "K=16")
    expect_error(call(hidden, w13_packed, w13_scales, w2_packed[:2].contiguous(),
                      w2_scales[:2].contiguous(), router_logits=logits, top_k=2),
                 "w2_packed must be [E, H, I/2] with E = 4", "E=2")
    expect_error(call(hidden, *w, router_logits=meta_like(logits), top_k=2),
                 "router_logits is on meta but hidden is on cpu")
    expect_error(call(hidden, w13_packed, w13_scales, meta_like(w2_packed), meta_like(w2_scales),
                      router_logits=logits, top_k=2), "w2_packed is on meta but hidden is on cpu")
    prepared = ops.prepare_weights(w13_packed, w13_scales)
    expect_error(call(hidden, prepared, None, w2_packed, w2_scales, router_logits=logits,
                      top_k=2), "both be PreparedWeights or both tensors")
    expect_error(call(hidden, w13_packed, None, w2_packed, w2_scales, router_logits=logits,
                      top_k=2), "w13_scales must not be None")


def moe_module_args(moe, output, router_logits=None, topk_ids=None, topk_weights=None,
                    expert_map=None, top_k=2, global_experts=None):
    w13_packed, w13_scales, w2_packed, w2_scales = moe["w"]
    return (moe["hidden"], w13_packed, w13_scales, w2_packed, w2_scales,
            _mxmoe.WEIGHT_FORMAT_LINEAR, 0, moe["e"], moe["i"], global_experts or moe["e"],
            top_k, True, router_logits, topk_ids, topk_weights, expert_map, output,
            _mxmoe.MoeOptions())


def test_moe_forward_module_null_routing_and_workspace(moe):
    out = poisoned((moe["t"], moe["h"]), BF16)
    args = moe_module_args(moe, out, router_logits=moe["logits"])
    needed = _mxmoe.moe_forward_workspace_size(*args)
    assert needed > 0
    expect_error(lambda: _mxmoe.moe_forward(*args, torch.empty(needed - 1, dtype=torch.uint8)),
                 "workspace_bytes must be at least", str(needed),
                 error=mxmoe.WorkspaceTooSmallError)
    expect_error(lambda: _mxmoe.moe_forward(*args, None), "workspace", str(needed),
                 error=mxmoe.WorkspaceTooSmallError)
    null_routing = moe_module_args(moe, out)
    expect_error(lambda: _mxmoe.moe_forward(*null_routing, torch.empty(needed, dtype=torch.uint8)),
                 "router_logits is NULL", "both are NULL")
    ids = torch.zeros(moe["t"], 2, dtype=torch.int32)
    ids[0, 0] = -3
    bad_ids = moe_module_args(moe, out, topk_ids=ids, topk_weights=torch.ones(moe["t"], 2))
    expect_error(lambda: _mxmoe.moe_forward(*bad_ids, torch.empty(needed * 2, dtype=torch.uint8)),
                 "topk_ids[0]", "got -3")
    expect_error(lambda: _mxmoe.moe_forward(*moe_module_args(
        moe, poisoned((moe["t"], moe["h"]), torch.float16), router_logits=moe["logits"]),
        torch.empty(needed, dtype=torch.uint8)), "output must have dtype bfloat16, got float16")
    assert_untouched(out, "output")


# ---- module basics -------------------------------------------------------------------------------


def test_module_basics():
    assert _mxmoe.version().count(".") == 2
    assert mxmoe.version() == _mxmoe.version()
    assert _mxmoe.backend_for_device(_mxmoe.DEVICE_CPU, 0) == "cpu"
    if _mxmoe.cuda_device_count() == 0:
        expect_error(lambda: _mxmoe.backend_for_device(_mxmoe.DEVICE_CUDA, 0), "cuda",
                     error=mxmoe.UnsupportedError)
    expect_error(lambda: _mxmoe.backend_for_device(7, 0), "7", error=mxmoe.Error)
    err = expect_error(lambda: ops.quantize(random_activations((1, 40), seed=0)), "K=40")
    assert isinstance(pytest.raises, object)
    with pytest.raises(ValueError):  # InvalidArgumentError is also a ValueError
        ops.quantize(random_activations((1, 40), seed=0))
    assert err.startswith("INVALID_ARGUMENT: ")
    try:
        _mxmoe.quantize(random_activations((1, 40), seed=0), poisoned((1, 20), torch.uint8),
                        poisoned((1, 1), torch.uint8), LINEAR)
    except mxmoe.InvalidArgumentError as exc:
        assert exc.status == "INVALID_ARGUMENT" and "40" in exc.message
    else:
        raise AssertionError("k=40 accepted")
    expect_error(lambda: mxmoe.backend_for(torch.empty(1, device="meta")), "meta",
                 error=mxmoe.UnsupportedError)
