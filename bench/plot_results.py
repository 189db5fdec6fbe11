"""Draws one PNG per model shape from a bench/results JSON file (docs/design.md).

Time against tokens T (log-log) for every implementation in the file (`<impl>_ms` keys), with the
floor (the larger of the MXFP4 weight-bytes floor and the FP8-peak floor) as a dashed line.

Usage: python bench/plot_results.py bench/results/h100-moe.json [--out bench/results]
Writes <out>/<stem>-<shape>.png (e.g. h100-moe-gpt-oss-120b.png; -<shape>-model.png for a real
model block of bench_moe.py). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "mxmoe_ms": "mxmoe (MXFP4 W4A4)",
    "torch_bf16_ms": "torch bf16 (_grouped_mm)",
    "torch_fp8_ms": "torch FP8 rowwise (_scaled_grouped_mm)",
    "vllm_marlin_ms": "vLLM Marlin MXFP4 W4A16 (moe_wna16_marlin_gemm)",
}


def plot(path: str, out_dir: str) -> list[str]:
    with open(path) as f:
        result = json.load(f)
    stem = os.path.splitext(os.path.basename(path))[0]
    # One figure per (shape, block): bench_moe.py's rows carry "block" ("shape" or "model").
    groups = list(dict.fromkeys((row["shape"], row.get("block", "shape"))
                                for row in result["rows"]))
    written = []
    for shape, block in groups:
        rows = sorted((r for r in result["rows"]
                       if r["shape"] == shape and r.get("block", "shape") == block),
                      key=lambda r: r["tokens"])
        name = shape if block == "shape" else f"{shape}-{block}"
        tokens = [r["tokens"] for r in rows]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        impls = [k for k in LABELS if any(k in r for r in rows)]
        for impl in impls:
            points = [(r["tokens"], r[impl]) for r in rows if r.get(impl) is not None]
            ax.plot(*zip(*points, strict=False), marker="o", label=LABELS[impl])
        floor = [max(r.get("floor_bytes_ms", 0.0), r.get("floor_fp8_ms", 0.0)) for r in rows]
        ax.plot(tokens, floor, "k--", label="floor: max(MXFP4 bytes / copy BW, FLOPs / FP8 peak)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time per layer (ms)")
        ax.set_title(f"{name}: {result['gpu']}\n(copy {result['copy_GBps']:.0f} GB/s, "
                     f"commit {result['commit'][:10]})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = os.path.join(out_dir, f"{stem}-{name}.png")
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default=None, help="output folder (default: the JSON's)")
    args = parser.parse_args()
    for path in args.results:
        for target in plot(path, args.out or os.path.dirname(path) or "."):
            print(target)


if __name__ == "__main__":
    main()
