"""mxmoe.parallel on the CPU backend: gloo on loopback, 4 ranks started once for the module.

Expert parallelism must reproduce the single-process MoELayer bit for bit (both dispatch
formats): every rank builds the same whole layer and every rank's tokens from seeds, runs the
single-process layer on the concatenation of all ranks' tokens, and compares its own slice with
what the expert-parallel layer returned for its tokens. Tensor parallelism must stay within the
bound documented in mxmoe.parallel. Failure paths: a rank with a different layer makes every
rank raise the same clear error (no rank waits for a collective that never comes).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from expectations import expect_error, random_activations
from rank_pool import RankPool

import mxmoe
from mxmoe import parallel


@pytest.fixture(scope="module")
def pool():
    p = RankPool(4)
    yield p
    p.close()


def model_options(model: str, e: int, h: int, i: int, seed: int) -> tuple[int, dict]:
    """(weight experts, MoELayer options) of a model's block with e routed experts."""
    def rand(*shape, dtype=torch.bfloat16, scale=0.1):
        return random_activations(shape, seed=seed + 7 + len(shape), dtype=dtype, scale=scale)

    if model == "qwen3":
        return e, {"top_k": 2, "router_weight": rand(e, h, scale=h**-0.5)}
    if model == "gpt-oss":
        return e, {"activation": "swiglu_oai", "routing": "topk_softmax", "top_k": 2,
                   "w13_bias": rand(e, 2 * i), "w2_bias": rand(e, h),
                   "router_weight": rand(e, h, scale=h**-0.5), "router_bias": rand(e)}
    if model == "deepseek-v3":
        return e + 1, {"routing": "sigmoid_grouped_topk", "top_k": 3, "num_expert_groups": 4,
                       "topk_groups": 2, "routed_scaling_factor": 2.5, "num_shared_experts": 1,
                       "e_score_correction_bias": rand(e, dtype=torch.float32),
                       "router_weight": rand(e, h, dtype=torch.float32, scale=h**-0.5)}
    raise ValueError(model)


def make_layer(e, h, i, seed, dtype=torch.bfloat16, model=None):
    weight_experts, options = (e, {}) if model is None else model_options(model, e, h, i, seed)
    w13 = random_activations((weight_experts, 2 * i, h), seed=seed, dtype=dtype, scale=h**-0.5)
    w2 = random_activations((weight_experts, h, i), seed=seed + 1, dtype=dtype, scale=i**-0.5)
    return mxmoe.MoELayer.from_float(w13, w2, **options)


def make_tokens(tokens, h, e, top_k, seed, dtype=torch.bfloat16, skip_experts=(),
                only_expert=None, cancel=False):
    """hidden [T, H], topk_ids [T, k] (duplicates allowed, ``skip_experts`` never chosen),
    topk_weights [T, k].

    ``cancel``: slots 0 and 1 hold the same expert with weights +-2^20 r, so that the exact
    result (slot order: they cancel, then slot 2 adds exactly) differs from any other order or
    precision of the reduce, which would round slot 2's term on the 2^20 grid.
    """
    g = torch.Generator().manual_seed(seed)
    x = random_activations((tokens, h), seed=seed, dtype=dtype)
    allowed = torch.tensor([x for x in range(e) if x not in skip_experts])
    ids = allowed[torch.randint(len(allowed), (tokens, top_k), generator=g)]
    if only_expert is not None:
        ids = torch.full((tokens, top_k), only_expert)
    weights = torch.rand(tokens, top_k, generator=g)
    if cancel:
        ids[:, 1] = ids[:, 0]
        weights[:, 0] *= 2.0**20
        weights[:, 1] = -weights[:, 0]
    return x, ids.to(torch.int32), weights.to(torch.float32)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        (a.view(torch.int16) == b.view(torch.int16)).all())


# ---- Expert parallelism ---------------------------------------------------------------------


def ep_task(ctx, case: dict):
    e, h, i, top_k = case["e"], case["h"], case["i"], case["top_k"]
    dtype = case.get("dtype", torch.bfloat16)
    layer = make_layer(e, h, i, seed=case["seed"], dtype=dtype)
    ep = parallel.ExpertParallelMoE.from_layer(layer, group=ctx.group, dispatch=case["dispatch"],
                                               experts_per_rank=case.get("experts_per_rank"))
    results = []
    for call, tokens_per_rank in enumerate(case["tokens"]):  # several calls: buffers reused
        parts = [make_tokens(t, h, e, top_k, seed=100 * call + r, dtype=dtype,
                             skip_experts=case.get("skip", ()),
                             only_expert=case.get("only_expert"), cancel=case.get("cancel"))
                 for r, t in enumerate(tokens_per_rank)]
        x, ids, w = (torch.cat(p) for p in zip(*parts, strict=True))
        want = layer.forward_topk(x, ids, w)
        begin = sum(tokens_per_rank[:ctx.rank])
        mine = want[begin:begin + tokens_per_rank[ctx.rank]]
        got = ep.forward_topk(*parts[ctx.rank])
        results.append((bit_equal(got, mine), float((got.float() - mine.float()).abs().max())
                        if mine.numel() else 0.0, ep.local.num_experts))
    return results


def case(**fields) -> dict:
    return fields


EP_CASES = {
    # uneven tokens, a rank with none, experts 2 and 5 never chosen, duplicates in top-k
    "uneven": case(e=7, h=64, i=96, top_k=3, seed=1, skip=(2, 5),
                   tokens=[[5, 0, 17, 1], [1, 3, 0, 2]]),
    "one_expert": case(e=6, h=64, i=64, top_k=2, seed=2, only_expert=4, tokens=[[4, 9, 1, 0]]),
    "awkward": case(e=5, h=2880, i=96, top_k=2, seed=3, tokens=[[3, 1, 2, 4]],
                    experts_per_rank=[1, 2, 1, 1]),
    "cancel": case(e=6, h=64, i=32, top_k=3, seed=5, cancel=True, tokens=[[7, 3, 4, 2]]),
    "fp16": case(e=8, h=96, i=64, top_k=4, seed=4, dtype=torch.float16, tokens=[[6, 2, 5, 3]]),
}


@pytest.mark.parametrize("dispatch", ["bf16", "mxfp4"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", sorted(EP_CASES))
def test_expert_parallel_bit_identical(pool, name, world, dispatch):
    case = dict(EP_CASES[name], dispatch=dispatch)
    case["tokens"] = [t[:world] for t in case["tokens"]]
    if "experts_per_rank" in case and world != 4:
        case.pop("experts_per_rank")
    per_rank = pool.run(ep_task, case, world=world)
    for rank, calls in enumerate(per_rank):
        for call, (same, diff, held) in enumerate(calls):
            assert same, (f"{name} world={world} dispatch={dispatch} rank={rank} call={call} "
                          f"(holds {held} experts): not bit-identical, max |diff| {diff}")


MODELS = ["qwen3", "gpt-oss", "deepseek-v3"]


def model_task(ctx, model: str, dispatch: str):
    e, h, i = 8, 64, 64
    layer = make_layer(e, h, i, seed=60, model=model)
    ep = parallel.ExpertParallelMoE.from_layer(layer, group=ctx.group, dispatch=dispatch)
    tokens = [9, 0, 5, 2][:ctx.world]
    xs = [random_activations((t, h), seed=70 + r) for r, t in enumerate(tokens)]
    logits = [random_activations((t, e), seed=80 + r, dtype=torch.float32)
              for r, t in enumerate(tokens)]
    begin = sum(tokens[:ctx.rank])
    mine = slice(begin, begin + tokens[ctx.rank])
    # Routing by the layer's mode, all ranks' tokens in one process as the reference.
    want = layer(torch.cat(xs), torch.cat(logits))[mine]
    got = ep(xs[ctx.rank], logits[ctx.rank])
    # The router too (torch's linear on the same rows, so the same logits). MoELayer itself
    # refuses zero tokens with some routing modes: compare the shape there.
    got_hidden = ep.forward_hidden(xs[ctx.rank])
    if tokens[ctx.rank]:
        hidden_ok = bit_equal(got_hidden, layer.forward_hidden(xs[ctx.rank]))
    else:
        hidden_ok = got_hidden.shape == (0, h)
    return bit_equal(got, want), hidden_ok, bool(want.abs().sum() > 0)


@pytest.mark.parametrize("dispatch", ["bf16", "mxfp4"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", MODELS)
def test_expert_parallel_models_bit_identical(pool, model, world, dispatch):
    for rank, (routed, hidden, nonzero) in enumerate(
            pool.run(model_task, model, dispatch, world=world)):
        assert routed, f"{model} world={world} dispatch={dispatch} rank={rank}: forward differs"
        assert hidden, f"{model} world={world} dispatch={dispatch} rank={rank}: forward_hidden"
        assert nonzero or rank == 1, f"{model} rank={rank}: an all-zero output checks little"


def checkpoint_task(ctx, path: str, e: int, h: int, i: int, dispatch: str):
    layer = make_layer(e, h, i, seed=7)
    ep = parallel.ExpertParallelMoE.from_checkpoint(path, "mlp", num_experts=e, group=ctx.group,
                                                    dispatch=dispatch)
    x, ids, w = make_tokens(6 + ctx.rank, h, e, 2, seed=50 + ctx.rank)
    begin, end = parallel.split_experts(e, ctx.world)[ctx.rank]
    return (bit_equal(ep.forward_topk(x, ids, w), layer.forward_topk(x, ids, w)),
            ep.local.num_experts == end - begin,
            bool((ep.local.w13_packed == layer.w13_packed[begin:end]).all()))


def gpt_oss_checkpoint_task(ctx, path: str, e: int, h: int):
    whole = mxmoe.MoELayer.from_checkpoint(path, "mlp", top_k=2)
    ep = parallel.ExpertParallelMoE.from_checkpoint(path, "mlp", num_experts=e, group=ctx.group,
                                                    top_k=2)
    x = random_activations((5 + ctx.rank, h), seed=40 + ctx.rank)
    begin, end = parallel.split_experts(e, ctx.world)[ctx.rank]
    return (bit_equal(ep.forward_hidden(x), whole.forward_hidden(x)),
            ep.local.num_experts == end - begin, ep.local.activation, ep.local.routing)


def test_expert_parallel_from_gpt_oss_checkpoint(pool, tmp_path):
    e, h, i = 6, 64, 64
    path = str(tmp_path / "gpt-oss.safetensors")
    make_layer(e, h, i, seed=45, model="gpt-oss").save_checkpoint(path, "mlp", format="gpt-oss")
    for rank, (same, count, activation, routing) in enumerate(
            pool.run(gpt_oss_checkpoint_task, path, e, h)):
        assert count, f"rank {rank} loaded the wrong experts"
        assert (activation, routing) == ("swiglu_oai", "topk_softmax"), f"rank {rank}"
        assert same, f"rank {rank}: GPT-OSS block not bit-identical to MoELayer"


@pytest.mark.parametrize("dispatch", ["bf16", "mxfp4"])
def test_expert_parallel_from_checkpoint(pool, tmp_path, dispatch):
    e, h, i = 7, 64, 32
    path = str(tmp_path / "experts.safetensors")
    make_layer(e, h, i, seed=7).save_checkpoint(path, "mlp")
    for rank, (same, count, weights) in enumerate(
            pool.run(checkpoint_task, path, e, h, i, dispatch)):
        assert count and weights, f"rank {rank} loaded the wrong experts"
        assert same, f"rank {rank} dispatch={dispatch}: not bit-identical to MoELayer"


def error_task(ctx, kind: str):
    e, h, i = 4, 64, 32
    if kind == "hidden":
        layer = make_layer(e, 32 if ctx.rank == 1 else h, i, seed=9)
    elif kind == "experts":
        layer = make_layer(e + (ctx.rank == 1), h, i, seed=9)
    elif kind == "intermediate":
        layer = make_layer(e, h, 64 if ctx.rank == 1 else i, seed=9)
    elif kind == "routing":
        layer = make_layer(e, h, i, seed=9, model="gpt-oss" if ctx.rank == 1 else "qwen3")
    else:
        layer = make_layer(e, h, i, seed=9)
    if kind == "overlap":
        expert_map = torch.tensor([0, 1, -1, -1] if ctx.rank == 0 else [-1, 0, 1, -1],
                                  dtype=torch.int32)
        local = mxmoe.MoELayer(layer.w13_packed[:2], layer.w13_scales[:2], layer.w2_packed[:2],
                               layer.w2_scales[:2], expert_map=expert_map)
        make = lambda: parallel.ExpertParallelMoE(local, group=ctx.group)  # noqa: E731
    elif kind == "dtype":
        ep = parallel.ExpertParallelMoE.from_layer(layer, group=ctx.group, dispatch="bf16")
        x, ids, w = make_tokens(3, h, e, 2, seed=ctx.rank,
                                dtype=torch.float16 if ctx.rank == 1 else torch.bfloat16)
        make = lambda: ep.forward_topk(x, ids, w)  # noqa: E731
    elif kind == "ids":
        ep = parallel.ExpertParallelMoE.from_layer(layer, group=ctx.group)
        x, ids, w = make_tokens(3, h, e, 2, seed=ctx.rank)
        ids[1, 1] = 7
        make = lambda: ep.forward_topk(x, ids, w)  # noqa: E731
    else:
        make = lambda: parallel.ExpertParallelMoE.from_layer(layer, group=ctx.group)  # noqa: E731
    message = expect_error(make)
    # The group still works afterwards: the failure was agreed on, nobody is left waiting.
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.group)
    return message, float(t)


@pytest.mark.parametrize("kind, fragment", [
    ("hidden", "disagree on the hidden size H: rank 0 has 64, rank 1 has 32"),
    ("experts", "disagree on E_global: rank 0 has 4, rank 1 has 5"),
    ("intermediate", "disagree on the intermediate size I: rank 0 has 32, rank 1 has 64"),
    ("overlap", "expert 1 is held by ranks 0 and 1"),
    ("routing", "the ranks' layers disagree on activation: rank 0 has silu, rank 1 has "
                "swiglu_oai"),
    ("dtype", "rank 0: 128-byte bfloat16, rank 1: 128-byte float16"),
    ("ids", "topk_ids must be global expert ids in [0, 4), got 7"),
])
def test_expert_parallel_mismatch_fails_on_every_rank(pool, kind, fragment):
    for rank, (message, total) in enumerate(pool.run(error_task, kind, world=2)):
        assert fragment in message, f"rank {rank}: {fragment!r} not in {message!r}"
        assert total == 2.0, f"rank {rank}: the group is broken after the error"


def test_split_experts():
    assert parallel.split_experts(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert parallel.split_experts(5, 2, [1, 4]) == [(0, 1), (1, 5)]
    expect_error(lambda: parallel.split_experts(5, 2, [1, 3]),
                 "experts_per_rank must be 2 non-negative counts summing to E = 5")


def test_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in the test process")
    expect_error(lambda: parallel.ExpertParallelMoE(make_layer(2, 32, 32, seed=1)),
                 "torch.distributed is not initialised")


# ---- Tensor parallelism ---------------------------------------------------------------------


def tp_task(ctx, e, h, i, top_k, tokens, equal_shards, seed, model=None):
    layer = make_layer(e, h, i, seed=seed, model=model)
    tp = parallel.TensorParallelMoE.from_layer(layer, group=ctx.group, equal_shards=equal_shards)
    x, ids, w = make_tokens(tokens, h, e, top_k, seed=seed + 1)
    if model is None:
        got = tp.forward_topk(x, ids, w)
        want = layer.forward_topk(x, ids, w)
    else:
        logits = random_activations((tokens, e), seed=seed + 2, dtype=torch.float32)
        got = tp(x, logits)
        want = layer(x, logits)
        ids, w = layer.route(logits)
    # A = sum over slots and ranks of w_s |p_rs|, from every rank's expert outputs.
    w = parallel._with_shared_weights(w, layer.num_shared_experts)
    partial = (tp._expert_outputs(x, ids).float().abs() * w.unsqueeze(-1)).sum(1)
    dist.all_reduce(partial, group=ctx.group)
    bound = 2.0**-6 * partial + 2.0**-7 * want.float().abs()
    excess = float(((got.float() - want.float()).abs() - bound).max())
    everyone = [torch.empty_like(got) for _ in range(ctx.world)]
    dist.all_gather(everyone, got, group=ctx.group)
    agree = all(bit_equal(o, got) for o in everyone)
    diff = float((got.float() - want.float()).abs().max())
    return excess, agree, diff, tp.shard.intermediate_size, bit_equal(got, want)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("i, equal_shards", [(128, True), (160, True), (160, False),
                                             (2880, True)])
def test_tensor_parallel_within_bound(pool, world, i, equal_shards):
    results = pool.run(tp_task, 5, 64, i, 2, 11, equal_shards, 20 + i, world=world)
    widths = [r[3] for r in results]
    want_widths = [s[2] for s in parallel.shard_intermediate(i, world, equal_shards)]
    assert widths == want_widths, f"{i=} {world=}: shard widths {widths}"
    for rank, (excess, agree, diff, _, same) in enumerate(results):
        print(f"TP I={i} world={world} rank={rank}: max |diff| {diff:.3e}, bit-identical {same}")
        assert agree, f"{i=} {world=} rank={rank}: ranks returned different outputs"
        assert excess <= 0, f"{i=} {world=} rank={rank}: beyond the bound by {excess:.3e}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_models_within_bound(pool, model, world):
    # I = 160: 5 blocks, so 4 ranks get 2, 1, 1, 1 blocks, padded to 2.
    for rank, (excess, agree, diff, _, _) in enumerate(
            pool.run(tp_task, 8, 64, 160, 2, 7, True, 90, model, world=world)):
        assert agree, f"{model} world={world} rank={rank}: ranks returned different outputs"
        assert excess <= 0, (f"{model} world={world} rank={rank}: max |diff| {diff:.3e} is "
                             f"beyond the bound by {excess:.3e}")


def test_shard_intermediate():
    assert parallel.shard_intermediate(2880, 4, equal_shards=False) == [
        (0, 736, 736), (736, 1472, 736), (1472, 2176, 704), (2176, 2880, 704)]
    assert parallel.shard_intermediate(2880, 4) == [
        (0, 736, 736), (736, 1472, 736), (1472, 2176, 736), (2176, 2880, 736)]
    assert parallel.shard_intermediate(2880, 2) == [(0, 1440, 1440), (1440, 2880, 1440)]
    expect_error(lambda: parallel.shard_intermediate(64, 4),
                 "I must be a multiple of 32 with at least one block of 32 per rank, got I=64")
