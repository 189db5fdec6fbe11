"""Shared setup of the GPU test suite (tests/gpu), which runs through tools/gpu/run.sh.

- The report header names the GPU, the torch build and the mxmoe backend that serves it, so a log
  says where it came from.
- ``rel_l2``: the relative L2 error every GPU test compares with (``mxmoe.measure.rel_l2``).
- ``MXMOE_GPU_TEST_QUICK=1`` (set by run.sh for the compute-sanitizer passes, which run 10-100x
  slower) asks every test file to keep to its small shapes (each file reads the variable).
- Without a CUDA device every test module skips itself (each sets its own ``pytestmark``).
"""

from __future__ import annotations

import os

import torch

from mxmoe.measure import rel_l2  # noqa: F401  (the one error measure, for the test modules)


def quick_mode() -> bool:
    """True when the suite should keep to small shapes (sanitizer runs)."""
    return os.environ.get("MXMOE_GPU_TEST_QUICK", "") not in ("", "0")


def pytest_report_header(config):
    if not torch.cuda.is_available():
        return ["mxmoe GPU tests: no CUDA device, every test skips"]
    name = torch.cuda.get_device_name()
    lines = [f"GPU: {name} (torch {torch.__version__}, CUDA {torch.version.cuda})"]
    try:
        import mxmoe

        lines.append(f"mxmoe {mxmoe.version()}, backend for cuda:0: "
                     f"{mxmoe.backend_for(torch.empty(1, device='cuda'))}")
    except Exception as e:
        lines.append(f"mxmoe not importable: {e}")
    if quick_mode():
        lines.append("MXMOE_GPU_TEST_QUICK=1: small shapes only")
    return lines
