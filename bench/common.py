"""Helpers shared by the benchmark scripts (the protocol of docs/design.md).

- ``SHAPES`` / ``TOKENS``: the three model shapes and the token counts every suite sweeps.
- ``gpu_name`` / ``gpu_short_name`` / ``commit``: what a results file names.
- ``measure_copy_bandwidth``: device-to-device copy GB/s (bytes read + written) in this run.
- ``time_graph``: median milliseconds per call, CUDA graphs replayed and timed with CUDA events,
  calls cycling over several input sets so that repeated calls do not hit in L2.
- ``route``: seeded random-normal router logits -> top-k -> rows per expert.
- ``write_results`` / ``print_table``: bench/results-style JSON and a plain table.

Limits: CUDA only (every function that times needs a GPU); one device (the current one).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import torch

from mxmoe.measure import cuda_event_ms

SHAPES = {
    # name: (E, H, I, top_k)
    "gpt-oss-120b": (128, 2880, 2880, 4),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3": (256, 7168, 2048, 8),
}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


def gpu_name() -> str:
    """The device name as the driver reports it (e.g. 'NVIDIA H100 80GB HBM3')."""
    return torch.cuda.get_device_name()


def gpu_short_name(name: str) -> str:
    """'h100', 'h200', ... for results file names."""
    lowered = name.lower()
    for key in ("gh200", "h200", "h100", "gb200", "b200", "a100"):
        if key in lowered:
            return key
    return "".join(c if c.isalnum() else "-" for c in lowered).strip("-")


def commit() -> str:
    """MXMOE_COMMIT, else the COMMIT file tools/gpu/pack.sh writes, else git, else 'unknown'."""
    if os.environ.get("MXMOE_COMMIT"):
        return os.environ["MXMOE_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "..", "COMMIT"), os.path.join(here, "COMMIT")):
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def measure_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy GB/s of ``nbytes`` (>= 1 GB), counting bytes read plus written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = cuda_event_ms(lambda: dst.copy_(src), repeats) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


def rotation_sets(bytes_per_call: int, min_total: int | None = None, most: int = 16) -> int:
    """How many input sets to cycle so that one cycle touches ``min_total`` bytes (default
    4x the L2 size), capped at ``most``."""
    if min_total is None:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        min_total = 4 * l2
    return max(1, min(most, -(-min_total // max(bytes_per_call, 1))))


def time_graph(calls, calls_per_graph: int = 20, repeats: int = 25) -> float:
    """Median milliseconds per call. ``calls`` are zero-argument callables that launch on the
    current stream; one graph captures ``calls_per_graph`` of them in turn (cycling the list),
    and each replay is timed with CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # warm-up outside the capture (module load, first-launch costs)
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls_per_graph):
            calls[i % len(calls)]()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ms = cuda_event_ms(graph.replay, repeats, calls_per_body=calls_per_graph)
    del graph
    return ms


def route(tokens: int, num_experts: int, top_k: int, seed: int) -> list[int]:
    """Rows per expert for ``tokens`` tokens routed top-k on seeded random-normal logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    ids = logits.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(ids, minlength=num_experts).tolist()


def write_results(out_dir: str, suite: str, result: dict) -> str:
    """Writes ``result`` to OUT_DIR/<gpu short name>-<suite>.json and returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{gpu_short_name(result['gpu'])}-{suite}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    """A plain fixed-width table (right-aligned numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
