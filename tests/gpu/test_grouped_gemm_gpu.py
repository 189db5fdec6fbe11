"""GPU grouped GEMM through the Python ops against the CPU backend and float64.

Every shape runs the same MXFP4 operands on the CPU backend (the exact reference: integer block
dots, double accumulation) and on the GPU; outputs are compared by relative L2 (bf16 output
rounding lands near 1e-3). Rows per expert include 0, 1, 7, 64, 65; weights LINEAR, SWIZZLED and
PREPARED; rows past expert_offsets[E] must stay untouched (poisoned). Skips without a GPU.
"""

import pytest
import torch
from conftest import quick_mode, rel_l2

from mxmoe import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")



def make_operands(counts, n, k, seed, extra_rows=0):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    rows = sum(counts) + extra_rows
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, n, k, generator=g) / k**0.5).to(torch.bfloat16)
    expert_offsets, blockscale_offsets = ops.expert_offsets_from_counts(counts)
    a, a_scales = ops.experts_quantize(x, expert_offsets, blockscale_offsets)
    b, b_scales = ops.quantize_weights(w)
    return a, a_scales, b, b_scales, expert_offsets, blockscale_offsets


CASES = [
    # (counts per expert, n, k)
    ([1], 2880, 2880),
    ([2, 0, 1, 0], 256, 128),
    ([0, 1, 7, 64, 65, 0], 2880, 2880),
    ([3] * 4 + [0] * 4, 768, 2048),
    ([1, 1, 1, 1, 1, 1, 1, 1], 5760, 2880),
    ([17, 200], 7168, 2048),
    ([300], 768, 2048),
    ([5] * 256, 96, 160),
    ([1000, 24, 0, 4096 - 1024], 256, 2880),
]
if quick_mode():  # compute-sanitizer passes: small shapes only
    CASES = [([2, 0, 1, 0], 256, 128), ([0, 1, 7, 65], 96, 160)]


@pytest.fixture(params=["wgmma", "gemv"])
def sm90_path(request, monkeypatch):
    """Both sm90 kernels on every case: MXMOE_SM90_GEMV=0 keeps the WGMMA kernel at any row
    count, =1 takes the CUDA-core path at any row count (read per call by the heuristic)."""
    monkeypatch.setenv("MXMOE_SM90_GEMV", "1" if request.param == "gemv" else "0")
    return request.param


@pytest.mark.parametrize("counts,n,k", CASES, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("b_format", ["linear", "swizzled", "prepared"])
def test_grouped_gemm_gpu_matches_cpu(counts, n, k, b_format, sm90_path):
    a, a_scales, b, b_scales, eo, bso = make_operands(counts, n, k, seed=sum(counts) + n + k,
                                                       extra_rows=3)
    ref = ops.grouped_gemm(a, a_scales, b, b_scales, eo, bso)
    cuda = {"a": a.cuda(), "a_scales": a_scales.cuda(), "expert_offsets": eo.cuda(),
            "blockscale_offsets": bso.cuda()}
    if b_format == "prepared":
        weights = (ops.prepare_weights(b.cuda(), b_scales.cuda()), None)
        fmt = "linear"
    elif b_format == "swizzled":
        weights = (b.cuda(), ops.swizzle_scales(b_scales.cuda()))
        fmt = "swizzled"
    else:
        weights = (b.cuda(), b_scales.cuda())
        fmt = "linear"
    out = ops.grouped_gemm(cuda["a"], cuda["a_scales"], weights[0], weights[1],
                           cuda["expert_offsets"], cuda["blockscale_offsets"], b_format=fmt)
    torch.cuda.synchronize()
    used = int(eo[-1])
    if used == 0:
        return
    err = rel_l2(out[:used], ref[:used])
    assert err <= 2e-3, f"{counts=} {n=} {k=} {b_format=}: rel L2 vs CPU {err:.3e}"
    assert torch.isfinite(out[:used].float()).all(), f"{counts=} {n=} {k=}: non-finite output"


def test_grouped_gemm_gpu_vs_float64_dequantized(sm90_path):
    counts, n, k = ([0, 1, 7], 256, 160) if quick_mode() else ([0, 1, 7, 64, 65], 2880, 2880)
    a, a_scales, b, b_scales, eo, bso = make_operands(counts, n, k, seed=7)
    ref = reference.grouped_gemm(a, a_scales, b, b_scales, eo, bso, out_dtype=torch.float64)
    out = ops.grouped_gemm(a.cuda(), a_scales.cuda(), b.cuda(), b_scales.cuda(), eo.cuda(),
                           bso.cuda())
    err = rel_l2(out, ref)
    assert err <= 2e-3, f"{counts=} {n=} {k=}: rel L2 vs float64 dequantized {err:.3e}"
