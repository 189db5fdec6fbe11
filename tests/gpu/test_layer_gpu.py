"""MoELayer on a GPU: checkpoint loading onto CUDA, and the demo's GPU path.

Skips without a CUDA device (run through tools/gpu/run.sh).
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import quick_mode, rel_l2

import mxmoe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")



def test_checkpoint_loads_onto_cuda_and_matches_cpu(tmp_path):
    e, h, i, top_k, tokens = 8, 256, 128, 2, 33
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(torch.bfloat16)
    path = str(tmp_path / "layer.safetensors")
    mxmoe.MoELayer.from_float(w13, w2).save_checkpoint(path, "model.layers.0.mlp")
    cpu_layer = mxmoe.MoELayer.from_checkpoint(path, "model.layers.0.mlp")
    gpu_layer = mxmoe.MoELayer.from_checkpoint(path, "model.layers.0.mlp", device="cuda")
    assert gpu_layer.backend in ("sm90", "sm100")
    x = torch.randn(tokens, h, generator=g).to(torch.bfloat16)
    logits = torch.randn(tokens, e, generator=g)
    ref = cpu_layer(x, logits, top_k=top_k)
    out = gpu_layer(x.cuda(), logits.cuda(), top_k=top_k)
    err = rel_l2(out, ref)
    assert err <= 5e-3, f"checkpoint layer on cuda vs cpu: rel L2 {err:.3e}"


@pytest.mark.skipif(quick_mode(), reason="the demo is not a sanitizer target")
def test_demo_runs_on_the_gpu_and_compares_with_torch_peers():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "mxmoe.demo", "--shape=small", "--tokens=16",
                             "--repeats=2"], capture_output=True, text=True, env=env, timeout=300)
    print(result.stdout[-3000:], result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backend: sm90" in result.stdout or "backend: sm100" in result.stdout
    assert "torch FP8 rowwise" in result.stdout and "torch bf16" in result.stdout
    match = re.search(r"vs exact reference .*?: ([0-9.e+-]+)", result.stdout)
    assert match and float(match.group(1)) <= 5e-3, result.stdout[-2000:]
