"""The torch custom ops on CUDA (written here, run on the GPU host): torch.library.opcheck for
every op with CUDA tensors, torch.compile(fullgraph=True) of MoELayer.forward against eager,
and CUDA-graph capture of the layer (eager and through the compiled graph) replaying the eager
result. Skips without a CUDA device."""

import os

import pytest
import torch
from conftest import rel_l2

import mxmoe
from mxmoe import _mxmoe, library, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")

E, H, I, T, TOP_K = 4, 256, 128, 7, 2


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(1)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16)
    return mxmoe.MoELayer.from_float(w13, w2).to("cuda")


def test_opcheck_every_op_on_cuda(layer):
    d = "cuda"
    x = torch.randn(3, 96, device=d).to(torch.bfloat16)
    packed, scales = ops.quantize(x)
    counts = [2, 0, 3]
    eo, bo = ops.expert_offsets_from_counts(torch.tensor(counts, device=d))
    xs = torch.randn(5, 256, device=d).to(torch.bfloat16)
    a, a_s = ops.experts_quantize(xs, eo, bo)
    lin, swz = _mxmoe.SCALE_LAYOUT_LINEAR, _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4
    fmt, auto = _mxmoe.WEIGHT_FORMAT_LINEAR, _mxmoe.BACKEND_AUTO
    w13p, w13s = layer.w13_packed[:3].contiguous(), layer.w13_scales[:3].contiguous()
    hidden = torch.randn(T, H, device=d).to(torch.bfloat16)
    logits = torch.randn(T, E, device=d)
    backend = ops._BACKENDS[layer.backend]
    samples = [
        ("quantize", (x, lin)), ("quantize", (x, swz)),
        ("dequantize", (packed, scales, lin, torch.float32)),
        ("experts_quantize", (xs, eo, bo, ops.default_scale_rows(5, 3))),
        ("silu_mul_experts_quantize", (xs, eo, bo, ops.default_scale_rows(5, 3))),
        ("swizzle_scales", (torch.randint(0, 255, (2, 5, 3), dtype=torch.uint8, device=d),)),
        ("unswizzle_scales", (torch.randint(0, 255, (2, 128, 4), dtype=torch.uint8, device=d),
                              5, 3)),
        ("quantize_weights", (torch.randn(2, 40, 64, device=d).to(torch.bfloat16), lin)),
        ("prepare_weights", (w13p, w13s, backend)),
        ("grouped_gemm", (a, a_s, w13p, w13s, fmt, auto, 3, 2 * I, H, eo, bo, None,
                          torch.bfloat16)),
        ("moe_forward", (hidden, layer.w13_packed, layer.w13_scales, layer.w2_packed,
                         layer.w2_scales, fmt, auto, E, I, E, TOP_K, True, logits, None, None,
                         None)),
    ]
    assert {name for name, _ in samples} == set(library.OP_NAMES)
    for name, args in samples:
        utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
        if name != "prepare_weights":  # an unbacked buffer size (see mxmoe.library)
            utils.append("test_aot_dispatch_dynamic")
        torch.library.opcheck(getattr(torch.ops.mxmoe, name).default, args, test_utils=utils)


@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "0",
                    reason="graph capture needs torch's caching allocator (off under sanitizers)")
def test_compile_and_cuda_graph_capture(layer):
    hidden = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    logits = torch.randn(T, E, device="cuda")
    want = layer(hidden, logits, TOP_K)
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(hidden, logits, TOP_K)
    assert torch.equal(got, want)
    for fn in (lambda: layer(hidden, logits, TOP_K), lambda: compiled(hidden, logits, TOP_K)):
        fn()  # warm-up: workspaces and prepared weights allocated outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_l2(out, layer(hidden, logits, TOP_K)) == 0.0
