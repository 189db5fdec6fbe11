"""Whole-layer MoE benchmark (docs/design.md protocol): mxmoe beside torch peers and floors.

One run on one GPU. For each model shape, block and token count T, the full layer (routing
through output, same router logits for everyone) is timed for
  mxmoe       mxmoe.ops.moe_forward on MXFP4 weights (W4A4),
  torch_bf16  a torch MoE with bf16 weights via torch._grouped_mm,
  torch_fp8   a torch MoE with FP8 rowwise weights and activations via torch._scaled_grouped_mm
              (mxmoe.peers; these two route in torch, mxmoe in its own kernel),
  vllm_marlin vLLM's Marlin W4A16 MXFP4 MoE on the same MXFP4 codes and scales, run op for op
              as vLLM's fused_marlin_moe (its routing kernels, moe_align_block_size, two
              moe_wna16_marlin_gemm calls, its activation op); only with --vllm PATH (a vLLM
              wheel or directory: bench/peers/vllm_marlin.py),
next to the floors: bytes of the active experts' MXFP4 weights and scales over the device-to-device
copy bandwidth measured in this run, and the GEMM FLOPs over the FP8 dense peak (1979 TFLOP/s).
Times are medians of CUDA-event timings; small T replays CUDA graphs; inputs rotate over several
sets so successive iterations route to different experts (weights are not served from L2).

Blocks (row key "block"; both blocks of a shape see the same hidden states and logits):
  shape  the Qwen3-MoE block at every model's shape: softmax top-k (renormalised), SiLU-and-mul,
         no biases. This IS qwen3-30b-a3b's real block, so qwen3-30b-a3b has no "model" row.
  model  the model's real block, computed identically by mxmoe and the peers (the same
         moe_forward keyword arguments):
         gpt-oss-120b  SwiGLU-OAI (alpha 1.702, limit 7.0), random bf16 biases w13_bias [E, 2I]
                       (std 0.02) and w2_bias [E, H] (std 0.01), top-k of the logits then softmax;
         deepseek-v3   sigmoid grouped top-k (8 groups, 4 kept, e_score_correction_bias [E] fp32
                       std 0.01, renormalised, routed_scaling_factor 2.5), SiLU-and-mul, no biases,
                       1 shared expert (the last of E + 1 weight experts, weight 1 for every token).
The floors count the active routed experts plus the shared ones (DeepSeek-V3: + 1 expert's bytes,
and top_k + 1 slots of FLOPs per token); bias bytes are left out (GPT-OSS: (2I + H) bf16 per
expert against 3HI MXFP4 values, 0.13%).

Accuracy, on the first input set, every layer routed by the contract's routing (mxmoe.ops.route's
ids and weights, passed to the peers): <impl>_rel_l2_vs_bf16 against the bf16 torch layer, and
<impl>_rel_l2_vs_w4a4_ref / _vs_w4a16_ref against the two float64-GEMM references on the same
MXFP4 weights (mxmoe.reference, on the GPU): W4A4 = mxmoe's contract (activations quantized to
MXFP4 too; mxmoe should match it to rounding), W4A16 = bf16 activations (what a W4A16 peer such
as Marlin computes; its own quantization error is the smaller one). peer_routing_id_match /
vllm_marlin_routing_id_match: the fraction of tokens for which the torch peers' routing / vLLM's
routing kernels (the timed ones) pick the same experts as mxmoe.ops.route (below 1.0 only on
near-ties).

Usage: python bench/bench_moe.py --out DIR [--shapes ...] [--blocks shape|model|both]
                                 [--tokens ...] [--impls ...] [--vllm PATH] [--commit SHA]
                                 [--no-check] [--kernels]
Writes DIR/<gpu>-moe.json (keys gpu, commit, date, copy_GBps, blocks, rows) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
from common import SHAPES, TOKENS, commit, gpu_short_name, measure_copy_bandwidth
from peers.vllm_marlin import VllmMarlinMoe
from peers.vllm_marlin import load as load_vllm

import mxmoe
from mxmoe import ops, reference
from mxmoe.measure import cuda_event_ms, rel_l2
from mxmoe.peers import TorchBf16Moe, TorchFp8Moe
from mxmoe.peers import route as peer_route

FP8_PEAK_FLOPS = 1979e12
ROTATIONS = 4
GRAPH_MAX_TOKENS = 256

# The real blocks that differ from the shape block: moe_forward's model options, with the random
# tensors described by their std (made by model_block_options).
MODEL_BLOCKS = {
    "gpt-oss-120b": {"activation": "swiglu_oai", "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
                     "routing": "topk_softmax", "w13_bias_std": 0.02, "w2_bias_std": 0.01},
    "deepseek-v3": {"routing": "sigmoid_grouped_topk", "num_expert_groups": 8, "topk_groups": 4,
                    "routed_scaling_factor": 2.5, "e_score_correction_bias_std": 0.01,
                    "num_shared_experts": 1},
}
SHAPE_BLOCK = ("softmax top-k (renormalised), SiLU-and-mul, no biases, no shared experts "
               "(the Qwen3-MoE block; qwen3-30b-a3b's real block)")
ROUTING_KEYS = ("routing", "num_expert_groups", "topk_groups", "routed_scaling_factor",
                "e_score_correction_bias")


def time_calls(fns, use_graph: bool, repeats: int = 15, inner: int = 8) -> float:
    """Median milliseconds per call of fns[i % len(fns)] (each a zero-argument callable)."""
    if use_graph:
        graphs = []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for fn in fns:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graphs.append(graph)
        calls = [g.replay for g in graphs]
    else:
        calls = fns
    for call in calls:
        call()
    torch.cuda.synchronize()

    def body():
        for j in range(inner):
            calls[j % len(calls)]()

    return cuda_event_ms(body, repeats, calls_per_body=inner)


# ---- benchmark ----------------------------------------------------------------------------------


def kernel_breakdown(fns, calls: int = 16) -> dict:
    """Mean device microseconds per layer call of each CUDA kernel that fns launch (torch.profiler,
    CUPTI), keyed by kernel name (namespaces and template arguments cut), with its launches per
    call, in launch order; eager calls, so launch gaps are not in it. A diagnostic beside the
    timed median, not a timing."""
    from torch.profiler import ProfilerActivity, profile
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for j in range(calls):
            fns[j % len(fns)]()
        torch.cuda.synchronize()
    totals = {}
    launches = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.replace("(anonymous namespace)::", "").replace("void ", "")
        name = name.split("<")[0].split("(")[0].strip().rsplit("::", 1)[-1] or event.name[:60]
        totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us()
        launches[name] = launches.get(name, 0) + 1
    return {k: {"us": round(v / calls, 2), "launches": launches[k] / calls}
            for k, v in totals.items()}


def mxfp4_expert_bytes(h: int, inter: int) -> int:
    w13 = 2 * inter * h // 2 + 2 * inter * h // 32
    w2 = h * inter // 2 + h * inter // 32
    return w13 + w2


def random_bf16(shape, std, gen):
    """Normal(0, std) bf16 tensor on the GPU, generated expert by expert (no fp32 copy of all)."""
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    for e in range(shape[0]):
        out[e] = (torch.randn(shape[1:], device="cuda", generator=gen) * std).bfloat16()
    return out


def model_block_options(name: str, e: int, h: int, inter: int, gen) -> dict:
    """moe_forward's model keyword arguments of ``name``'s real block (E routed experts)."""
    options = {k: v for k, v in MODEL_BLOCKS[name].items() if not k.endswith("_std")}
    spec = MODEL_BLOCKS[name]
    local = e + spec.get("num_shared_experts", 0)
    if "w13_bias_std" in spec:
        options["w13_bias"] = random_bf16((local, 2 * inter), spec["w13_bias_std"], gen)
        options["w2_bias"] = random_bf16((local, h), spec["w2_bias_std"], gen)
    if "e_score_correction_bias_std" in spec:
        options["e_score_correction_bias"] = (
            torch.randn(e, device="cuda", generator=gen) * spec["e_score_correction_bias_std"])
    return options


def model_options(options: dict) -> dict:
    """The block's options without the routing ones (for calls given top-k ids and weights)."""
    return {k: v for k, v in options.items() if k not in ROUTING_KEYS}


def torch_router(peers: dict):
    """The torch peers' routing (peer_route with their block), or None without torch peers."""
    block = next((p.block for p in peers.values() if hasattr(p, "block")), None)
    return None if block is None else (lambda lg: peer_route(lg, block))


def check_accuracy(row, impl_outputs, x, ids, weights, linear, options, bf16_ref):
    """The accuracy keys of one row (see the module doc) from the layers' outputs."""
    w13p, w13s, w2p, w2s = linear
    model = model_options(options)
    refs = {"bf16": bf16_ref}
    refs["w4a4_ref"] = reference.moe_forward(x, w13p, w13s, w2p, w2s, topk_ids=ids,
                                             topk_weights=weights, **model)
    refs["w4a16_ref"] = reference.moe_forward_unquantized(
        x, lambda e: reference.dequantize(w13p[e], w13s[e], torch.float32),
        lambda e: reference.dequantize(w2p[e], w2s[e], torch.float32), ids, weights,
        num_experts=w13p.shape[0], **model)
    for impl, out in impl_outputs.items():
        for ref_name, ref in refs.items():
            if ref is not None:
                row[f"{impl}_rel_l2_vs_{ref_name}"] = rel_l2(out, ref)


def bench_block(name, block, w13, w2, options, top_k, token_list, copy_gbps, impls, log,
                vllm_ops=None, check=True, kernels=False):
    """Rows of one (shape, block): w13/w2 hold the routed experts, then the shared ones."""
    rows = []
    e_local, _, h = w13.shape
    inter = w2.shape[2]
    shared = options.get("num_shared_experts", 0)
    e = e_local - shared
    routing = {k: v for k, v in options.items() if k in ROUTING_KEYS}
    w13_packed, w13_scales = ops.quantize_weights(w13)
    w2_packed, w2_scales = ops.quantize_weights(w2)
    # Prepared once, as MoELayer does: the backend's fastest layout.
    mx_weights = (ops.prepare_weights(w13_packed, w13_scales), None,
                  ops.prepare_weights(w2_packed, w2_scales), None)
    linear = (w13_packed, w13_scales, w2_packed, w2_scales)  # the references' and Marlin's input
    peers = {}
    if "torch_bf16" in impls:
        peers["torch_bf16"] = TorchBf16Moe(w13, w2, top_k, **options)
    if "torch_fp8" in impls:
        peers["torch_fp8"] = TorchFp8Moe(w13, w2, top_k, **options)
    if "vllm_marlin" in impls:
        try:
            peers["vllm_marlin"] = VllmMarlinMoe(vllm_ops, *linear, top_k, **options)
        except Exception as exc:
            log(f"[{name} {block}] vllm_marlin unavailable: {type(exc).__name__}: {exc}")
            peers["vllm_marlin"] = f"{type(exc).__name__}: {exc}"[:300]
    for tokens in token_list:
        log(f"[{name} {block}] T={tokens}")
        # Seeded per T only: the shape and model blocks of a shape see the same inputs.
        gen = torch.Generator(device="cuda").manual_seed(1000 + tokens)
        inputs = [
            (torch.randn(tokens, h, device="cuda", generator=gen).bfloat16(),
             torch.randn(tokens, e, device="cuda", generator=gen))
            for _ in range(ROTATIONS)
        ]
        # The contract's routing (the ids mxmoe uses), outside the timed calls.
        routed = [ops.route(lg, top_k, True, **routing) for _, lg in inputs]
        use_graph = tokens <= GRAPH_MAX_TOKENS
        row = {"shape": name, "block": block, "tokens": tokens, "graph": use_graph}
        if getattr(peers.get("vllm_marlin"), "padding", lambda: "")():
            row["vllm_marlin_padding"] = peers["vllm_marlin"].padding()
        experts = sum(torch.unique(ids).numel() for ids, _ in routed) / len(routed) + shared
        row["active_experts"] = experts
        row["floor_bytes_ms"] = experts * mxfp4_expert_bytes(h, inter) / (copy_gbps * 1e9) * 1e3
        flops = 2 * tokens * (top_k + shared) * (h * 2 * inter + inter * h)
        row["floor_fp8_ms"] = flops / FP8_PEAK_FLOPS * 1e3
        for key, router in (("peer", torch_router(peers)),
                            ("vllm_marlin", getattr(peers.get("vllm_marlin"), "route", None))):
            if router is not None:
                same = [(router(lg)[0].long().sort(dim=1).values ==
                         ids.long().sort(dim=1).values).all(dim=1)
                        for (_, lg), (ids, _) in zip(inputs, routed, strict=True)]
                row[f"{key}_routing_id_match"] = float(torch.cat(same).float().mean())
        outputs = {}
        x, _ = inputs[0]
        ids, weights = routed[0]
        if "mxmoe" in impls:
            try:
                fns = [lambda x=x, lg=lg: ops.moe_forward(x, *mx_weights, router_logits=lg,
                                                          top_k=top_k, renormalize=True,
                                                          **options)
                       for x, lg in inputs]
                row["mxmoe_ms"] = time_calls(fns, use_graph)
                if kernels:
                    row["mxmoe_kernels_us"] = kernel_breakdown(fns)
                outputs["mxmoe"] = ops.moe_forward(x, *mx_weights, topk_ids=ids,
                                                   topk_weights=weights, **model_options(options))
            except Exception as exc:
                row["mxmoe_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for peer_name, peer in peers.items():
            if isinstance(peer, str):
                row[f"{peer_name}_error"] = peer
                continue
            try:
                fns = [lambda x=x, lg=lg, peer=peer: peer(x, lg) for x, lg in inputs]
                row[f"{peer_name}_ms"] = time_calls(fns, use_graph)
                if peer_name != "torch_bf16":
                    outputs[peer_name] = peer(x, topk_ids=ids, topk_weights=weights)
            except Exception as exc:
                row[f"{peer_name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if check and outputs:
            try:
                bf16_ref = (peers["torch_bf16"](x, topk_ids=ids, topk_weights=weights)
                            if "torch_bf16" in peers else None)
                check_accuracy(row, outputs, x, ids, weights, linear, options, bf16_ref)
            except Exception as exc:
                row["check_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del outputs
        rows.append(row)
        log("   " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in row.items()}))
        del inputs, routed
        torch.cuda.empty_cache()
    return rows  # the caller empties the cache once this block's weights are released


def bench_shape(name, e, h, inter, top_k, blocks, token_list, copy_gbps, impls, log,
                vllm_ops=None, check=True, kernels=False):
    """The shape block and/or the model block of one shape, on one set of random weights (the
    shape block uses the first E experts; the model block adds its shared experts)."""
    blocks = [b for b in blocks if b == "shape" or name in MODEL_BLOCKS]
    if not blocks:
        log(f"[{name}] no model block (its shape block is its real block); skipped")
        return []
    gen = torch.Generator(device="cuda").manual_seed(0)
    shared = MODEL_BLOCKS.get(name, {}).get("num_shared_experts", 0) if "model" in blocks else 0
    log(f"[{name}] generating weights E={e}+{shared} H={h} I={inter}")
    w13 = random_bf16((e + shared, 2 * inter, h), 1 / math.sqrt(h), gen)
    w2 = random_bf16((e + shared, h, inter), 1 / math.sqrt(inter), gen)
    rows = []
    for block in blocks:
        if block == "shape":
            options = {}
            n = e
        else:
            options = model_block_options(name, e, h, inter, gen)
            n = e + options.get("num_shared_experts", 0)
        rows += bench_block(name, block, w13[:n], w2[:n], options, top_k, token_list,
                            copy_gbps, impls, log, vllm_ops, check, kernels)
        torch.cuda.empty_cache()
    del w13, w2
    torch.cuda.empty_cache()
    return rows


def print_table(result):
    header = (f"{'shape':<15}{'block':<7}{'T':>6}{'mxmoe ms':>10}{'bf16 ms':>10}{'fp8 ms':>10}"
              f"{'marlin ms':>10}{'floor ms':>10}{'x floor':>8}{'vs fp8':>8}{'vs bf16':>8}"
              f"{'vs marlin':>10}")
    print(f"GPU: {result['gpu']}  copy {result['copy_GBps']:.0f} GB/s  commit {result['commit']}")
    print(header)
    for row in result["rows"]:
        mx = row.get("mxmoe_ms")
        bf = row.get("torch_bf16_ms")
        f8 = row.get("torch_fp8_ms")
        ml = row.get("vllm_marlin_ms")
        floor = max(row["floor_bytes_ms"], row["floor_fp8_ms"])

        def fmt(v):
            return f"{v:10.3f}" if v is not None else f"{'-':>10}"

        def ratio(a, b):
            return f"{a / b:8.2f}" if a is not None and b is not None else f"{'-':>8}"

        print(f"{row['shape']:<15}{row.get('block', 'shape'):<7}{row['tokens']:>6}{fmt(mx)}"
              f"{fmt(bf)}{fmt(f8)}{fmt(ml)}{fmt(floor)}{ratio(mx, floor)}{ratio(f8, mx)}"
              f"{ratio(bf, mx)}  {ratio(ml, mx)}")
    print("x floor = mxmoe / max(bytes floor, fp8 floor); vs fp8 / vs bf16 / vs marlin = peer "
          "time / mxmoe time (> 1: mxmoe faster); block: shape = Qwen3-style block, model = the "
          "model's own")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--blocks", choices=("shape", "model", "both"), default="both",
                        help="shape: the Qwen3-style block at each shape; model: the real block "
                             "of gpt-oss-120b / deepseek-v3; both (default)")
    parser.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    parser.add_argument("--impls", nargs="*", default=["mxmoe", "torch_bf16", "torch_fp8"])
    parser.add_argument("--vllm", metavar="PATH",
                        help="a vLLM wheel or directory: adds the vllm_marlin peer "
                             "(bench/peers/vllm_marlin.py)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the accuracy columns (the float64 references)")
    parser.add_argument("--kernels", action="store_true",
                        help="add mxmoe_kernels_us: mxmoe's per-kernel device time per call "
                             "(torch.profiler, eager calls)")
    parser.add_argument("--commit", default=commit())
    args = parser.parse_args()
    if "vllm_marlin" in args.impls and not args.vllm:
        parser.error("--impls vllm_marlin needs --vllm PATH")
    if not torch.cuda.is_available():
        print("bench_moe: no CUDA device", file=sys.stderr)
        return 2
    vllm_ops = None
    if args.vllm:
        vllm_ops = load_vllm(args.vllm)  # fails loudly: a peer asked for is never dropped
        if "vllm_marlin" not in args.impls:
            args.impls.append("vllm_marlin")
    blocks = ["shape", "model"] if args.blocks == "both" else [args.blocks]
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    gpu = torch.cuda.get_device_name()
    copy_gbps = measure_copy_bandwidth()
    log(f"{gpu}: copy bandwidth {copy_gbps:.0f} GB/s; mxmoe backend "
        f"{mxmoe.backend_for(torch.empty(1, device='cuda'))}")
    rows = []
    result = {
        "gpu": gpu,
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy_GBps": copy_gbps,
        "fp8_peak_TFLOPs": FP8_PEAK_FLOPS / 1e12,
        "torch": torch.__version__,
        "peers": {"torch_bf16": "mxmoe.peers.TorchBf16Moe (torch._grouped_mm)",
                  "torch_fp8": "mxmoe.peers.TorchFp8Moe (torch._scaled_grouped_mm)",
                  **({"vllm_marlin": f"vLLM {vllm_ops.version} Marlin W4A16 MXFP4 MoE "
                                     f"(bench/peers/vllm_marlin.py)"} if vllm_ops else {})},
        "blocks": {"shape": SHAPE_BLOCK, "model": MODEL_BLOCKS,
                   "floors": "active routed experts + shared experts; bias bytes left out "
                             "(0.13% of an expert's MXFP4 bytes for GPT-OSS)"},
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{gpu_short_name(gpu)}-moe.json")
    for name in args.shapes:
        e, h, inter, top_k = SHAPES[name]
        rows += bench_shape(name, e, h, inter, top_k, blocks, args.tokens, copy_gbps, args.impls,
                            log, vllm_ops, not args.no_check, args.kernels)
        with open(path, "w") as f:  # after every shape: a run cut short keeps what it measured
            json.dump(result, f, indent=1)
        log(f"wrote {path} ({len(rows)} rows)")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
