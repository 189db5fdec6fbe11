"""Every CUDA entry point makes args.device current: with device 0 current, operations on tensors
of cuda:1 run on cuda:1 (the stream passed is cuda:1's), give the same bytes as on the CPU
backend, and leave device 0 current afterwards. Needs 2 GPUs; skips otherwise.
"""

import pytest
import torch
from conftest import rel_l2

from mxmoe import ops

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs (run through tools/gpu/run.sh)")


@pytest.fixture(autouse=True)
def device_zero_current():
    torch.cuda.set_device(0)
    yield
    assert torch.cuda.current_device() == 0, "an mxmoe call left another device current"


def test_quantize_on_second_gpu():
    x = torch.randn(300, 2880, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want_packed, want_scales = ops.quantize(x, "swizzled")
    packed, scales = ops.quantize(x.to("cuda:1"), "swizzled")
    torch.cuda.synchronize(1)
    assert packed.device == torch.device("cuda:1")
    assert torch.equal(packed.cpu(), want_packed) and torch.equal(scales.cpu(), want_scales)
    back = ops.dequantize(packed, scales, "swizzled", dtype=torch.float32)
    assert torch.equal(back.cpu(), ops.dequantize(want_packed, want_scales, "swizzled",
                                                  dtype=torch.float32))


def test_experts_quantize_on_second_gpu():
    g = torch.Generator().manual_seed(2)
    counts = [3, 0, 130, 1]
    x = torch.randn(sum(counts), 2 * 256, generator=g).to(torch.bfloat16)
    eo, bso = ops.expert_offsets_from_counts(counts)
    want = ops.silu_mul_experts_quantize(x, eo, bso, scale_rows=int(bso[-1]))
    got = ops.silu_mul_experts_quantize(x.to("cuda:1"), eo.to("cuda:1"), bso.to("cuda:1"),
                                        scale_rows=int(bso[-1]))
    torch.cuda.synchronize(1)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("b_format", ["linear", "prepared"])
def test_grouped_gemm_on_second_gpu(b_format):
    g = torch.Generator().manual_seed(3)
    counts, n, k = [5, 0, 64], 256, 2880
    x = torch.randn(sum(counts), k, generator=g).to(torch.bfloat16)
    w = (torch.randn(len(counts), n, k, generator=g) / k**0.5).to(torch.bfloat16)
    eo, bso = ops.expert_offsets_from_counts(counts)
    a, a_scales = ops.experts_quantize(x, eo, bso)
    b, b_scales = ops.quantize_weights(w)
    want = ops.grouped_gemm(a, a_scales, b, b_scales, eo, bso)
    dev = torch.device("cuda:1")
    if b_format == "prepared":
        b1, s1 = ops.prepare_weights(b.to(dev), b_scales.to(dev)), None
    else:
        b1, s1 = b.to(dev), b_scales.to(dev)
    got = ops.grouped_gemm(a.to(dev), a_scales.to(dev), b1, s1, eo.to(dev), bso.to(dev))
    torch.cuda.synchronize(1)
    assert got.device == dev
    err = rel_l2(got, want)
    assert err <= 5e-3, f"{b_format=} {counts=} {n=} {k=}: rel_l2 {err:.2e}"


def test_moe_forward_on_second_gpu():
    g = torch.Generator().manual_seed(4)
    t, h, inter, e, top_k = 9, 256, 128, 4, 2
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    logits = torch.randn(t, e, generator=g)
    w13, w13_s = ops.quantize_weights((torch.randn(e, 2 * inter, h, generator=g) / h**0.5)
                                      .to(torch.bfloat16))
    w2, w2_s = ops.quantize_weights((torch.randn(e, h, inter, generator=g) / inter**0.5)
                                    .to(torch.bfloat16))
    want = ops.moe_forward(hidden, w13, w13_s, w2, w2_s, router_logits=logits, top_k=top_k)
    dev = torch.device("cuda:1")
    got = ops.moe_forward(hidden.to(dev), w13.to(dev), w13_s.to(dev), w2.to(dev), w2_s.to(dev),
                          router_logits=logits.to(dev), top_k=top_k)
    torch.cuda.synchronize(1)
    assert got.device == dev
    err = rel_l2(got, want)
    assert err <= 5e-3, f"{t=} {h=} {inter=} {e=} {top_k=}: rel_l2 {err:.2e}"


def test_one_process_drives_both_gpus_in_turn():
    # One MoELayer per GPU (the GPT-OSS block: SwiGLU-OAI, biases, top-k-then-softmax), called
    # alternately, each with the *other* GPU current: same bits on both GPUs on every call,
    # within the contract's tolerance of the CPU backend, and the caller's device kept.
    import mxmoe

    g = torch.Generator().manual_seed(5)
    t, h, inter, e, top_k = 33, 2880, 256, 8, 4
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, inter, generator=g) / inter**0.5).to(torch.bfloat16)
    options = {"activation": "swiglu_oai", "routing": "topk_softmax",
               "w13_bias": (torch.randn(e, 2 * inter, generator=g) * 0.02).to(torch.bfloat16),
               "w2_bias": (torch.randn(e, h, generator=g) * 0.01).to(torch.bfloat16)}
    cpu = mxmoe.MoELayer.from_float(w13, w2, top_k=top_k, **options)
    layers = {d: cpu.to(f"cuda:{d}") for d in (0, 1)}
    hidden = torch.randn(t, h, generator=g).to(torch.bfloat16)
    logits = torch.randn(t, e, generator=g)
    want = cpu(hidden, logits)
    outputs = {0: [], 1: []}
    for step in range(4):
        d = step % 2
        torch.cuda.set_device(1 - d)
        out = layers[d](hidden.to(f"cuda:{d}"), logits.to(f"cuda:{d}"))
        assert torch.cuda.current_device() == 1 - d, f"step {step}: current device changed"
        assert out.device == torch.device(f"cuda:{d}")
        torch.cuda.synchronize(d)
        outputs[d].append(out.cpu())
    torch.cuda.set_device(0)
    first = outputs[0][0]
    for d in (0, 1):
        for i, out in enumerate(outputs[d]):
            assert torch.equal(out.view(torch.int16), first.view(torch.int16)), (
                f"cuda:{d} call {i} differs from cuda:0's first call")
    err = rel_l2(first, want)
    assert err <= 5e-3, f"GPU vs CPU backend rel_l2 {err:.2e}"
