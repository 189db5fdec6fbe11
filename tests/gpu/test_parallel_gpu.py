"""mxmoe.parallel over NCCL on 2 GPUs, at the three model shapes with each model's real block.

Two processes, one GPU each. Each rank builds the same whole layer (seeded weights made on its
GPU, Philox gives both GPUs the same bits), splits the routed experts across the ranks (DeepSeek-V3:
128 per GPU, its shared expert on both) and checks, for T tokens per rank in {1, 16, 256, 4096}
(the other rank gets max(1, T // 3): uneven exchanges):
  - ExpertParallelMoE, both dispatch formats: bit-identical to the single-GPU layer run on all
    ranks' tokens (its slice for this rank);
  - TensorParallelMoE: within mxmoe.parallel's documented bound of the single-GPU layer.
Blocks: qwen3-30b-a3b (softmax top-8, SiLU), gpt-oss-120b (top-4 then softmax, SwiGLU-OAI,
expert biases), deepseek-v3 (sigmoid grouped top-8 of 8 groups / 4 kept, scaling 2.5,
correction bias, one shared expert).

Device scope: a second pass runs the GPT-OSS block at T=16 with the *other* GPU current in each
process (the layer and tokens stay on the rank's own GPU, the NCCL group is bound to it): every
CUDA entry point must make its tensors' device current, and must leave the caller's current.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1, set in every rank). Skips without two CUDA devices.
MXMOE_PARALLEL_DRY_RUN=cpu runs the same rank code on the CPU backend over gloo with tiny shapes
(a check of this file's logic on a machine without GPUs; not a substitute for the NCCL run).
Status: written and dry-run on the CPU (MXMOE_PARALLEL_DRY_RUN=cpu: 27 checks per rank pass);
not yet run on two GPUs (none lent so far).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

DRY_RUN = os.environ.get("MXMOE_PARALLEL_DRY_RUN") == "cpu"
pytestmark = pytest.mark.skipif(not DRY_RUN and torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA devices (NCCL expert parallelism)")

WORLD = 2
TIMEOUT_S = 900
TOKENS = [1, 16, 256, 4096]
NO_MULTICAST = (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                ("NVSHMEM_DISABLE_NVLS", "1"))
# name: (E routed, H, I, top_k, block options; "*_std" entries are random tensors' std)
MODELS = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, {}),
    "gpt-oss-120b": (128, 2880, 2880, 4, {
        "activation": "swiglu_oai", "routing": "topk_softmax",
        "w13_bias_std": 0.02, "w2_bias_std": 0.01}),
    "deepseek-v3": (256, 7168, 2048, 8, {
        "routing": "sigmoid_grouped_topk", "num_expert_groups": 8, "topk_groups": 4,
        "routed_scaling_factor": 2.5, "e_score_correction_bias_std": 0.01,
        "num_shared_experts": 1}),
}
DRY_MODELS = {  # the same blocks at sizes the CPU backend runs in seconds
    "qwen3-30b-a3b": (8, 64, 64, 2, MODELS["qwen3-30b-a3b"][4]),
    "gpt-oss-120b": (8, 96, 64, 2, MODELS["gpt-oss-120b"][4]),
    "deepseek-v3": (16, 64, 64, 4, MODELS["deepseek-v3"][4]),
}


def _randn(shape, std, gen, device):
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    for e in range(shape[0]):  # expert by expert: no float32 copy of a whole model's weights
        out[e] = (torch.randn(shape[1:], generator=gen, device=device) * std).bfloat16()
    return out


def _layer(model: str, device):
    import mxmoe

    e, h, inter, top_k, spec = (DRY_MODELS if DRY_RUN else MODELS)[model]
    shared = spec.get("num_shared_experts", 0)
    gen = torch.Generator(device=device).manual_seed(1)
    w13 = _randn((e + shared, 2 * inter, h), h ** -0.5, gen, device)
    w2 = _randn((e + shared, h, inter), inter ** -0.5, gen, device)
    options = {k: v for k, v in spec.items() if not k.endswith("_std")}
    if "w13_bias_std" in spec:
        options["w13_bias"] = _randn((e + shared, 2 * inter), spec["w13_bias_std"], gen, device)
        options["w2_bias"] = _randn((e + shared, h), spec["w2_bias_std"], gen, device)
    if "e_score_correction_bias_std" in spec:
        options["e_score_correction_bias"] = (
            torch.randn(e, generator=gen, device=device) * spec["e_score_correction_bias_std"])
    layer = mxmoe.MoELayer.from_float(w13, w2, top_k=top_k, **options)
    del w13, w2
    return layer, e, h


def _inputs(tokens, h, e, device):
    xs, logits = [], []
    for r, t in enumerate(tokens):
        gen = torch.Generator(device=device).manual_seed(100 * r + t)
        xs.append(torch.randn(t, h, generator=gen, device=device).bfloat16())
        logits.append(torch.randn(t, e, generator=gen, device=device))
    return xs, logits


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _check_model(model, rank, device, token_list, results, current=None):
    """EP (both formats) and TP against the single-GPU layer; ``current``: the device to keep
    current during the calls (None: the rank's own)."""
    import torch.distributed as dist

    from mxmoe import parallel

    layer, e, h = _layer(model, device)
    eps = {d: parallel.ExpertParallelMoE.from_layer(layer, dispatch=d)
           for d in parallel.DISPATCH_FORMATS}
    tp = parallel.TensorParallelMoE.from_layer(layer)
    tag = "" if current is None else " (other GPU current)"
    for t in token_list:
        tokens = [t, max(1, t // 3)]
        xs, logits = _inputs(tokens, h, e, device)
        if current is not None:
            torch.cuda.set_device(current)
        x_all, lg_all = torch.cat(xs), torch.cat(logits)
        want_all = layer(x_all, lg_all)
        begin = sum(tokens[:rank])
        want = want_all[begin:begin + tokens[rank]]
        for dispatch, ep in eps.items():
            got = ep(xs[rank], logits[rank])
            results[f"ep {model} T={t} {dispatch}{tag}"] = _bit_equal(got, want)
        # TP: every rank runs all tokens; the bound of mxmoe.parallel.
        got = tp(x_all, lg_all)
        ids, w = layer.route(lg_all)
        w = parallel._with_shared_weights(w, layer.num_shared_experts)
        partial = (tp._expert_outputs(x_all, ids).float().abs() * w.unsqueeze(-1)).sum(1)
        dist.all_reduce(partial)
        bound = 2.0**-6 * partial + 2.0**-7 * want_all.float().abs()
        results[f"tp {model} T={t}{tag}"] = bool(
            ((got.float() - want_all.float()).abs() <= bound).all())
        if current is not None:
            results[f"current device kept {model} T={t}"] = (
                torch.cuda.current_device() == current)
            torch.cuda.set_device(device)
    del eps, tp, layer
    if not DRY_RUN:
        torch.cuda.empty_cache()


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    for var, value in NO_MULTICAST:
        os.environ[var] = value  # forced, not defaulted: multicast must stay off
    import torch.distributed as dist

    results = {}
    if DRY_RUN:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=300),
                                device_id=device)
    try:
        token_list = [1, 16, 37] if DRY_RUN else TOKENS
        for model in MODELS:
            _check_model(model, rank, device, token_list, results)
        if not DRY_RUN:
            _check_model("gpt-oss-120b", rank, device, [16], results,
                         current=(rank + 1) % WORLD)
    except Exception as exc:  # reported to the test process
        results["error"] = repr(exc)[:2000]
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
            expected = len(MODELS) * (3 if DRY_RUN else len(TOKENS)) * 3
            assert len([k for k in results if not k.startswith("current")]) >= expected, (
                f"rank {r}: only {len(results)} checks ran")
            failed = [k for k, ok in results.items() if not ok]
            assert not failed, f"rank {r}: {failed} (ep: not bit-identical; tp: beyond bound)"
            print(f"rank {r}: {len(results)} checks passed")
