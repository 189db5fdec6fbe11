"""mxmoe.parallel over NCCL on 2 GPUs: expert parallelism bit-identical to MoELayer on one GPU.

Each rank (one process per GPU) builds the same whole layer from seeds, runs it on all ranks'
tokens as the single-GPU reference, and compares its slice with ExpertParallelMoE's output for
its own tokens; tensor parallelism is checked against the bound in mxmoe.parallel. Skips without
two CUDA devices. Written on a machine without GPUs: not yet run.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices (NCCL expert parallelism)")

WORLD = 2
TIMEOUT_S = 300


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, value)
    import torch.distributed as dist

    import mxmoe
    from mxmoe import parallel

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120),
                            device_id=device)
    results = {}
    try:
        for model, (e, h, i, top_k) in {"small": (8, 256, 128, 2),
                                        "gpt-oss-like": (16, 2880, 2880, 4)}.items():
            g = torch.Generator().manual_seed(1)
            w13 = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(torch.bfloat16)
            w2 = (torch.randn(e, h, i, generator=g) * i**-0.5).to(torch.bfloat16)
            layer = mxmoe.MoELayer.from_float(w13.to(device), w2.to(device), top_k=top_k)
            tokens = [37, 5]
            xs = [torch.randn(t, h, generator=torch.Generator().manual_seed(10 + r)).to(
                torch.bfloat16).to(device) for r, t in enumerate(tokens)]
            logits = [torch.randn(t, e, generator=torch.Generator().manual_seed(20 + r)).to(
                device) for r, t in enumerate(tokens)]
            want = layer(torch.cat(xs), torch.cat(logits))[sum(tokens[:rank]):][:tokens[rank]]
            for dispatch in parallel.DISPATCH_FORMATS:
                ep = parallel.ExpertParallelMoE.from_layer(layer, dispatch=dispatch)
                got = ep(xs[rank], logits[rank])
                results[f"ep {model} {dispatch}"] = bool(torch.equal(got.view(torch.int16),
                                                                     want.view(torch.int16)))
            tp = parallel.TensorParallelMoE.from_layer(layer)
            x, lg = torch.cat(xs), torch.cat(logits)
            ids, w = layer.route(lg)
            got = tp(x, lg)
            full = layer(x, lg)
            partial = (tp._expert_outputs(x, ids).float().abs() * w.unsqueeze(-1)).sum(1)
            dist.all_reduce(partial)
            bound = 2.0**-6 * partial + 2.0**-7 * full.float().abs()
            results[f"tp {model}"] = bool(((got.float() - full.float()).abs() <= bound).all())
    except Exception as exc:  # reported to the test process
        results["error"] = repr(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_expert_and_tensor_parallel_over_nccl():
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        processes = [context.Process(target=_rank, args=(r, os.path.join(tmp, "init"), tmp))
                     for r in range(WORLD)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=TIMEOUT_S)
        alive = [r for r, p in enumerate(processes) if p.is_alive()]
        for p in processes:
            if p.is_alive():
                p.kill()
        assert not alive, f"ranks {alive} did not finish within {TIMEOUT_S} s"
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                results = json.load(f)
            assert "error" not in results, f"rank {r}: {results['error']}"
            failed = [k for k, ok in results.items() if not ok]
            assert not failed, f"rank {r}: {failed} (ep: not bit-identical; tp: beyond bound)"
