"""mxmoe's torch custom ops on the CPU: torch.library.opcheck for every op, torch.compile with
fullgraph=True over every mxmoe.ops function and MoELayer.forward / forward_topk (no graph
breaks, same bits as eager), torch.export, torch.jit.trace, and the inference-only rule for
inputs that require grad.

Cost: the compile checks use the "aot_eager" backend (dynamo + the fake implementations + AOT
tracing, no code generation) on tiny shapes; one MoELayer.forward check runs inductor. About
25 s on the 2-core CI machine, most of it inductor's first compile.
"""

import pytest
import torch
from expectations import expect_error, random_activations

import mxmoe
from mxmoe import library, ops

E, H, I, T, TOP_K = 4, 64, 32, 5, 2


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(11)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * 0.5).to(torch.bfloat16)
    return mxmoe.MoELayer.from_float(w13, w2)


def grouped_inputs(counts, k, silu=False, seed=0):
    cols = 2 * k if silu else k
    x = random_activations((sum(counts), cols), seed=seed, scale=2.0)
    eo, bo = ops.expert_offsets_from_counts(counts)
    return x, eo, bo


def op_samples(layer):
    """(op name, args) of one valid call per custom op, awkward shapes where cheap."""
    x = random_activations((3, 96), seed=1)
    packed, scales = ops.quantize(x)
    xs, eo, bo = grouped_inputs([2, 0, 3], 64)
    xs2, _, _ = grouped_inputs([2, 0, 3], 64, silu=True, seed=2)
    a, a_s = ops.experts_quantize(xs, eo, bo)
    logits = torch.randn(T, E)
    ids = torch.topk(logits, TOP_K).indices.int()
    hidden = random_activations((T, H), seed=3)
    w = (layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales)
    lin = mxmoe._mxmoe.SCALE_LAYOUT_LINEAR
    swz = mxmoe._mxmoe.SCALE_LAYOUT_SWIZZLED_128X4
    fmt = mxmoe._mxmoe.WEIGHT_FORMAT_LINEAR
    auto = mxmoe._mxmoe.BACKEND_AUTO
    cpu = mxmoe._mxmoe.BACKEND_CPU
    ws = random_activations((3, 40, 64), seed=4)
    return [
        ("quantize", (x, lin)),
        ("quantize", (x, swz)),
        ("dequantize", (packed, scales, lin, torch.float32)),
        ("experts_quantize", (xs, eo, bo, ops.default_scale_rows(5, 3))),
        ("silu_mul_experts_quantize", (xs2, eo, bo, 384)),
        ("swizzle_scales", (torch.randint(0, 255, (2, 5, 3), dtype=torch.uint8),)),
        ("unswizzle_scales", (torch.randint(0, 255, (2, 128, 4), dtype=torch.uint8), 5, 3)),
        ("quantize_weights", (ws, lin)),
        ("quantize_weights", (ws, swz)),
        ("prepare_weights", (layer.w13_packed, layer.w13_scales, cpu)),
        ("grouped_gemm", (a, a_s, layer.w13_packed[:3].contiguous(),
                          layer.w13_scales[:3].contiguous(), fmt, auto, 3, 2 * I, H, eo, bo,
                          None, torch.bfloat16)),
        ("moe_forward", (hidden, *w[:2], *w[2:], fmt, auto, E, I, E, TOP_K, True, logits, None,
                         None, None)),
        ("moe_forward", (hidden, *w[:2], *w[2:], fmt, auto, E, I, E, TOP_K, False, None, ids,
                         torch.rand(T, TOP_K), None)),
    ]


def test_every_op_is_registered_and_checked(layer):
    samples = op_samples(layer)
    assert {name for name, _ in samples} == set(library.OP_NAMES)
    for name, args in samples:
        op = getattr(torch.ops.mxmoe, name).default
        # prepare_weights' buffer size is data-independent but backend-defined: its fake
        # returns an unbacked size, which the AOT dynamic-shape check cannot compare.
        utils = (("test_schema", "test_autograd_registration", "test_faketensor")
                 if name == "prepare_weights" else
                 ("test_schema", "test_autograd_registration", "test_faketensor",
                  "test_aot_dispatch_dynamic"))
        torch.library.opcheck(op, args, test_utils=utils)


def _same(a, b):
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, ops.PreparedWeights):
        return torch.equal(a.buffer, b.buffer)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_every_ops_function_compiles_without_graph_breaks(layer):
    x = random_activations((3, 96), seed=5)
    xs, eo, bo = grouped_inputs([2, 0, 3], 64, seed=6)
    xs2, _, _ = grouped_inputs([2, 0, 3], 64, silu=True, seed=7)
    a, a_s = ops.experts_quantize(xs, eo, bo)
    p, s = ops.quantize(x)
    w13, w13s = layer.w13_packed[:3].contiguous(), layer.w13_scales[:3].contiguous()
    logits = torch.randn(T, E)
    hidden = random_activations((T, H), seed=8)
    weights = (layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales)
    calls = [
        (lambda x: ops.quantize(x), (x,)),
        (lambda x: ops.quantize(x, "swizzled"), (x,)),
        (lambda p, s: ops.dequantize(p, s, dtype=torch.float16), (p, s)),
        (ops.experts_quantize, (xs, eo, bo)),
        (ops.silu_mul_experts_quantize, (xs2, eo, bo)),
        (ops.swizzle_scales, (s,)),
        (lambda s: ops.unswizzle_scales(s, 3, 3), (ops.swizzle_scales(s),)),
        (ops.quantize_weights, (random_activations((2, 40, 64), seed=9),)),
        (ops.prepare_weights, (w13, w13s)),
        (ops.grouped_gemm, (a, a_s, w13, w13s, eo, bo)),
        (lambda h, r: ops.moe_forward(h, *weights, router_logits=r, top_k=TOP_K), (hidden,
                                                                                   logits)),
        (ops.expert_offsets_from_counts, (torch.tensor([3, 0, 129]),)),
    ]
    for fn, args in calls:
        torch._dynamo.reset()
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        assert _same(got, want), f"{fn} compiled differs from eager"


def test_layer_forward_and_forward_topk_compile(layer):
    hidden = random_activations((2, 3, H), seed=10)
    logits = torch.randn(2, 3, E)
    torch._dynamo.reset()
    want = layer(hidden, logits, TOP_K)
    got = torch.compile(layer, fullgraph=True)(hidden, logits, TOP_K)  # inductor
    assert torch.equal(got, want)
    # torch.topk's int64 ids and bf16 weights straight in (the conversions trace too).
    top = torch.topk(torch.softmax(logits, -1), TOP_K)
    weights = top.values.to(torch.bfloat16)
    want = layer.forward_topk(hidden, top.indices, weights)
    got = torch.compile(layer.forward_topk, fullgraph=True, backend="aot_eager")(
        hidden, top.indices, weights)
    assert torch.equal(got, want)
    assert torch.equal(want, layer.forward_topk(hidden, top.indices.int(), weights.float()))


def test_export_and_jit_trace(layer):
    hidden = random_activations((T, H), seed=12)
    logits = torch.randn(T, E)
    want = layer(hidden, logits, TOP_K)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = layer

        def forward(self, h, r):
            return self.moe(h, r, TOP_K) + h

    block = Block()
    exported = torch.export.export(block, (hidden, logits))
    assert "mxmoe.moe_forward" in str(exported.graph)
    assert torch.equal(exported.module()(hidden, logits), want + hidden)
    # Other values through the same exported program and trace: nothing about the
    # values was baked in (a traced torch.empty would have been).
    hidden2, logits2 = random_activations((T, H), seed=13), torch.randn(T, E)
    assert torch.equal(exported.module()(hidden2, logits2), block(hidden2, logits2))
    traced = torch.jit.trace(block, (hidden, logits))
    assert torch.equal(traced(hidden2, logits2), block(hidden2, logits2))


def test_inputs_that_require_grad_are_refused_unless_grad_is_off(layer):
    hidden = random_activations((T, H), seed=14).requires_grad_()
    logits = torch.randn(T, E)
    expect_error(lambda: layer(hidden, logits, TOP_K), "hidden requires grad",
                 "inference only", "torch.no_grad()")
    expect_error(lambda: ops.quantize(torch.randn(2, 32, requires_grad=True).bfloat16()),
                 "x requires grad")
    with torch.no_grad():
        want = layer(hidden, logits, TOP_K)
    with torch.inference_mode():
        assert torch.equal(layer(hidden, logits, TOP_K), want)
    assert torch.equal(layer(hidden.detach(), logits, TOP_K), want)
    expect_error(lambda: layer(hidden.detach(), logits.requires_grad_(), TOP_K),
                 "router_logits requires grad")
