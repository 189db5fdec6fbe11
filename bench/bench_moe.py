"""Whole-layer MoE benchmark (docs/design.md protocol): mxmoe beside torch peers and floors.

One run on one GPU. For each model shape, block and token count T, the full layer (routing
through output, same router logits for everyone) is timed for
  mxmoe       mxmoe.ops.moe_forward on MXFP4 weights (W4A4),
  torch_bf16  a torch MoE with bf16 weights via torch._grouped_mm,
  torch_fp8   a torch MoE with FP8 rowwise weights and activations via torch._scaled_grouped_mm
(mxmoe.peers; the peers route in torch, mxmoe in its own kernel),
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

Accuracy (row key mxmoe_rel_l2_vs_bf16): the mxmoe layer against the bf16 peer on the same block,
both routed by the contract's routing (the peer gets mxmoe.ops.route's ids and weights), on the
first input set. peer_routing_id_match: the fraction of tokens for which the peers' own torch
routing (the timed one) picks the same experts as mxmoe.ops.route (below 1.0 only on
near-ties).

Usage: python bench/bench_moe.py --out DIR [--shapes ...] [--blocks shape|model|both]
                                 [--tokens ...] [--impls ...] [--commit SHA]
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

import mxmoe
from mxmoe import ops
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


def bench_block(name, block, w13, w2, options, top_k, token_list, copy_gbps, impls, log):
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
    del w13_packed, w13_scales, w2_packed, w2_scales
    peers = {}
    if "torch_bf16" in impls:
        peers["torch_bf16"] = TorchBf16Moe(w13, w2, top_k, **options)
    if "torch_fp8" in impls:
        peers["torch_fp8"] = TorchFp8Moe(w13, w2, top_k, **options)
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
        experts = sum(torch.unique(ids).numel() for ids, _ in routed) / len(routed) + shared
        row["active_experts"] = experts
        row["floor_bytes_ms"] = experts * mxfp4_expert_bytes(h, inter) / (copy_gbps * 1e9) * 1e3
        flops = 2 * tokens * (top_k + shared) * (h * 2 * inter + inter * h)
        row["floor_fp8_ms"] = flops / FP8_PEAK_FLOPS * 1e3
        if peers:
            peer_block = next(iter(peers.values())).block
            same = [(peer_route(lg, peer_block)[0].sort(dim=1).values ==
                     ids.long().sort(dim=1).values).all(dim=1)
                    for (_, lg), (ids, _) in zip(inputs, routed, strict=True)]
            row["peer_routing_id_match"] = float(torch.cat(same).float().mean())
        if "mxmoe" in impls:
            try:
                fns = [lambda x=x, lg=lg: ops.moe_forward(x, *mx_weights, router_logits=lg,
                                                          top_k=top_k, renormalize=True,
                                                          **options)
                       for x, lg in inputs]
                row["mxmoe_ms"] = time_calls(fns, use_graph)
                x, lg = inputs[0]
                out = ops.moe_forward(x, *mx_weights, router_logits=lg, top_k=top_k,
                                      renormalize=True, **options)
                if "torch_bf16" in peers:
                    ids, weights = routed[0]
                    ref = peers["torch_bf16"](x, topk_ids=ids, topk_weights=weights)
                    row["mxmoe_rel_l2_vs_bf16"] = rel_l2(out, ref)
            except Exception as exc:
                row["mxmoe_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for peer_name, peer in peers.items():
            try:
                fns = [lambda x=x, lg=lg, peer=peer: peer(x, lg) for x, lg in inputs]
                row[f"{peer_name}_ms"] = time_calls(fns, use_graph)
            except Exception as exc:
                row[f"{peer_name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        log("   " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in row.items()}))
        del inputs, routed
        torch.cuda.empty_cache()
    return rows  # the caller empties the cache once this block's weights are released


def bench_shape(name, e, h, inter, top_k, blocks, token_list, copy_gbps, impls, log):
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
                            copy_gbps, impls, log)
        torch.cuda.empty_cache()
    del w13, w2
    torch.cuda.empty_cache()
    return rows


def print_table(result):
    header = (f"{'shape':<15}{'block':<7}{'T':>6}{'mxmoe ms':>10}{'bf16 ms':>10}{'fp8 ms':>10}"
              f"{'floor ms':>10}{'x floor':>8}{'vs fp8':>8}{'vs bf16':>8}")
    print(f"GPU: {result['gpu']}  copy {result['copy_GBps']:.0f} GB/s  commit {result['commit']}")
    print(header)
    for row in result["rows"]:
        mx = row.get("mxmoe_ms")
        bf = row.get("torch_bf16_ms")
        f8 = row.get("torch_fp8_ms")
        floor = max(row["floor_bytes_ms"], row["floor_fp8_ms"])

        def fmt(v):
            return f"{v:10.3f}" if v is not None else f"{'-':>10}"

        def ratio(a, b):
            return f"{a / b:8.2f}" if a is not None and b is not None else f"{'-':>8}"

        print(f"{row['shape']:<15}{row.get('block', 'shape'):<7}{row['tokens']:>6}{fmt(mx)}"
              f"{fmt(bf)}{fmt(f8)}{fmt(floor)}{ratio(mx, floor)}{ratio(f8, mx)}{ratio(bf, mx)}")
    print("x floor = mxmoe / max(bytes floor, fp8 floor); vs fp8 / vs bf16 = peer time / mxmoe "
          "time (> 1: mxmoe faster); block: shape = Qwen3-style block, model = the model's own")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--blocks", choices=("shape", "model", "both"), default="both",
                        help="shape: the Qwen3-style block at each shape; model: the real block "
                             "of gpt-oss-120b / deepseek-v3; both (default)")
    parser.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    parser.add_argument("--impls", nargs="*", default=["mxmoe", "torch_bf16", "torch_fp8"])
    parser.add_argument("--commit", default=commit())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe: no CUDA device", file=sys.stderr)
        return 2
    blocks = ["shape", "model"] if args.blocks == "both" else [args.blocks]
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    gpu = torch.cuda.get_device_name()
    copy_gbps = measure_copy_bandwidth()
    log(f"{gpu}: copy bandwidth {copy_gbps:.0f} GB/s; mxmoe backend "
        f"{mxmoe.backend_for(torch.empty(1, device='cuda'))}")
    rows = []
    for name in args.shapes:
        e, h, inter, top_k = SHAPES[name]
        rows += bench_shape(name, e, h, inter, top_k, blocks, args.tokens, copy_gbps, args.impls,
                            log)
    result = {
        "gpu": gpu,
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy_GBps": copy_gbps,
        "fp8_peak_TFLOPs": FP8_PEAK_FLOPS / 1e12,
        "blocks": {"shape": SHAPE_BLOCK, "model": MODEL_BLOCKS,
                   "floors": "active routed experts + shared experts; bias bytes left out "
                             "(0.13% of an expert's MXFP4 bytes for GPT-OSS)"},
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{gpu_short_name(gpu)}-moe.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {path}")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
