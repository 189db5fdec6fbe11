"""CPU MoE-layer benchmark (docs/design.md "Benchmark protocol", on the host): mxmoe CPU beside
torch per-expert loops, in one run on one machine.

For each shape and token count T, the whole layer (routing through output, the same seeded
random-normal router logits for everyone) is timed for
  mxmoe          ops.moe_forward on prepared MXFP4 weights (ops.prepare_weights, what MoELayer
                 uses on the CPU),
  mxmoe_linear   ops.moe_forward on LINEAR MXFP4 weights (the GEMM decodes weight tiles per call),
  torch_bf16     a transformers-style per-expert loop (softmax, top-k, renormalise, one matmul per
                 active expert for [gate | up], SiLU-and-mul, the down matmul, index_add) on bf16
                 weights,
  torch_fp32     the same loop on fp32 weights.
Times are medians of wall-clock (time.perf_counter) calls after warm-up, `<impl>_ms`, next to
the medians of the process CPU time of the same calls (all threads), `<impl>_cpu_ms`: on a
shared, oversubscribed host the wall times mostly measure the scheduler, the CPU times the work.
Calls cycle over ROTATIONS router-logit sets so that successive calls route to different experts.
mxmoe and torch use the same thread count (--threads, default torch.get_num_threads(), passed
to mxmoe as MXMOE_CPU_THREADS). The prepared and LINEAR mxmoe outputs are checked to be
bit-identical in every row. torch's per-expert loops spin in OpenMP barriers, so their CPU time
includes waiting when the host is oversubscribed; --threads 1 avoids that.

The host may be shared: the load average (os.getloadavg) is recorded before and after each row.

Usage: python bench/bench_cpu_moe.py [--out bench/results] [--shapes small qwen3-30b-a3b]
         [--tokens 1 16 64 256] [--min-seconds 1] [--threads N]
Writes OUT/cpu-moe.json (keys gpu = "cpu: <model name>", commit, date, threads, rows) and prints a
table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, commit, print_table, utc_now  # noqa: E402

CPU_SHAPES = {"small": (16, 512, 256, 4), **SHAPES}
ROTATIONS = 4


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def time_calls(fns, min_seconds: float, min_repeats: int = 5,
               max_repeats: int = 200) -> tuple[float, float]:
    """(wall, cpu) median milliseconds of fns[i % len(fns)]() after one warm-up pass over all of
    them; cpu is the process CPU time of the call summed over all threads."""
    for fn in fns:
        fn()
    wall, cpu = [], []
    start = time.perf_counter()
    i = 0
    while len(wall) < max_repeats and (len(wall) < min_repeats
                                       or time.perf_counter() - start < min_seconds):
        t0, c0 = time.perf_counter(), time.process_time()
        fns[i % len(fns)]()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        i += 1
    return statistics.median(wall), statistics.median(cpu)


def torch_loop_moe(hidden, logits, w13, w2, top_k):
    """transformers' per-expert MoE loop (Qwen3-MoE style) in the weights' dtype."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(w13.dtype)
    x_all = hidden.to(w13.dtype)
    out = torch.zeros_like(x_all)
    mask = torch.nn.functional.one_hot(ids, num_classes=w13.shape[0]).permute(2, 1, 0)
    inter = w2.shape[2]
    for e in torch.nonzero(mask.sum(dim=(-1, -2)) > 0).flatten().tolist():
        slot, token = torch.where(mask[e])
        x = x_all[token]
        gate_up = x @ w13[e].t()
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = (h @ w2[e].t()) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out.to(hidden.dtype)


def bench_shape(name, tokens_list, min_seconds, seed, ops):
    e, h, inter, top_k = CPU_SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, inter, generator=gen) / inter**0.5).to(torch.bfloat16)
    w13_q = ops.quantize_weights(w13)
    w2_q = ops.quantize_weights(w2)
    w13_p = ops.prepare_weights(*w13_q)
    w2_p = ops.prepare_weights(*w2_q)
    w13_f, w2_f = w13.float(), w2.float()
    rows = []
    for t in tokens_list:
        load_before = os.getloadavg()[0]
        inputs = [(torch.randn(t, h, generator=gen).to(torch.bfloat16),
                   torch.randn(t, e, generator=gen)) for _ in range(ROTATIONS)]
        for x, logits in inputs:  # the prepared layout must not change a single bit
            a = ops.moe_forward(x, w13_p, None, w2_p, None, router_logits=logits, top_k=top_k)
            b = ops.moe_forward(x, *w13_q, *w2_q, router_logits=logits, top_k=top_k)
            if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
                raise SystemExit(f"{name} T={t}: prepared and LINEAR outputs differ")

        def mx(p13, s13, p2, s2):
            return [lambda x=x, lg=lg: ops.moe_forward(x, p13, s13, p2, s2, router_logits=lg,
                                                       top_k=top_k) for x, lg in inputs]

        row = {"shape": name, "tokens": t}
        timed = [("mxmoe", mx(w13_p, None, w2_p, None)), ("mxmoe_linear", mx(*w13_q, *w2_q))]
        for impl, a13, a2 in (("torch_bf16", w13, w2), ("torch_fp32", w13_f, w2_f)):
            timed.append((impl, [lambda x=x, lg=lg, a13=a13, a2=a2:
                                 torch_loop_moe(x, lg, a13, a2, top_k) for x, lg in inputs]))
        with torch.inference_mode():
            for impl, fns in timed:
                row[f"{impl}_ms"], row[f"{impl}_cpu_ms"] = time_calls(fns, min_seconds)
        row["load_before"] = round(load_before, 2)
        row["load_after"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--shapes", nargs="+", default=["small", "qwen3-30b-a3b"],
                        choices=list(CPU_SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="time each implementation for at least this long per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and mxmoe threads (default: torch.get_num_threads())")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["MXMOE_CPU_THREADS"] = str(args.threads)
    threads = torch.get_num_threads()
    os.environ.setdefault("MXMOE_CPU_THREADS", str(threads))  # read once, at mxmoe's first call
    from mxmoe import ops

    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.tokens, args.min_seconds, args.seed, ops)
    result = {"gpu": f"cpu: {cpu_name()}", "commit": args.commit or commit(), "date": utc_now(),
              "threads": threads, "mxmoe_cpu_threads": os.environ["MXMOE_CPU_THREADS"],
              "rows": rows}
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "cpu-moe.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {path}")
    headers = ["shape", "T", "mxmoe ms", "linear ms", "bf16 ms", "fp32 ms", "bf16/mxmoe",
               "cpu: mxmoe ms", "bf16 ms", "bf16/mxmoe", "load"]
    table = [[r["shape"], r["tokens"], f"{r['mxmoe_ms']:.2f}", f"{r['mxmoe_linear_ms']:.2f}",
              f"{r['torch_bf16_ms']:.2f}", f"{r['torch_fp32_ms']:.2f}",
              f"{r['torch_bf16_ms'] / r['mxmoe_ms']:.2f}x", f"{r['mxmoe_cpu_ms']:.2f}",
              f"{r['torch_bf16_cpu_ms']:.2f}",
              f"{r['torch_bf16_cpu_ms'] / r['mxmoe_cpu_ms']:.2f}x",
              f"{r['load_before']}/{r['load_after']}"] for r in rows]
    print_table(headers, table, title=f"{result['gpu']}, {threads} threads, {result['commit']}")


if __name__ == "__main__":
    main()
