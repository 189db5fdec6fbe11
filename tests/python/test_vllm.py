"""mxmoe.vllm on the CPU: the properties vLLM's own MXFP4 MoE tests check
(tests/kernels/moe/test_mxfp4_moe.py and its CUTLASS MXFP4 grouped-GEMM test), re-written:
output shapes and dtypes, E8M0 scales equal to the OCP rule on every block (after undoing the
tiled layout by vLLM's documented formula), saturation below 5% and reconstruction cosine
> 0.99 on Gaussian input, the grouped GEMM per expert within cosine distance 0.15 of a bf16
matmul, run_cutlass_moe_mxfp4 against mxmoe's MoE forward, and the modular-kernel experts
contract (workspace shapes, apply with expert_map). vLLM-dependent checks skip without vLLM."""

import importlib.util
import struct

import pytest
import torch
from expectations import expect_error

import mxmoe
from mxmoe import ops
from mxmoe import vllm as mv

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def align(x, m=128):
    return (x + m - 1) // m * m


def untile(scales_flat: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """The [numMTiles, numKTiles, 32, 4, 4] tiled scales back to [rows, K/32] (vLLM's layout
    description, independent of mxmoe's swizzle code)."""
    cols = k // 32
    mt, kt = align(rows) // 128, align(cols, 4) // 4
    tiled = scales_flat.reshape(-1)[: mt * kt * 512].reshape(mt, kt, 32, 4, 4)
    return tiled.permute(0, 3, 2, 1, 4).reshape(mt * 128, kt * 4)[:rows, :cols]


def ocp_scale(block_max: float) -> int:
    bits = struct.unpack("I", struct.pack("f", block_max))[0]
    e = ((bits + (1 << 21)) & 0xFF800000) >> 23
    return min(max(e - 2, 0), 254)


LUT = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])


def decode(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1).long()
    s = torch.ldexp(torch.ones(()), scales.float() - 127).repeat_interleave(32, dim=1)
    return LUT[codes] * s


def one_expert(m, k, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * scale).to(torch.bfloat16)
    return x, torch.tensor([0, m], dtype=torch.int32), torch.tensor([0, align(m)],
                                                                    dtype=torch.int32)


def test_experts_quant_shapes_and_dtypes():
    e, k, per = 4, 256, 16
    x = (torch.randn(per * e, k) / 5).to(torch.bfloat16)
    eo = torch.arange(e + 1, dtype=torch.int32) * per
    bo = torch.arange(e + 1, dtype=torch.int32) * align(per)
    out, sf = mv.mxfp4_experts_quant(x, eo, bo, e, topk=1)
    assert out.shape == (per * e, k // 2) and out.dtype == torch.uint8
    assert sf.dtype == torch.uint8 and sf.shape == (mv.max_tokens_per_expert(), k // 32)
    assert out.any()
    # keyword call sites, silu variant: [m, 2N] -> [m, N/2]
    out2, sf2 = mv.silu_and_mul_mxfp4_experts_quant(input_tensor=x, expert_offsets=eo,
                                                     blockscale_offsets=bo, n_experts=e, topk=2)
    assert out2.shape == (per * e, k // 4) and sf2.shape == (2 * mv.max_tokens_per_expert(), 4)


@pytest.mark.parametrize("m,k", [(16, 256), (64, 7168)])
def test_e8m0_scales_follow_the_ocp_rule(m, k, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "256")  # small scale buffers
    x, eo, bo = one_expert(m, k, seed=m + k)
    out, sf = mv.mxfp4_experts_quant(x, eo, bo, 1, topk=1)
    scales = untile(sf, m, k)
    amax = x.float().reshape(m, k // 32, 32).abs().amax(-1)
    want = torch.tensor([[ocp_scale(v) for v in row] for row in amax.tolist()],
                        dtype=torch.uint8)
    assert torch.equal(scales, want), f"{m=} {k=}: {(scales != want).sum()} blocks differ"
    recon = decode(out, scales).to(torch.bfloat16).float()
    cos = torch.nn.functional.cosine_similarity(recon.flatten(), x.float().flatten(), dim=0)
    assert cos > 0.99 and (recon - x.float()).abs().max() < 1.0, f"{cos=}"


def test_no_unexpected_saturation(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "128")
    x, eo, bo = one_expert(128, 1024, seed=123)
    out, _ = mv.mxfp4_experts_quant(x, eo, bo, 1, topk=1)
    lo, hi = out & 0xF, out >> 4
    saturated = ((lo & 7) == 7).sum() + ((hi & 7) == 7).sum()
    assert saturated / x.numel() < 0.05


@pytest.mark.parametrize("num_experts", [3, 8])
def test_grouped_mm_against_bf16(num_experts, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "2048")
    g = torch.Generator().manual_seed(num_experts)
    n, k = 256, 384
    counts = [int(v) for v in torch.randint(1, 100, (num_experts,), generator=g)]
    counts[1] = 0  # an empty expert
    xs = [(torch.randn(c, k, generator=g) * 0.5).to(torch.bfloat16) for c in counts]
    ws = [(torch.randn(n, k, generator=g) * 0.5).to(torch.bfloat16) for _ in counts]
    starts = [sum(counts[:i]) for i in range(num_experts)]
    sf_starts = [sum(align(c) for c in counts[:i]) for i in range(num_experts)]
    eo = torch.tensor(starts + [sum(counts)], dtype=torch.int32)
    bo = torch.tensor(sf_starts + [sum(align(c) for c in counts)], dtype=torch.int32)
    a_q, a_sf = mv.mxfp4_experts_quant(torch.cat(xs), eo, bo, num_experts, topk=1)
    # Weights through the same quantizer: each expert's N rows as one "expert" (N % 128 == 0).
    weo = torch.arange(num_experts + 1, dtype=torch.int32) * n
    w_q, w_sf = mv.mxfp4_experts_quant(torch.cat(ws), weo, weo, num_experts, topk=1)
    w_q = w_q[: num_experts * n].view(num_experts, n, k // 2)
    w_sf = w_sf.reshape(-1)[: num_experts * n * (k // 32)].view(num_experts, n, k // 32)
    problem = torch.tensor([[c, n, k] for c in counts], dtype=torch.int32)
    out = torch.full((sum(counts), n), float("nan"), dtype=torch.bfloat16)
    mv.cutlass_mxfp4_moe_mm(out, a_q, w_q, a_sf, w_sf, problem,
                            torch.tensor(starts, dtype=torch.int32),
                            torch.tensor(sf_starts, dtype=torch.int32))
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        if not counts[i]:
            continue
        got = out[starts[i]:starts[i] + counts[i]].double()
        ref = x.double() @ w.double().T
        diff = 1 - 2 * (got * ref).sum() / (got * got + ref * ref).sum()
        assert diff < 0.15, f"expert {i}: {diff=}"


def test_swizzle_mxfp4_scales_layout():
    n, k = 200, 96  # N and K/32 not multiples of 128 / 4: padding
    s = torch.randint(0, 255, (n, k // 32), dtype=torch.uint8)
    flat = mv.swizzle_mxfp4_scales(s, n, k)
    assert flat.dim() == 1 and flat.numel() == align(n) * align(k // 32, 4)
    assert torch.equal(untile(flat, n, k), s)
    padded = untile(flat, align(n), align(k // 32, 4) * 32)
    assert not padded[n:].any() and not padded[:, k // 32:].any()
    expect_error(lambda: mv.swizzle_mxfp4_scales(s, n + 1, k), "scales must hold")


def make_moe(e, h, i, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.3).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g) * 0.3).to(torch.bfloat16)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    w1_scale = torch.stack([mv.swizzle_mxfp4_scales(s, 2 * i, h) for s in layer.w13_scales])
    w2_scale = torch.stack([mv.swizzle_mxfp4_scales(s, h, i) for s in layer.w2_scales])
    return layer, w1_scale, w2_scale


@pytest.mark.parametrize("m,topk", [(1, 1), (37, 4)])
def test_run_cutlass_moe_mxfp4_matches_mxmoe_moe(m, topk, monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "256")
    e, h, i = 6, 128, 96
    layer, w1s, w2s = make_moe(e, h, i, seed=m)
    g = torch.Generator().manual_seed(m + 1)
    a = torch.randn(m, h, generator=g).to(torch.bfloat16)
    top = torch.topk(torch.randn(m, e, generator=g).softmax(-1), topk)
    out = torch.full((m, h), float("nan"), dtype=torch.bfloat16)
    mv.run_cutlass_moe_mxfp4(out, a, layer.w13_packed, w1s, layer.w2_packed, w2s, top.values,
                             top.indices.int(), "silu", None, None, m, i, h, e, a.device)
    # mxmoe's MoE forward sums the top-k in fp32 where vLLM's combine rounds each weighted
    # product to bf16 first: equal up to bf16 rounding of the sum.
    want = layer.forward_topk(a, top.indices, top.values)
    assert torch.allclose(out.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max())
    expect_error(lambda: mv.run_cutlass_moe_mxfp4(out, a, layer.w13_packed, w1s,
                                                  layer.w2_packed, w2s, top.values,
                                                  top.indices.int(), "gelu", None, None, m, i,
                                                  h, e, a.device),
                 "activation 'gelu'", error=mxmoe.UnsupportedError)


def test_experts_interface_contract_and_expert_map(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "256")
    e_local, e_global, h, i, m, topk = 3, 8, 64, 64, 9, 2
    layer, w1s, w2s = make_moe(e_local, h, i, seed=5)
    experts = mv.MxfpMoEExperts(w1s, w2s)
    assert experts.workspace_shapes(m, i, h, topk, e_global, e_local, None, "silu") == (
        (m * topk, max(2 * i, h)), (m * topk, i), (m, h))
    assert experts.workspace_dtype(torch.bfloat16) == torch.bfloat16
    assert experts.supports_expert_map()
    # Global experts 2, 5, 7 live here as local 0, 1, 2.
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[torch.tensor([2, 5, 7])] = torch.arange(3, dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(m, h, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, e_global, (m, topk), generator=g)
    weights = torch.rand(m, topk, generator=g)
    out = torch.full((m, h), float("nan"), dtype=torch.bfloat16)
    experts.apply(out, hidden, layer.w13_packed, layer.w2_packed, weights, ids, "silu",
                  e_global, expert_map, None, None, None, None, None, False)
    want = mxmoe.MoELayer(layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales,
                          expert_map=expert_map).forward_topk(hidden, ids, weights)
    assert not out.isnan().any()
    assert torch.allclose(out.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max())
    remote = (expert_map[ids] < 0).all(dim=1)  # tokens whose every expert is elsewhere: 0
    assert not out[remote].any()


def test_bad_inputs_name_the_argument(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "4")
    x, eo, bo = one_expert(16, 64, seed=1)
    expect_error(lambda: mv.mxfp4_experts_quant(x, eo, bo, 1, 2),
                 "m_numtopk=16", "MAX_TOKENS_PER_EXPERT * topk = 4 * 2")
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "64")
    expect_error(lambda: mv.mxfp4_experts_quant(x, eo, bo, 2, 1),
                 "expert_offsets must have n_experts + 1 = 3 entries")
    expect_error(lambda: mv.mxfp4_experts_quant(x[:, :48].contiguous(), eo, bo, 1, 1),
                 "K % 32 == 0, got K=48")
    monkeypatch.setenv("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", "lots")
    expect_error(lambda: mv.mxfp4_experts_quant(x, eo, bo, 1, 1),
                 "VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE must be an integer")


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (the class is checked "
                    "against the interface contract above without it)")
def test_vllm_base_class():
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk

    cls = mv.vllm_experts_class()
    base = getattr(mk, "FusedMoEExpertsModular", None) or mk.FusedMoEPermuteExpertsUnpermute
    assert issubclass(cls, base)
    assert cls.activation_format() == mk.FusedMoEActivationFormat.Standard
