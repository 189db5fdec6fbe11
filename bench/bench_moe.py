"""Whole-layer MoE benchmark (docs/design.md protocol): mxmoe beside torch peers and floors.

One run on one GPU. For each model shape and token count T, the full layer (routing through
output, same router logits for everyone) is timed for
  mxmoe       mxmoe.ops.moe_forward on MXFP4 weights (W4A4),
  torch_bf16  a torch MoE with bf16 weights via torch._grouped_mm,
  torch_fp8   a torch MoE with FP8 rowwise weights and activations via torch._scaled_grouped_mm,
next to the floors: bytes of the active experts' MXFP4 weights and scales over the device-to-device
copy bandwidth measured in this run, and the GEMM FLOPs over the FP8 dense peak (1979 TFLOP/s).
Times are medians of CUDA-event timings; small T replays CUDA graphs; inputs rotate over several
sets so successive iterations route to different experts (weights are not served from L2).
The quantization error of the mxmoe layer against the unquantized bf16 layer is reported per row.

Usage: python bench/bench_moe.py --out DIR [--shapes ...] [--tokens ...] [--commit SHA]
Writes DIR/<gpu>-moe.json (keys gpu, commit, date, copy_GBps, rows) and prints a table last.
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

FP8_PEAK_FLOPS = 1979e12
ROTATIONS = 4
GRAPH_MAX_TOKENS = 256


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


def active_experts(logits_sets, top_k: int) -> float:
    counts = []
    for logits in logits_sets:
        ids = torch.topk(logits.float(), top_k, dim=-1).indices
        counts.append(torch.unique(ids).numel())
    return sum(counts) / len(counts)


def random_bf16(shape, std, gen):
    """Normal(0, std) bf16 tensor on the GPU, generated expert by expert (no fp32 copy of all)."""
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    for e in range(shape[0]):
        out[e] = (torch.randn(shape[1:], device="cuda", generator=gen) * std).bfloat16()
    return out


def bench_shape(name, e, h, inter, top_k, token_list, copy_gbps, impls, log):
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    log(f"[{name}] generating weights E={e} H={h} I={inter}")
    w13 = random_bf16((e, 2 * inter, h), 1 / math.sqrt(h), gen)
    w2 = random_bf16((e, h, inter), 1 / math.sqrt(inter), gen)
    w13_packed, w13_scales = ops.quantize_weights(w13)
    w2_packed, w2_scales = ops.quantize_weights(w2)
    # Prepared once, as MoELayer does: the backend's fastest layout.
    mx_weights = (ops.prepare_weights(w13_packed, w13_scales), None,
                  ops.prepare_weights(w2_packed, w2_scales), None)
    del w13_packed, w13_scales, w2_packed, w2_scales
    peers = {}
    if "torch_bf16" in impls:
        peers["torch_bf16"] = TorchBf16Moe(w13, w2, top_k)
    if "torch_fp8" in impls:
        peers["torch_fp8"] = TorchFp8Moe(w13, w2, top_k)
    for tokens in token_list:
        log(f"[{name}] T={tokens}")
        inputs = [
            (torch.randn(tokens, h, device="cuda", generator=gen).bfloat16(),
             torch.randn(tokens, e, device="cuda", generator=gen))
            for _ in range(ROTATIONS)
        ]
        use_graph = tokens <= GRAPH_MAX_TOKENS
        row = {"shape": name, "tokens": tokens, "graph": use_graph}
        experts = active_experts([lg for _, lg in inputs], top_k)
        row["active_experts"] = experts
        row["floor_bytes_ms"] = experts * mxfp4_expert_bytes(h, inter) / (copy_gbps * 1e9) * 1e3
        flops = 2 * tokens * top_k * (h * 2 * inter + inter * h)
        row["floor_fp8_ms"] = flops / FP8_PEAK_FLOPS * 1e3
        if "mxmoe" in impls:
            try:
                fns = [lambda x=x, lg=lg: ops.moe_forward(x, *mx_weights, router_logits=lg,
                                                          top_k=top_k, renormalize=True)
                       for x, lg in inputs]
                row["mxmoe_ms"] = time_calls(fns, use_graph)
                x, lg = inputs[0]
                out = ops.moe_forward(x, *mx_weights, router_logits=lg, top_k=top_k)
                if "torch_bf16" in peers:
                    row["mxmoe_rel_l2_vs_bf16"] = rel_l2(out, peers["torch_bf16"](x, lg))
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
        del inputs
        torch.cuda.empty_cache()
    del w13, w2, peers
    torch.cuda.empty_cache()
    return rows


def print_table(result):
    header = (f"{'shape':<15}{'T':>6}{'mxmoe ms':>10}{'bf16 ms':>10}{'fp8 ms':>10}"
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

        print(f"{row['shape']:<15}{row['tokens']:>6}{fmt(mx)}{fmt(bf)}{fmt(f8)}{fmt(floor)}"
              f"{ratio(mx, floor)}{ratio(f8, mx)}{ratio(bf, mx)}")
    print("x floor = mxmoe / max(bytes floor, fp8 floor); vs fp8 / vs bf16 = peer time / mxmoe "
          "time (> 1: mxmoe faster)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    parser.add_argument("--impls", nargs="*", default=["mxmoe", "torch_bf16", "torch_fp8"])
    parser.add_argument("--commit", default=commit())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe: no CUDA device", file=sys.stderr)
        return 2
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
        rows += bench_shape(name, e, h, inter, top_k, args.tokens, copy_gbps, args.impls, log)
    result = {
        "gpu": gpu,
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy_GBps": copy_gbps,
        "fp8_peak_TFLOPs": FP8_PEAK_FLOPS / 1e12,
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
