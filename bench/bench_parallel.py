"""Expert-parallel MoE: bytes each rank sends and receives per layer, and stage times.

Two parts, one JSON (default bench/results/cpu-parallel.json, or <gpu>-parallel.json on CUDA):

1. Bytes (no processes needed): for each model shape, tokens per rank T and world size, every
   rank's tokens are routed with seeded random-normal logits (softmax, top-k), and the rows each
   rank sends to its peers (its own rows stay local) are counted: dispatch bf16 = 2 H bytes per
   (token, slot), dispatch mxfp4 = H/2 + H/32, combine = 2 H either way, plus the count exchange
   (world x (max local experts + 1) int64 per rank).
2. Times: ExpertParallelMoE.forward_topk on ``--world`` ranks (gloo on the CPU, NCCL on CUDA),
   median wall time per stage (dispatch: sort, count exchange, quantize/pack, all_to_all;
   experts: regroup + GEMM1 + activation + GEMM2; combine: reverse all_to_all + weighted sum),
   and the two payload exchanges alone (dispatch_all_to_all, combine_all_to_all). Beside them,
   in the same run: the bytes this rank sent to / received from its peers, the achieved
   bandwidth of its dispatch exchange (bytes sent to peers / dispatch_all_to_all time), the
   process group's own bandwidth for an evenly split all_to_all_single of the same bytes
   (``a2a_baseline_GBps``, the best the exchange can do), and the whole layer with every expert
   on one device running all ranks' tokens (``single_device_ms``, rank 0). Weights are random
   codes (timing does not depend on their values).

Run: ``python bench/bench_parallel.py`` (spawns ``--world`` ranks: one GPU each over NCCL when
that many GPUs are visible, else gloo on the CPU), or under torchrun:
``torchrun --nproc-per-node 2 bench/bench_parallel.py``. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1: this script
sets them, overriding the environment). On two GPUs through the GPU workflow:
``bash run.sh OUT --only build,bench --bench bench/bench_parallel.py`` writes
OUT/<gpu>-parallel.json (``--out`` takes a file or a directory). Not yet run on GPUs. On the
CPU the timing part defaults to small token counts: the CPU backend's exact GEMM is slow and
the point is the exchange's share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, TOKENS, commit, gpu_short_name, utc_now

import mxmoe
from mxmoe import parallel

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[_var] = "0" if _var == "NCCL_NVLS_ENABLE" else "1"  # multicast stays off


def route(tokens: int, num_experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return ids.to(torch.int32), weights.to(torch.float32)


def traffic(name: str, tokens: int, world: int) -> dict:
    """Mean and max over ranks of rows/bytes sent to peers per layer (received is symmetric in
    expectation; its mean equals the sent mean exactly)."""
    e, h, _, top_k = SHAPES[name]
    blocks = parallel.split_experts(e, world)
    owner = torch.empty(e, dtype=torch.int64)
    for r, (b, end) in enumerate(blocks):
        owner[b:end] = r
    sent = []
    received = torch.zeros(world, dtype=torch.int64)
    for r in range(world):
        ids, _ = route(tokens, e, top_k, seed=1000 * world + r)
        dest = owner[ids.reshape(-1).long()]
        per_dest = torch.bincount(dest, minlength=world)
        received += per_dest
        received[r] -= per_dest[r]
        sent.append(int(per_dest.sum() - per_dest[r]))
    max_local = max(end - b for b, end in blocks)
    rows_mean = sum(sent) / world
    row = {
        "bf16": 2 * h, "mxfp4": h // 2 + h // 32, "combine": 2 * h,
    }
    counts_bytes = (world - 1) * (max_local + 1) * 8
    return {
        "model": name, "tokens_per_rank": tokens, "world": world, "hidden": h, "top_k": top_k,
        "rows_sent_mean": rows_mean, "rows_sent_max": max(sent),
        "rows_received_max": int(received.max()),
        "dispatch_bytes_sent_mean": {k: rows_mean * row[k] for k in ("bf16", "mxfp4")},
        "combine_bytes_sent_mean": rows_mean * row["combine"],
        "count_exchange_bytes": counts_bytes,
        "dispatch_bytes_per_token": {k: rows_mean / tokens * row[k] for k in ("bf16", "mxfp4")},
        "combine_bytes_per_token": rows_mean / tokens * row["combine"],
    }


def random_local_layer(e: int, h: int, inter: int, begin: int, end: int,
                       device) -> mxmoe.MoELayer:
    g = torch.Generator().manual_seed(begin)
    n = end - begin

    def codes(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)

    def scales(*shape):  # 2^-8 .. 2^-4: keeps activations finite through both GEMMs
        return torch.randint(119, 124, shape, dtype=torch.uint8, generator=g)

    expert_map = torch.full((e,), -1, dtype=torch.int32)
    expert_map[begin:end] = torch.arange(n, dtype=torch.int32)
    layer = mxmoe.MoELayer(codes(n, 2 * inter, h // 2), scales(n, 2 * inter, h // 32),
                           codes(n, h, inter // 2), scales(n, h, inter // 32),
                           expert_map=expert_map)
    return layer.to(device)


def _median_ms(fn, repeats: int, device) -> float:
    """Median wall milliseconds of fn() over repeats (after one warm-up), every rank in step."""
    samples = []
    for i in range(repeats + 1):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def exchange_bytes(ids: torch.Tensor, e: int, world: int, rank: int, row_bytes: int):
    """(bytes this rank sends to its peers, bytes it receives from them) for one dispatch of
    rows of row_bytes; the receive side comes from every rank's counts (all_gather)."""
    owner = torch.empty(e, dtype=torch.int64)
    for r, (b, end) in enumerate(parallel.split_experts(e, world)):
        owner[b:end] = r
    per_dest = torch.bincount(owner[ids.reshape(-1).long().cpu()], minlength=world)
    everyone = [torch.empty_like(per_dest) for _ in range(world)]
    dist.all_gather_object(everyone, per_dest)
    sent = int(per_dest.sum() - per_dest[rank])
    received = sum(int(everyone[r][rank]) for r in range(world) if r != rank)
    return sent * row_bytes, received * row_bytes


def a2a_baseline_gbps(nbytes: int, world: int, repeats: int, device) -> float:
    """The group's bandwidth for an evenly split all_to_all_single moving the largest rank's
    nbytes to its peers."""
    everyone = [0] * world
    dist.all_gather_object(everyone, nbytes)  # one size for every rank: the largest sender's
    per_peer = max(1, -(-max(everyone) // max(1, world - 1)))
    send = torch.empty(per_peer * world, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    ms = _median_ms(lambda: dist.all_to_all_single(recv, send), repeats, device)
    return per_peer * (world - 1) / (ms * 1e-3) / 1e9


def time_single_device(e, h, inter, top_k, world, tokens, repeats, device) -> float:
    """The whole layer (every expert) on this device, on all ranks' tokens."""
    layer = random_local_layer(e, h, inter, 0, e, device)
    xs, ids, ws = [], [], []
    for r in range(world):
        xs.append(torch.randn(tokens, h, generator=torch.Generator().manual_seed(r)).to(
            torch.bfloat16))
        i, w = route(tokens, e, top_k, seed=1000 * world + r)
        ids.append(i)
        ws.append(w)
    x, i, w = (torch.cat(v).to(device) for v in (xs, ids, ws))
    samples = []
    for k in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        layer.forward_topk(x, i, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            samples.append(time.perf_counter() - start)
    del layer
    return statistics.median(samples) * 1e3


def time_rank(rank: int, world: int, shapes: list[str], tokens_list: list[int], repeats: int,
              device) -> list[dict]:
    rows = []
    device = torch.device(device)
    for name in shapes:
        e, h, inter, top_k = SHAPES[name]
        begin, end = parallel.split_experts(e, world)[rank]
        single = {}
        if rank == 0:
            for tokens in tokens_list:
                try:
                    single[tokens] = round(time_single_device(e, h, inter, top_k, world, tokens,
                                                              repeats, device), 3)
                except (RuntimeError, MemoryError) as exc:  # does not fit: say so in the row
                    single[tokens] = f"{type(exc).__name__}: {exc}"[:200]
        for dispatch in parallel.DISPATCH_FORMATS:
            ep = parallel.ExpertParallelMoE(random_local_layer(e, h, inter, begin, end, device),
                                            dispatch=dispatch)
            for tokens in tokens_list:
                x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(rank)).to(
                    torch.bfloat16).to(device)
                ids, weights = route(tokens, e, top_k, seed=1000 * world + rank)
                ids, weights = ids.to(device), weights.to(device)
                samples = []
                for i in range(repeats + 1):
                    timings: dict = {}
                    dist.barrier()
                    start = time.perf_counter()
                    ep._forward(x, ids, weights, timings)
                    timings["total"] = time.perf_counter() - start
                    if i:  # the first call warms up (buffers, workspaces)
                        samples.append(timings)
                medians = {k: statistics.median(s[k] for s in samples) * 1e3
                           for k in samples[0]}
                sent, received = exchange_bytes(ids, e, world, rank,
                                                ep.dispatch_bytes_per_row(torch.bfloat16))
                row = {"model": name, "tokens_per_rank": tokens, "world": world,
                       "dispatch": dispatch, "rank": rank,
                       **{f"{k}_ms": round(v, 3) for k, v in medians.items()},
                       "dispatch_bytes_sent": sent, "dispatch_bytes_received": received,
                       "dispatch_all_to_all_GBps": round(
                           sent / (medians["dispatch_all_to_all"] * 1e-3) / 1e9, 3),
                       "a2a_baseline_GBps": round(
                           a2a_baseline_gbps(sent, world, repeats, device), 3)}
                if rank == 0:
                    row["single_device_ms"] = single[tokens]
                rows.append(row)
                if rank == 0:
                    print(f"{name:14s} T={tokens:5d} {dispatch:5s} " + " ".join(
                        f"{k}={v:8.2f}ms" for k, v in medians.items()), flush=True)
            del ep
    return rows


def _worker(rank: int, world: int, init_file: str, args, out_file: str, cuda: bool) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if cuda:  # one GPU per rank, NCCL
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600),
                                device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = time_rank(rank, world, args.timing_shapes, args.timing_tokens, args.repeats, device)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump([r for part in gathered for r in part], f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    parser.add_argument("--byte-worlds", nargs="*", type=int, default=[2, 8])
    parser.add_argument("--world", type=int, default=2, help="ranks for the timing part")
    parser.add_argument("--timing-shapes", nargs="*", default=None)
    parser.add_argument("--timing-tokens", nargs="*", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--out", default=None, help="a JSON file, or a directory for "
                        "<gpu>-parallel.json (default bench/results/)")
    parser.add_argument("--note", default="", help="stored in the JSON (machine, load)")
    args = parser.parse_args()

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    # CUDA + NCCL under torchrun with GPUs, or when spawning --world ranks on as many GPUs.
    cuda = torch.cuda.is_available() and (under_torchrun
                                          or torch.cuda.device_count() >= args.world)
    if args.timing_shapes is None:
        args.timing_shapes = list(SHAPES) if cuda else ["qwen3-30b-a3b", "gpt-oss-120b"]
    if args.timing_tokens is None:
        args.timing_tokens = TOKENS if cuda else [1, 16, 64]

    rank = int(os.environ.get("RANK", 0))
    result = {"commit": commit(), "date": utc_now(), "torch": torch.__version__,
              "note": args.note}
    if rank == 0:
        result["bytes"] = [traffic(name, t, w) for name in args.shapes for t in args.tokens
                           for w in args.byte_worlds]
        print(f"{'model':14s} {'T':>6s} {'W':>2s} {'bf16 B/token':>13s} {'mxfp4 B/token':>14s} "
              f"{'combine B/token':>16s}")
        for row in result["bytes"]:
            print(f"{row['model']:14s} {row['tokens_per_rank']:6d} {row['world']:2d} "
                  f"{row['dispatch_bytes_per_token']['bf16']:13.0f} "
                  f"{row['dispatch_bytes_per_token']['mxfp4']:14.0f} "
                  f"{row['combine_bytes_per_token']:16.0f}")

    if not args.no_timing:
        if under_torchrun:
            backend = "nccl" if cuda else "gloo"
            local = int(os.environ.get("LOCAL_RANK", 0))
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
            device = torch.device("cuda", local) if cuda else torch.device("cpu")
            rows = time_rank(rank, dist.get_world_size(), args.timing_shapes,
                             args.timing_tokens, args.repeats, device)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            timing = [r for part in gathered for r in part]
            result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
            result["backend"] = backend
            dist.destroy_process_group()
        else:
            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory() as tmp:
                out_file = os.path.join(tmp, "timing.json")
                mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args, out_file,
                                        cuda), nprocs=args.world)
                with open(out_file) as f:
                    timing = json.load(f)
            result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
            result["backend"] = "nccl" if cuda else "gloo"
            if not cuda:
                result["cpu_threads_per_rank"] = args.cpu_threads
        result["timing"] = timing
    if rank != 0:
        return
    out = args.out
    prefix = gpu_short_name(torch.cuda.get_device_name()) if cuda else "cpu"
    if out is None:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if os.path.isdir(out):  # a directory (tools/gpu/run.sh passes one): the suite's file in it
        out = os.path.join(out, f"{prefix}-parallel.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
