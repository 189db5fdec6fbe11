"""GPU MoE forward with the model options (activations, biases, routing modes, shared experts)
against the CPU backend with the same quantized weights.

Ran on an NVIDIA H200 on 2026-12-04 at 371a9c2 (all cases passed). Without a CUDA device every
test skips with the reason. Checks:
- routing bit for bit: for every mode, the GPU's moe_forward with router logits equals the GPU's
  moe_forward with the ids and weights of ops.route (so the GPU routing kernel chose the same
  experts and weights as the contract), and the final output is within 5e-3 of the CPU's;
- every activation x bias dtype x routing x shared experts combination vs the CPU (rel L2 <=
  5e-3: only the GEMMs' accumulation order differs), poisoned outputs;
- the stage building blocks (ops.moe_activation_quantize) on CUDA tensors bit for bit vs CPU;
- CUDA-graph capture and replay of a GPT-OSS-style and a DeepSeek-style MoELayer;
- the weighted reduce folded into GEMM 2 (sm90, T x slots <= 16) bit for bit against the reduce
  kernel: the same tokens in a batch too large to fold, the CUDA-core GEMM forced at every T;
- the CUDA-core GEMMs' own activation quantize (T x slots <= 16) bit for bit against the quantize
  kernels (MXMOE_SM90_GEMV_QUANTIZE=0, 1, 2), every activation, bf16 and fp16, K = 2880.
"""

import itertools
import os

import pytest
import torch
from conftest import rel_l2

import mxmoe
from mxmoe import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")

BF16 = torch.bfloat16
ROUTING_OPTIONS = {
    "softmax_topk": {},
    "topk_softmax": {},
    "sigmoid_grouped_topk": {"num_expert_groups": 4, "topk_groups": 2,
                             "routed_scaling_factor": 2.5},
}


def build_layer(activation, bias_dtype, routing, shared, e=16, h=256, i=128, top_k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e + shared, 2 * i, h, generator=g) / h**0.5).to(BF16)
    w2 = (torch.randn(e + shared, h, i, generator=g) / i**0.5).to(BF16)
    options = dict(ROUTING_OPTIONS[routing])
    if routing == "sigmoid_grouped_topk":
        options["e_score_correction_bias"] = torch.randn(e, generator=g) * 0.1
    if bias_dtype is not None:
        options["w13_bias"] = (torch.randn(e + shared, 2 * i, generator=g) * 0.5).to(bias_dtype)
        options["w2_bias"] = (torch.randn(e + shared, h, generator=g) * 0.1).to(bias_dtype)
    return mxmoe.MoELayer.from_float(w13, w2, activation=activation, routing=routing,
                                     top_k=top_k, num_shared_experts=shared, **options)


@pytest.mark.parametrize("activation,bias_dtype,routing,shared", list(itertools.product(
    ["silu", "swiglu_oai"], [None, BF16, torch.float32],
    ["softmax_topk", "topk_softmax", "sigmoid_grouped_topk"], [0, 1])))
@pytest.mark.parametrize("tokens", [1, 33])
def test_options_match_cpu(activation, bias_dtype, routing, shared, tokens):
    layer = build_layer(activation, bias_dtype, routing, shared, seed=tokens + shared)
    g = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, layer.hidden_size, generator=g) * 2).to(BF16)
    logits = torch.randn(tokens, layer.num_experts - shared, generator=g)
    ref = layer(x, logits)
    gpu = layer.to("cuda")
    out = gpu(x.cuda(), logits.cuda())
    ids, weights = gpu.route(logits.cuda())
    out_topk = gpu.forward_topk(x.cuda(), ids, weights)
    torch.cuda.synchronize()
    context = f"{activation=} {bias_dtype=} {routing=} {shared=} {tokens=}"
    assert torch.equal(out, out_topk), f"{context}: GPU routing differs from ops.route"
    ids_cpu, weights_cpu = layer.to("cpu").route(logits)
    assert torch.equal(ids.cpu(), ids_cpu) and torch.equal(weights.cpu(), weights_cpu), context
    err = rel_l2(out, ref)
    assert err <= 5e-3, f"{context}: rel L2 vs CPU {err:.3e}"


@pytest.mark.parametrize("bias_dtype", [None, BF16, torch.float32])
def test_folded_reduce_matches_reduce_kernel(bias_dtype, monkeypatch):
    """On sm90 the MoE folds the weighted reduce into GEMM 2's CUDA-core epilogue when T x slots
    <= 16, and runs the reduce kernel otherwise. With the CUDA-core GEMM forced at every T
    (MXMOE_SM90_GEMV=1: its per-row sums do not depend on the other rows), every stage is
    per-token, so the first tokens of an 8-token batch (40 pairs: the reduce kernel) must equal
    a 1- and a 2-token batch (5 and 10 pairs: folded) bit for bit."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the folded reduce is the sm90 CUDA-core path's")
    monkeypatch.setenv("MXMOE_SM90_GEMV", "1")
    layer = build_layer("swiglu_oai", bias_dtype, "softmax_topk", 1, seed=5).to("cuda")
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(8, layer.hidden_size, generator=g) * 2).to(BF16).cuda()
    logits = torch.randn(8, layer.num_experts - 1, generator=g).cuda()
    batch = layer(x, logits)
    for t in (1, 2):
        folded = layer(x[:t].contiguous(), logits[:t].contiguous())
        torch.cuda.synchronize()
        assert torch.equal(folded, batch[:t]), (
            f"{bias_dtype=} T={t}: folded reduce differs from the reduce kernel in "
            f"{int((folded != batch[:t]).sum())} of {folded.numel()} outputs")


_EMPTY_LIKE = torch.empty_like


def poisoned_empty_like(*args, **kwargs):
    """torch.empty_like with NaN in every element (for the op's output buffer)."""
    return _EMPTY_LIKE(*args, **kwargs).fill_(float("nan"))


@pytest.mark.parametrize("activation,bias_dtype", [
    ("silu", None), ("silu", BF16), ("swiglu_oai", None), ("swiglu_oai", torch.float32)])
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("shape", ["small", "k2880"])
def test_gemv_quantize_matches_quantize_kernels(activation, bias_dtype, dtype, shape,
                                                monkeypatch):
    """At T x slots <= 16 on sm90 the CUDA-core GEMMs quantize their own activations (the
    gather + quantize before GEMM 1 and the activation + quantize before GEMM 2 are done inside
    them, with the quantize kernels' device functions). MXMOE_SM90_GEMV_QUANTIZE (a mask: 1 the
    gather, 2 the activation) 0 runs the quantize kernels instead: every mode's outputs must be
    equal bit for bit, at 1 to 16 rows, with
    empty experts, a shared expert, K = 2880 (a partial last chunk), bf16 and fp16, each
    activation; poisoned outputs, so an unwritten element shows. Both are also checked against
    the CPU backend (rel L2)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA-core GEMM is the sm90 path's")
    if shape == "small":
        layer = build_layer(activation, bias_dtype, "softmax_topk", 1, seed=7)
        cases = [1, 2, 3]  # 5, 10 and 15 rows
    else:  # GPT-OSS's H = 2880 with a small I and few experts (some get no row)
        layer = build_layer(activation, bias_dtype, "softmax_topk", 0, e=8, h=2880, i=160,
                            top_k=2, seed=8)
        cases = [1, 4, 8]  # 2, 8 and 16 rows
    g = torch.Generator().manual_seed(9)
    inputs = []
    for tokens in cases:  # the CPU backend's results first (the layer moves, not copies)
        x = (torch.randn(tokens, layer.hidden_size, generator=g) * 2).to(dtype)
        logits = torch.randn(tokens, layer.num_experts - layer.num_shared_experts, generator=g)
        ids, weights = layer.route(logits)
        inputs.append((x, ids, weights, layer.forward_topk(x, ids, weights)))
    gpu = layer.to("cuda")
    for x, ids, weights, ref in inputs:
        outs = {}
        for mode in ("3", "1", "2", "0"):  # both, the gather only, the activation only, none
            monkeypatch.setenv("MXMOE_SM90_GEMV_QUANTIZE", mode)
            with monkeypatch.context() as m:  # the op's output buffer, poisoned
                m.setattr(torch, "empty_like", poisoned_empty_like)
                outs[mode] = gpu.forward_topk(x.cuda(), ids.cuda(), weights.cuda())
            torch.cuda.synchronize()
        context = f"{activation=} {bias_dtype=} {dtype=} {shape=} tokens={x.shape[0]}"
        for mode, out in outs.items():
            assert not out.isnan().any(), f"{context} QUANTIZE={mode}: unwritten outputs"
        for mode in ("3", "1", "2"):
            assert torch.equal(outs[mode], outs["0"]), (
                f"{context} QUANTIZE={mode}: in-GEMM quantize differs from the quantize kernels "
                f"in {int((outs[mode] != outs['0']).sum())} of {outs['0'].numel()} outputs")
        err = rel_l2(outs["3"].cpu(), ref)
        assert err <= 5e-3, f"{context}: rel L2 vs CPU {err:.3e}"


def test_gemv_quantize_skips_quantize_launches(monkeypatch):
    """The fold is real: at 5 rows with MXMOE_SM90_GEMV_QUANTIZE=3 the layer launches no quantize
    kernel (3 kernels: routing + metadata, GEMM 1, GEMM 2 with the reduce), with 1 or 2 one, with
    0 both; by default (one wave of CTAs, the general activation excluded) one (torch.profiler's
    CUDA kernel records, by name)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA-core GEMM is the sm90 path's")
    layer = build_layer("swiglu_oai", BF16, "softmax_topk", 1, seed=3).to("cuda")
    x = torch.randn(1, layer.hidden_size).to(BF16).cuda()
    logits = torch.randn(1, layer.num_experts - 1).cuda()
    layer(x, logits)  # warm-up: workspace, prepared weights
    torch.cuda.synchronize()
    counts = {}
    for mode in ("default", "3", "1", "2", "0"):
        if mode == "default":
            monkeypatch.delenv("MXMOE_SM90_GEMV_QUANTIZE", raising=False)
        else:
            monkeypatch.setenv("MXMOE_SM90_GEMV_QUANTIZE", mode)
        activity = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activity) as prof:
            layer(x, logits)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not names:  # CUPTI taken, e.g. by compute-sanitizer: nothing to count, not a pass
            pytest.skip("torch.profiler recorded no CUDA kernel (CUPTI unavailable: under "
                        "compute-sanitizer it has another subscriber)")
        counts[mode] = (sum("QuantizeRowsKernel" in n for n in names),
                        sum("GroupedGemvSm90Kernel" in n for n in names))
    # The default: the gather folded (20 CTAs: one wave), SwiGLU with a bias not.
    assert counts == {"default": (1, 2), "3": (0, 2), "1": (1, 2), "2": (1, 2), "0": (2, 2)}, (
        f"(quantize kernels, CUDA-core GEMMs) per forward by MXMOE_SM90_GEMV_QUANTIZE: {counts}")


def test_activation_quantize_op_bit_exact_on_gpu():
    counts = [5, 0, 130, 1]
    eo, bo = ops.expert_offsets_from_counts(counts)
    rows, inter = sum(counts), 2880
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(rows, 2 * inter, generator=g) * 4).to(BF16)
    bias = torch.randn(len(counts), 2 * inter, generator=g)
    for activation in ("silu", "swiglu_oai"):
        # The default scale rows are the data-independent bound on every device (zero past
        # blockscale_offsets[E]); the GPU call asks for the exact count.
        cpu = ops.moe_activation_quantize(x, eo, bo, activation, w13_bias=bias)
        assert not cpu[1][int(bo[-1]):].any(), activation
        cpu = (cpu[0], cpu[1][:int(bo[-1])])
        gpu = ops.moe_activation_quantize(x.cuda(), eo.cuda(), bo.cuda(), activation,
                                          w13_bias=bias.cuda(), scale_rows=int(bo[-1]))
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu()), activation


@pytest.mark.skipif(os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "0",
                    reason="graph capture needs torch's caching allocator (off under sanitizers)")
@pytest.mark.parametrize("kind", ["gpt-oss", "deepseek"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_graph_replay_with_options(kind, tokens):
    if kind == "gpt-oss":
        layer = build_layer("swiglu_oai", BF16, "topk_softmax", 0, seed=3)
    else:
        layer = build_layer("silu", None, "sigmoid_grouped_topk", 1, seed=4)
    e_routed = layer.num_experts - layer.num_shared_experts
    gpu = layer.to("cuda")
    static_x = torch.zeros(tokens, layer.hidden_size, dtype=BF16, device="cuda")
    static_logits = torch.zeros(tokens, e_routed, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gpu(static_x, static_logits)  # warm-up: weights prepared, workspace cached
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gpu(static_x, static_logits)
    cpu_layer = (build_layer("swiglu_oai", BF16, "topk_softmax", 0, seed=3) if kind == "gpt-oss"
                 else build_layer("silu", None, "sigmoid_grouped_topk", 1, seed=4))
    for trial in range(3):
        x = torch.randn(tokens, layer.hidden_size).to(BF16)
        logits = torch.randn(tokens, e_routed)
        static_x.copy_(x)
        static_logits.copy_(logits)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        err = rel_l2(static_out, cpu_layer(x, logits))
        assert err <= 5e-3, f"{kind} graph replay {tokens=} {trial=}: rel L2 vs CPU {err:.3e}"


# Router widths that take each of the routing kernel's budgets (E <= 32 * V for V = 4, 8, 16,
# 128 rank values per lane), with groups that divide E for the grouped mode.
ROUTING_WIDTHS = [(8, 2, 1, 4), (64, 2, 1, 4), (128, 8, 4, 8), (200, 8, 3, 8), (256, 8, 4, 8),
                  (384, 8, 4, 32), (1500, 30, 4, 8)]  # (E, groups, kept groups, top_k)


def adversarial_logits(kind, tokens, e, g):
    """Logits that stress the rank order: many exact ties (+0 and -0 among them), infinities,
    NaNs (NaN ranks last; ties break to the lower id)."""
    if kind == "ties":
        logits = torch.randint(-2, 3, (tokens, e), generator=g).float()
        zero = logits == 0
        flip = torch.rand(tokens, e, generator=g) < 0.5
        return torch.where(zero & flip, torch.full_like(logits, -0.0), logits)
    # Every row some -Inf; even rows NaNs too (a NaN makes a softmax row all NaN, so odd rows
    # stay informative there); every fourth row one +Inf.
    logits = torch.randn(tokens, e, generator=g)
    pick = torch.rand(tokens, e, generator=g)
    logits[pick < 0.1] = float("-inf")
    even = (torch.arange(tokens) % 2 == 0)[:, None]
    logits[(pick >= 0.1) & (pick < 0.15) & even] = float("nan")
    logits[::4, int(torch.randint(e, (1,), generator=g))] = float("inf")
    return logits


def same_or_both_nan(a, b):
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


@pytest.mark.parametrize("e,groups,kept,top_k", ROUTING_WIDTHS)
@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax", "sigmoid_grouped_topk"])
@pytest.mark.parametrize("kind", ["ties", "nonfinite"])
def test_routing_kernel_rank_order(e, groups, kept, top_k, routing, kind):
    """The CUDA routing kernel against the contract's routing (ops.route) on logits full of ties,
    signed zeros, infinities and NaNs, at every register budget: the layer's output with the
    kernel's own routing equals, bit for bit (NaN where NaN), its output with ops.route's ids and
    weights (the experts' outputs differ, so a different pick or weight shows)."""
    g = torch.Generator().manual_seed(e + top_k)
    h, i = 64, 32
    # The CUDA MoE holds at most 1024 local experts: past that, the first 1000 global ids are
    # local (expert_map) and the rest are routed to but contribute nothing.
    local = min(e, 1000)
    w13 = (torch.randn(local, 2 * i, h, generator=g) / h**0.5).to(BF16)
    w2 = (torch.randn(local, h, i, generator=g) / i**0.5).to(BF16)
    options = {}
    if local < e:
        ids = torch.arange(e, dtype=torch.int32)
        options["expert_map"] = torch.where(ids < local, ids, torch.full_like(ids, -1))
    if routing == "sigmoid_grouped_topk":
        options.update(num_expert_groups=groups, topk_groups=kept,
                       e_score_correction_bias=torch.randint(-1, 2, (e,), generator=g) * 0.25)
    layer = mxmoe.MoELayer.from_float(w13, w2, activation="silu", routing=routing, top_k=top_k,
                                      **options).to("cuda")
    tokens = 37
    x = torch.randn(tokens, h, generator=g).to(BF16).cuda()
    logits = adversarial_logits(kind, tokens, e, g).cuda()
    ids, weights = layer.route(logits)
    out = layer(x, logits)
    out_topk = layer.forward_topk(x, ids, weights)
    torch.cuda.synchronize()
    context = f"{e=} {routing=} {kind=} {top_k=}"
    assert same_or_both_nan(out, out_topk), f"{context}: GPU routing differs from ops.route"
    if kind == "ties":
        assert torch.isfinite(out).all(), context  # the tie case must be checkable everywhere
