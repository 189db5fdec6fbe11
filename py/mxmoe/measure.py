"""The project's two measurements, shared by the demo, the benchmarks (bench/) and the tests:

- ``rel_l2``: the relative L2 error every accuracy comparison reports;
- ``cuda_event_ms``: the median CUDA-event time of a body, the one timing loop of the GPU
  benchmarks and the demo.

Torch only (no mxmoe kernels), so any script can import it. ``cuda_event_ms`` needs a GPU and
times work on the current stream; it does not warm up (callers do, once, before).
"""

from __future__ import annotations

import statistics

import torch


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 on the CPU (a zero ref counts as 1e-30)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def cuda_event_ms(body, repeats: int = 20, calls_per_body: int = 1) -> float:
    """Median over ``repeats`` runs of ``body()`` timed with CUDA events, in milliseconds per
    call (``calls_per_body`` calls in one body: a graph replay or an inner loop)."""
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        body()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls_per_body)
    return statistics.median(samples)
