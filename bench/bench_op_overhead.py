"""Per-call overhead of the torch custom ops (``torch.ops.mxmoe.*``) on the CPU.

For a no-op-sized call (one token, 32 columns) of quantize and moe_forward, times:
  - ``c_api``: the nanobind call alone, outputs and workspace preallocated (the floor);
  - ``direct``: the op's implementation called as a plain Python function (allocation + C
    call; ``mxmoe.library.DIRECT``), what mxmoe.ops calls in eager mode;
  - ``custom_op``: the same through ``torch.ops.mxmoe.<op>`` (the dispatcher), what a traced or
    compiled graph calls;
  - ``ops``: the public ``mxmoe.ops`` function in eager mode (argument checks + direct).
The dispatcher's cost is ``custom_op - direct``; eager mxmoe.ops calls do not pay it.

    python bench/bench_op_overhead.py [--out bench/results/cpu-op-overhead.json]

Limits: wall-clock medians of repeated loops on a possibly shared CPU; single-threaded calls.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from mxmoe import _mxmoe, library, ops


def _median_us(fn, iters: int, repeats: int) -> float:
    for _ in range(iters // 10):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results", "cpu-op-overhead.json"))
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)

    x = torch.randn(1, 32).to(torch.bfloat16)
    packed = torch.empty(1, 16, dtype=torch.uint8)
    scales = torch.empty(1, 1, dtype=torch.uint8)
    lin = _mxmoe.SCALE_LAYOUT_LINEAR
    quantize = {
        "c_api": lambda: _mxmoe.quantize(x, packed, scales, lin, 0),
        "direct": lambda: library.DIRECT.quantize(x, lin),
        "custom_op": lambda: torch.ops.mxmoe.quantize(x, lin),
        "ops": lambda: ops.quantize(x),
    }

    e, h, i, top_k = 2, 32, 32, 1
    w13p, w13s = ops.quantize_weights(torch.randn(e, 2 * i, h).to(torch.bfloat16))
    w2p, w2s = ops.quantize_weights(torch.randn(e, h, i).to(torch.bfloat16))
    hidden = torch.randn(1, h).to(torch.bfloat16)
    logits = torch.randn(1, e)
    out = torch.empty(1, h, dtype=torch.bfloat16)
    fmt, auto = _mxmoe.WEIGHT_FORMAT_LINEAR, _mxmoe.BACKEND_AUTO
    op_args = (hidden, w13p, w13s, w2p, w2s, fmt, auto, e, i, e, top_k, True, logits, None,
               None, None)
    nbytes = _mxmoe.moe_forward_workspace_size(*op_args, out)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    moe = {
        "c_api": lambda: _mxmoe.moe_forward(*op_args, out, workspace, 0),
        "direct": lambda: library.DIRECT.moe_forward(*op_args),
        "custom_op": lambda: torch.ops.mxmoe.moe_forward(*op_args),
        "ops": lambda: ops.moe_forward(hidden, w13p, w13s, w2p, w2s, router_logits=logits,
                                       top_k=top_k),
    }

    results = {}
    for name, calls in (("quantize [1, 32]", quantize),
                        (f"moe_forward T=1 E={e} H={h} I={i}", moe)):
        row = {k: round(_median_us(fn, args.iters, args.repeats), 2) for k, fn in calls.items()}
        row["dispatcher_us"] = round(row["custom_op"] - row["direct"], 2)
        results[name] = row
        print(f"{name:34s} " + "  ".join(f"{k}={v:.2f}us" for k, v in row.items()))

    record = {
        "benchmark": "bench_op_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                   f"(shared)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "unit": "microseconds per call, median of repeated loops, 1 thread",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
