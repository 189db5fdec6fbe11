"""mxmoe.vllm on CUDA (written here, run on the GPU host): each drop-in gives the same bytes as on
the CPU (quantizers, swizzle) or agrees with the CPU within bf16 rounding (grouped GEMM, the whole
MoE), with vLLM's shapes and dtypes. Skips without a CUDA device."""

import pytest
import torch
from conftest import rel_l2

import mxmoe
from mxmoe import vllm as mv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")


def align(x, m=128):
    return (x + m - 1) // m * m


@pytest.fixture(autouse=True)
def small_scale_buffers(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "1024")


def test_experts_quant_bit_exact_vs_cpu():
    counts = [5, 0, 130, 1]
    x = (torch.randn(sum(counts), 2 * 2880) * 2).to(torch.bfloat16)
    eo = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    bo = torch.tensor([0] + list(torch.tensor([align(c) for c in counts]).cumsum(0)),
                      dtype=torch.int32)
    for op in (mv.mxfp4_experts_quant, mv.silu_and_mul_mxfp4_experts_quant):
        cpu = op(x, eo, bo, 4, 2)
        gpu = op(x.cuda(), eo.cuda(), bo.cuda(), 4, 2)
        assert gpu[1].shape == (2 * 1024, cpu[1].shape[1]) and gpu[0].dtype == torch.uint8
        assert torch.equal(gpu[0][: sum(counts)].cpu(), cpu[0][: sum(counts)])
        assert torch.equal(gpu[1].cpu(), cpu[1]), op.__name__


def test_run_cutlass_moe_mxfp4_vs_cpu():
    e, h, i, m, topk = 8, 2880, 2880, 33, 4
    g = torch.Generator().manual_seed(2)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(torch.bfloat16)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    w1s = torch.stack([mv.swizzle_mxfp4_scales(s, 2 * i, h) for s in layer.w13_scales])
    w2s = torch.stack([mv.swizzle_mxfp4_scales(s, h, i) for s in layer.w2_scales])
    a = torch.randn(m, h, generator=g).to(torch.bfloat16)
    top = torch.topk(torch.randn(m, e, generator=g).softmax(-1), topk)
    outs = []
    for d in ("cpu", "cuda"):
        out = torch.empty(m, h, dtype=torch.bfloat16, device=d)
        mv.run_cutlass_moe_mxfp4(out, a.to(d), layer.w13_packed.to(d), w1s.to(d),
                                 layer.w2_packed.to(d), w2s.to(d), top.values.to(d),
                                 top.indices.int().to(d), "silu", None, None, m, i, h, e, d)
        outs.append(out)
    assert rel_l2(outs[1], outs[0]) <= 5e-3
