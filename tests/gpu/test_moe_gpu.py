"""GPU MoE forward against the CPU backend with the same quantized weights.

Runs on the GPU host through tools/gpu/run.sh; without a CUDA device every test skips with the
reason. Checks: the three model shapes scaled down in experts (CPU reference time), T = 1, 7, 64,
1000, with and without renormalisation, an expert_map keeping half the experts, top-k lists
naming the same expert twice, poisoned outputs, and CUDA-graph capture + replay for several T.
"""

import os

import pytest
import torch
from conftest import quick_mode, rel_l2

import mxmoe
from mxmoe import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")

# (name, E, H, I, top_k): real H / I of each model, fewer experts so the CPU reference is quick.
SHAPES = [
    ("gpt-oss-120b/8e", 8, 2880, 2880, 4),
    ("qwen3-30b-a3b/16e", 16, 2048, 768, 8),
    ("deepseek-v3/16e", 16, 7168, 2048, 8),
    ("tiny", 4, 64, 32, 2),
]
if quick_mode():  # compute-sanitizer passes: small shapes only
    SHAPES = [("qwen3-30b-a3b/4e", 4, 2048, 768, 2), ("tiny", 4, 64, 32, 2)]



def make_layer(e: int, h: int, i: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(torch.bfloat16)
    w13_packed, w13_scales = ops.quantize_weights(w13)
    w2_packed, w2_scales = ops.quantize_weights(w2)
    return (w13, w2), (w13_packed, w13_scales, w2_packed, w2_scales)


def to_cuda(tensors):
    return tuple(t.cuda() for t in tensors)


@pytest.mark.parametrize("name,e,h,i,top_k", SHAPES)
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_forward_matches_cpu(name, e, h, i, top_k, tokens, renormalize):
    if tokens == 1000 and h * i > 2048 * 2048:
        pytest.skip("CPU reference too slow for this size; covered at T <= 64")
    (w13, w2), weights = make_layer(e, h, i, seed=tokens + e)
    g = torch.Generator().manual_seed(tokens * 7 + h)
    hidden = torch.randn(tokens, h, generator=g).to(torch.bfloat16)
    logits = torch.randn(tokens, e, generator=g)
    ref = ops.moe_forward(hidden, *weights, router_logits=logits, top_k=top_k,
                          renormalize=renormalize)
    out = ops.moe_forward(hidden.cuda(), *to_cuda(weights), router_logits=logits.cuda(),
                          top_k=top_k, renormalize=renormalize)
    torch.cuda.synchronize()
    assert out.shape == (tokens, h) and out.dtype == torch.bfloat16
    err = rel_l2(out, ref)
    assert err <= 5e-3, f"{name=} {tokens=} {renormalize=}: rel L2 vs CPU {err:.3e}"
    ids, topw = reference.route(logits, top_k, renormalize)
    unq = reference.moe_forward_unquantized(hidden, w13, w2, ids, topw)
    print(f"{name} T={tokens}: vs CPU {err:.2e}, vs unquantized bf16 {rel_l2(out, unq):.3f}")


def test_expert_map_keeps_half():
    e_global, h, i, top_k, tokens = 16, 256, 128, 4, 64
    _, weights = make_layer(e_global // 2, h, i, seed=3)
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[0::2] = torch.arange(e_global // 2, dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(tokens, h, generator=g).to(torch.bfloat16)
    logits = torch.randn(tokens, e_global, generator=g)
    ref = ops.moe_forward(hidden, *weights, router_logits=logits, top_k=top_k,
                          expert_map=expert_map)
    out = ops.moe_forward(hidden.cuda(), *to_cuda(weights), router_logits=logits.cuda(),
                          top_k=top_k, expert_map=expert_map.cuda())
    err = rel_l2(out, ref)
    assert err <= 5e-3, f"expert_map half: rel L2 vs CPU {err:.3e}"


def test_duplicate_expert_in_topk_counts_twice():
    e, h, i, tokens = 4, 128, 64, 5
    _, weights = make_layer(e, h, i, seed=11)
    hidden = torch.randn(tokens, h).to(torch.bfloat16)
    ids = torch.tensor([[1, 1], [0, 2], [3, 3], [2, 0], [1, 3]], dtype=torch.int32)
    topw = torch.tensor([[0.25, 0.5]] * tokens, dtype=torch.float32)
    ref = ops.moe_forward(hidden, *weights, topk_ids=ids, topk_weights=topw)
    out = ops.moe_forward(hidden.cuda(), *to_cuda(weights), topk_ids=ids.cuda(),
                          topk_weights=topw.cuda())
    err = rel_l2(out, ref)
    assert err <= 5e-3, f"duplicate top-k: rel L2 vs CPU {err:.3e}"


@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "0",
                    reason="graph capture needs torch's caching allocator (off under sanitizers)")
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_cuda_graph_replay(tokens):
    e, h, i, top_k = 8, 512, 256, 2
    _, weights = make_layer(e, h, i, seed=tokens)
    weights_cuda = to_cuda(weights)
    static_hidden = torch.empty(tokens, h, dtype=torch.bfloat16, device="cuda")
    static_logits = torch.empty(tokens, e, dtype=torch.float32, device="cuda")
    static_hidden.copy_(torch.randn(tokens, h).to(torch.bfloat16))
    static_logits.copy_(torch.randn(tokens, e))
    # Warm up on a side stream (workspace allocation happens outside the capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.moe_forward(static_hidden, *weights_cuda, router_logits=static_logits, top_k=top_k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.moe_forward(static_hidden, *weights_cuda, router_logits=static_logits,
                                     top_k=top_k)
    for trial in range(3):
        hidden = torch.randn(tokens, h).to(torch.bfloat16)
        logits = torch.randn(tokens, e)
        static_hidden.copy_(hidden)
        static_logits.copy_(logits)
        static_out.fill_(float("nan"))  # poison: the replay must rewrite every element
        graph.replay()
        torch.cuda.synchronize()
        ref = ops.moe_forward(hidden, *weights, router_logits=logits, top_k=top_k)
        err = rel_l2(static_out, ref)
        assert err <= 5e-3, f"graph replay {tokens=} {trial=}: rel L2 vs CPU {err:.3e}"


def test_backend_is_gpu():
    assert mxmoe.backend_for(torch.empty(1, device="cuda")) in ("sm90", "sm100")


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_moe_pipeline_stages_match_cpu(tokens):
    """The MoE built from the public ops, stage by stage, GPU vs CPU: pins a failing stage."""
    e, h, i, top_k = (4, 256, 128, 2) if quick_mode() else (8, 2880, 2880, 4)
    _, (w13, w13_s, w2, w2_s) = make_layer(e, h, i, seed=tokens)
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, h, generator=g).to(torch.bfloat16)
    ids, _ = reference.route(torch.randn(tokens, e, generator=g), top_k, True)
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    eo, bso = ops.expert_offsets_from_counts(counts)
    x = hidden[order // top_k]

    def both(fn, *args):
        cpu = fn(*args)
        gpu = fn(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        torch.cuda.synchronize()
        return cpu, gpu

    (a_c, s_c), (a_g, s_g) = both(ops.experts_quantize, x, eo, bso)
    scale_rows = int(bso[-1])  # the GPU default allocates a bound (no host sync); compare used
    assert torch.equal(a_c, a_g.cpu()), f"quantize codes {tokens=}"
    assert torch.equal(s_c[:scale_rows], s_g[:scale_rows].cpu()), f"quantize scales {tokens=}"
    c1_c, c1_g = both(ops.grouped_gemm, a_c, s_c, w13, w13_s, eo, bso)
    err1 = rel_l2(c1_g, c1_c)
    (a2_c, s2_c), _ = both(ops.silu_mul_experts_quantize, c1_c, eo, bso)
    c2_c, c2_g = both(ops.grouped_gemm, a2_c, s2_c, w2, w2_s, eo, bso)
    err2 = rel_l2(c2_g, c2_c)
    assert err1 <= 2e-3 and err2 <= 2e-3, f"{tokens=}: GEMM1 {err1:.3e} GEMM2 {err2:.3e}"
