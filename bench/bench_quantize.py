"""Quantize-suite benchmark (docs/design.md, Benchmark protocol): achieved bandwidth of the CUDA
per-expert quantizers next to the device-to-device copy bandwidth measured in the same run.

For each model shape and T in {1, 16, 64, 256, 1024, 4096, 16384} (rows = T * top_k, routed
top-k on seeded random-normal logits):
  experts_quantize           input [rows, H] bf16 (the first GEMM's input),
  silu_mul_experts_quantize  input [rows, 2I] bf16 (gate | up; the second GEMM's input).
bytes_moved = input read + packed codes written + scales written (swizzled, padding included)
+ the two offset arrays. Time: median of CUDA-event timings of CUDA-graph replays (each graph
runs 20 launches), the launches cycling over enough input sets that a cycle touches 4x the L2
size, so inputs come from device memory. Reported: ms, GB/s (bytes_moved / time), the ratio to
the copy bandwidth, and floor_bytes_ms = bytes_moved / copy bandwidth. Small and large T also
time a few variants for diagnosis (see SMALL_TOKENS, DIAGNOSTIC_TOKENS).

Goals (H100): >= 85% of the copy bandwidth where >= 64 MB move; < 5 us per launch for
the smallest cases.

Usage: python bench/bench_quantize.py --out DIR [--shapes ...] [--tokens ...] [--kernels ...]
Writes DIR/<gpu>-quantize.json (keys gpu, commit, date, copy_GBps, rows) and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import common
import torch

from mxmoe import _mxmoe, ops

KERNELS = ("experts_quantize", "silu_mul_experts_quantize")
GOAL_BYTES = 64 << 20
GOAL_RATIO = 0.85
GOAL_SMALL_US = 5.0
# Diagnostic timings (knobs of cc/cuda/quantize.cu): up to SMALL_TOKENS, units1_ms / units4_ms
# (lanes per thread forced to 1 / 4); from DIAGNOSTIC_TOKENS on, units2/4/8_ms, silu_reference_ms
# (format::SiluF32 itself instead of its faster copy) and linear_quantize_ms (plain row quantize).
SMALL_TOKENS = 64
DIAGNOSTIC_TOKENS = 4096


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@contextlib.contextmanager
def knobs(env: dict):
    """Sets environment variables (read by the library per call) for the duration."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def bench_case(shape: str, kernel: str, tokens: int, copy_gbps: float) -> dict:
    e, h, inter, top_k = common.SHAPES[shape]
    rows = tokens * top_k
    silu = kernel == "silu_mul_experts_quantize"
    width = inter if silu else h
    in_cols = 2 * inter if silu else h
    counts = common.route(tokens, e, top_k, seed=tokens * 1009 + e)
    eo, bo = ops.expert_offsets_from_counts(counts)
    scale_rows = int(bo[-1])
    scale_cols = round_up(width // 32, 4)
    bytes_moved = rows * in_cols * 2 + rows * width // 2 + scale_rows * scale_cols + 2 * 4 * (e + 1)
    eo, bo = eo.cuda(), bo.cuda()
    sets = common.rotation_sets(bytes_moved)
    fn = _mxmoe.silu_mul_experts_quantize if silu else _mxmoe.experts_quantize
    inputs = [torch.randn(rows, in_cols, device="cuda").to(torch.bfloat16) for _ in range(sets)]
    calls = []
    for x in inputs:
        packed = torch.empty(rows, width // 2, dtype=torch.uint8, device="cuda")
        scales = torch.empty(scale_rows, scale_cols, dtype=torch.uint8, device="cuda")
        calls.append(lambda x=x, p=packed, s=scales: fn(
            x, eo, bo, p, s, torch.cuda.current_stream().cuda_stream))
    ms = common.time_graph(calls)
    gbps = bytes_moved / (ms * 1e-3) / 1e9
    extra = {}
    # Diagnostics, for tuning: the same launches with a knob of cc/cuda/quantize.cu changed.
    variants = {}
    if tokens <= SMALL_TOKENS:
        variants["units1_ms"] = {"MXMOE_QUANTIZE_UNITS": "1"}
        variants["units4_ms"] = {"MXMOE_QUANTIZE_UNITS": "4"}
    if tokens >= DIAGNOSTIC_TOKENS:
        for units in (2, 4, 8):
            variants[f"units{units}_ms"] = {"MXMOE_QUANTIZE_UNITS": str(units)}
    for name, env in variants.items():
        with knobs(env):
            extra[name] = common.time_graph(calls)
    if tokens >= DIAGNOSTIC_TOKENS and not silu:
        # The plain row quantizer (linear scales, no expert mapping) on the same inputs.
        linear = []
        for x in inputs:
            p = torch.empty(rows, width // 2, dtype=torch.uint8, device="cuda")
            s = torch.empty(rows, width // 32, dtype=torch.uint8, device="cuda")
            linear.append(lambda x=x, p=p, s=s: _mxmoe.quantize(
                x, p, s, _mxmoe.SCALE_LAYOUT_LINEAR, torch.cuda.current_stream().cuda_stream))
        extra["linear_quantize_ms"] = common.time_graph(linear)
    return {
        "shape": shape,
        "kernel": kernel,
        "tokens": tokens,
        "rows": rows,
        "experts": e,
        "k": width,
        "input_cols": in_cols,
        "input_sets": sets,
        "bytes_moved": bytes_moved,
        "mxmoe_ms": ms,
        "GBps": gbps,
        "copy_ratio": gbps / copy_gbps,
        "floor_bytes_ms": bytes_moved / (copy_gbps * 1e9) * 1e3,
        **extra,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for <gpu>-quantize.json")
    parser.add_argument("--shapes", nargs="*", default=list(common.SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=common.TOKENS)
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=KERNELS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_quantize: no CUDA device", file=sys.stderr)
        return 2
    started = time.time()
    gpu = common.gpu_name()
    copy_gbps = common.measure_copy_bandwidth()
    print(f"[{time.time() - started:6.1f}s] {gpu}: copy bandwidth {copy_gbps:.0f} GB/s "
          f"(1 GiB device-to-device, read + write)", flush=True)
    rows = []
    for shape in args.shapes:
        for kernel in args.kernels:
            for tokens in args.tokens:
                row = bench_case(shape, kernel, tokens, copy_gbps)
                rows.append(row)
                print(f"[{time.time() - started:6.1f}s] {shape} {kernel} T={tokens}: "
                      f"{row['mxmoe_ms'] * 1e3:.2f} us, {row['GBps']:.0f} GB/s", flush=True)
                torch.cuda.empty_cache()
    result = {
        "gpu": gpu,
        "commit": common.commit(),
        "date": common.utc_now(),
        "copy_GBps": copy_gbps,
        "goals": {"min_copy_ratio_at_64MB": GOAL_RATIO, "max_small_launch_us": GOAL_SMALL_US},
        "rows": rows,
    }
    path = common.write_results(args.out, "quantize", result)
    print(f"wrote {path}")

    big = [r for r in rows if r["bytes_moved"] >= GOAL_BYTES]
    small_t = min(args.tokens)
    small = [r for r in rows if r["tokens"] == small_t]
    table = [[r["shape"], r["kernel"].replace("_experts_quantize", ""), r["tokens"], r["rows"],
              f"{r['bytes_moved'] / 1e6:.2f}", f"{r['mxmoe_ms'] * 1e3:.2f}", f"{r['GBps']:.0f}",
              f"{100 * r['copy_ratio']:.0f}%"] for r in rows]
    common.print_table(["shape", "kernel", "T", "rows", "MB", "us", "GB/s", "of copy"], table,
                       title=f"\n{gpu}: quantize suite, copy bandwidth {copy_gbps:.0f} GB/s")
    worst_big = min((r["copy_ratio"] for r in big), default=None)
    worst_small = max((r["mxmoe_ms"] * 1e3 for r in small), default=None)
    if worst_big is not None:
        verdict = "met" if worst_big >= GOAL_RATIO else "MISSED"
        print(f"goal >= {GOAL_RATIO:.0%} of copy bandwidth at >= 64 MB: {verdict} "
              f"(worst {worst_big:.0%} over {len(big)} cases)")
    if worst_small is not None:
        verdict = "met" if worst_small < GOAL_SMALL_US else "MISSED"
        print(f"goal < {GOAL_SMALL_US:.0f} us per launch at T={small_t} (graph replay): {verdict} "
              f"(worst {worst_small:.2f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
