"""Grouped-GEMM benchmark (docs/design.md, Benchmark protocol): mxmoe beside torch peers and floors.

One run on one GPU. For each model shape, each of the layer's two GEMMs (``w13``: N = 2I, K = H;
``w2``: N = H, K = I) and each token count T (rows = T * top_k routed by seeded random-normal
logits, ``common.route``), time
  mxmoe       the W4A4 MXFP4 grouped GEMM on prepared weights (activations already MXFP4, the
              per-call E4M3 conversion included), through ``mxmoe.ops.grouped_gemm``, or, when
              the Python extension cannot serve it, through the standalone C++ benchmark
              ``--mxmoe-bin`` (tests/gpu/grouped_gemm_sm90_test) on the same routing;
  torch_bf16  ``torch._grouped_mm`` on bf16 activations and weights;
  torch_fp8   ``torch._scaled_grouped_mm`` on FP8 e4m3 activations (rowwise scales) and weights
              (per output channel scales), activations already quantized,
next to the floors: bytes of the active experts' MXFP4 weights and scales over the
device-to-device copy bandwidth measured in this run, and the GEMM FLOPs over the FP8 dense peak
(1979 TFLOP/s). Medians of CUDA-event timings of CUDA-graph replays; weights rotate over several
copies where the active experts' bytes would otherwise fit in L2.

Usage: python bench/bench_gemm.py --out DIR [--shapes ...] [--tokens ...] [--mxmoe-bin PATH]
Writes DIR/<gpu>-gemm.json (keys gpu, commit, date, copy_GBps, rows) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

FP8_PEAK_FLOPS = 1979e12
MAX_ROTATION_BYTES = 12 << 30


def _mxmoe_ops():
    """mxmoe.ops if the extension imports and serves sm90 grouped GEMMs here, else None."""
    try:
        from mxmoe import ops
    except Exception as err:
        print(f"mxmoe python package unavailable ({err}); using --mxmoe-bin if given")
        return None
    return ops


def _offsets(m: list[int], device) -> torch.Tensor:
    return torch.tensor([sum(m[: i + 1]) for i in range(len(m))], dtype=torch.int32,
                        device=device)


def _time(calls, rows: int) -> float:
    """Median ms per call; short graphs (and fewer repeats) for the big, long-running cases."""
    if rows <= 2048:
        return common.time_graph(calls, calls_per_graph=20, repeats=25)
    return common.time_graph(calls, calls_per_graph=2, repeats=10)


def _random_weights(e: int, n: int, k: int, dtype) -> torch.Tensor:
    """[E, N, K] random normal weights, made one expert at a time (no full fp32 temporary)."""
    w = torch.empty(e, n, k, dtype=dtype, device="cuda")
    for j in range(e):
        w[j] = torch.randn(n, k, device="cuda").to(dtype)
    return w


def _copies(active_bytes: int, weight_bytes: int) -> int:
    copies = common.rotation_sets(max(active_bytes, 1), most=8)
    return max(1, min(copies, MAX_ROTATION_BYTES // max(weight_bytes, 1)))


class TorchPeers:
    """Weights for one (shape, gemm), made once and shared by every T: ``copies`` rotating sets
    (enough for the smallest T, capped by memory), bf16 and FP8 e4m3 with per-channel scales."""

    def __init__(self, e: int, n: int, k: int, active_min: int):
        self.e, self.n, self.k = e, n, k
        self.bf16 = [_random_weights(e, n, k, torch.bfloat16)
                     for _ in range(_copies(active_min * n * k * 2, e * n * k * 2))]
        self.fp8 = [w.to(torch.float8_e4m3fn) for w in self.bf16[:_copies(active_min * n * k,
                                                                          e * n * k)]]
        self.scale_b = torch.rand(e, n, device="cuda") + 0.5

    def _sets(self, ws, active_bytes: int):
        return ws[:_copies(active_bytes, 1)]

    def time_bf16(self, m: list[int]) -> float:
        rows, k = sum(m), self.k
        a = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
        offs = _offsets(m, "cuda")
        ws = self._sets(self.bf16, sum(1 for x in m if x) * self.n * k * 2)
        calls = [lambda w=w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs) for w in ws]
        return _time(calls, rows)

    def time_fp8(self, m: list[int]) -> float:
        rows, k = sum(m), self.k
        a = torch.randn(rows, k, device="cuda").to(torch.float8_e4m3fn)
        scale_a = torch.rand(rows, device="cuda") + 0.5
        offs = _offsets(m, "cuda")
        ws = self._sets(self.fp8, sum(1 for x in m if x) * self.n * k)
        calls = [
            lambda w=w: torch._scaled_grouped_mm(a, w.transpose(-2, -1), scale_a, self.scale_b,
                                                 offs=offs, out_dtype=torch.bfloat16)
            for w in ws
        ]
        return _time(calls, rows)


def time_mxmoe_python(ops, m: list[int], n: int, k: int) -> float:
    e, rows = len(m), sum(m)
    bso = [0]
    for x in m:
        bso.append(bso[-1] + (x + 127) // 128 * 128)
    eo = torch.tensor([0] + [sum(m[: i + 1]) for i in range(e)], dtype=torch.int32, device="cuda")
    bso_t = torch.tensor(bso, dtype=torch.int32, device="cuda")
    a = torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, device="cuda")
    a_scales = torch.randint(118, 128, (max(bso[-1], 1), (k // 32 + 3) // 4 * 4),
                             dtype=torch.uint8, device="cuda")
    active = sum(1 for x in m if x) * n * (k // 2 + k // 32)
    copies = _copies(active, e * n * (k // 2 + k // 32))
    prepared = []
    for _ in range(copies):
        packed = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device="cuda")
        scales = torch.randint(118, 128, (e, n, k // 32), dtype=torch.uint8, device="cuda")
        prepared.append(ops.prepare_weights(packed, scales))
        del packed, scales
    calls = [lambda w=w: ops.grouped_gemm(a, a_scales, w, None, eo, bso_t) for w in prepared]
    ms = _time(calls, rows)
    del prepared
    torch.cuda.empty_cache()
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=list(common.SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=common.TOKENS)
    parser.add_argument("--mxmoe-bin", default=None,
                        help="standalone C++ benchmark to time mxmoe when the extension can't")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    gpu = common.gpu_name()
    copy_gbps = common.measure_copy_bandwidth()
    ops = _mxmoe_ops()

    routing = {}
    for shape in args.shapes:
        e, h, i, top_k = common.SHAPES[shape]
        for t in args.tokens:
            routing[(shape, t)] = common.route(t, e, top_k, seed=1000 + t)

    mxmoe_cpp = {}
    if ops is None and args.mxmoe_bin:
        with tempfile.TemporaryDirectory() as tmp:
            route_path = os.path.join(tmp, "routing.txt")
            with open(route_path, "w") as f:
                for (shape, t), m in routing.items():
                    f.write(f"{shape} {t} {' '.join(map(str, m))}\n")
            json_path = os.path.join(tmp, "mxmoe.json")
            subprocess.run([args.mxmoe_bin, "--bench-only", "--routing", route_path, "--json",
                            json_path], check=True)
            with open(json_path) as f:
                for row in json.load(f)["rows"]:
                    mxmoe_cpp[(row["shape"], row["tokens"])] = row["mxmoe_ms"]

    rows = []

    def save() -> str:
        result = {"gpu": gpu, "commit": common.commit(), "date": common.utc_now(),
                  "copy_GBps": copy_gbps, "rows": rows}
        return common.write_results(args.out, "gemm", result)

    for shape in args.shapes:
        e, h, i, top_k = common.SHAPES[shape]
        for gemm, n, k in (("w13", 2 * i, h), ("w2", h, i)):
            peers = None
            if not args.no_torch:
                active_min = min(sum(1 for x in routing[(shape, t)] if x) for t in args.tokens)
                peers = TorchPeers(e, n, k, active_min)
            for t in args.tokens:
                m = routing[(shape, t)]
                total = sum(m)
                active = sum(1 for x in m if x)
                row = {
                    "shape": f"{shape}-{gemm}", "tokens": t, "rows": total, "n": n, "k": k,
                    "experts": e, "active_experts": active,
                    "floor_bytes_ms": active * n * (k // 2 + k // 32) / (copy_gbps * 1e9) * 1e3,
                    "floor_fp8_ms": 2.0 * total * n * k / FP8_PEAK_FLOPS * 1e3,
                }
                if ops is not None:
                    row["mxmoe_ms"] = time_mxmoe_python(ops, m, n, k)
                elif (f"{shape}-{gemm}", t) in mxmoe_cpp:
                    row["mxmoe_ms"] = mxmoe_cpp[(f"{shape}-{gemm}", t)]
                    row["mxmoe_source"] = "grouped_gemm_sm90_test"
                if peers is not None:
                    for name, fn in (("torch_bf16_ms", peers.time_bf16),
                                     ("torch_fp8_ms", peers.time_fp8)):
                        try:
                            row[name] = fn(m)
                        except Exception as err:
                            row[name] = None
                            row[name.replace("_ms", "_error")] = str(err).splitlines()[0][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
                save()  # after every row: a run cut short still leaves its numbers
            del peers
            torch.cuda.empty_cache()

    path = save()

    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    table = []
    for r in rows:
        mx = r.get("mxmoe_ms")
        table.append([r["shape"], r["tokens"], fmt(mx), fmt(r.get("torch_bf16_ms")),
                      fmt(r.get("torch_fp8_ms")), fmt(r["floor_bytes_ms"]),
                      fmt(r["floor_fp8_ms"]), ratio(r.get("torch_fp8_ms"), mx),
                      ratio(mx, r["floor_bytes_ms"]), ratio(r["floor_fp8_ms"], mx)])
    common.print_table(
        ["shape", "T", "mxmoe_ms", "bf16_ms", "fp8_ms", "bytes_floor", "fp8_floor",
         "fp8/mxmoe", "mxmoe/bytes", "frac_fp8_peak"], table,
        title=f"\n{gpu}, copy {copy_gbps:.0f} GB/s, results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
