"""The MoE forward's model options on the CPU backend: activations, expert biases, routing modes,
shared experts, and the per-stage ops an expert-parallel caller composes.

Gates (all bit-exact, torch.equal):
- the CPU backend against mxmoe.reference.moe_forward (pure torch, written from the contract) for
  every activation x bias dtype x routing mode x shared experts;
- ops.route against the routing inside moe_forward (moe_forward(logits) == forward with the
  precomputed ids and weights);
- moe_forward against its stages composed from mxmoe.ops (route, experts_quantize,
  grouped_gemm, moe_activation_quantize, moe_add_expert_bias, moe_weighted_sum);
- routing edge cases (ties, equal group scores, all groups kept, top_k == kept experts, NaN);
- bad input for every new argument: status, a message naming the argument and value, and the
  output untouched.
"""

import itertools

import pytest
import torch
from expectations import assert_untouched, expect_error, poisoned, random_activations

import mxmoe
from mxmoe import _mxmoe, ops, reference

BF16 = torch.bfloat16


def expert_weights(e, h, i, seed, dtype=BF16):
    w13 = random_activations((e, 2 * i, h), seed=seed, dtype=dtype, scale=h**-0.5)
    w2 = random_activations((e, h, i), seed=seed + 1, dtype=dtype, scale=i**-0.5)
    return w13, w2


def expert_biases(e, h, i, seed, dtype):
    if dtype is None:
        return None, None
    return (random_activations((e, 2 * i), seed=seed, dtype=dtype, scale=0.5),
            random_activations((e, h), seed=seed + 1, dtype=dtype, scale=0.1))


ROUTING_OPTIONS = {
    "softmax_topk": {},
    "topk_softmax": {},
    "sigmoid_grouped_topk": {"num_expert_groups": 4, "topk_groups": 2,
                             "routed_scaling_factor": 2.5},
}


def build(activation, bias_dtype, routing, shared, *, e=8, h=64, i=96, tokens=13, seed=0,
          dtype=BF16, top_k=3):
    w13, w2 = expert_weights(e + shared, h, i, seed, dtype)
    w13_bias, w2_bias = expert_biases(e + shared, h, i, seed + 7, bias_dtype)
    options = dict(ROUTING_OPTIONS[routing])
    if routing == "sigmoid_grouped_topk":
        options["e_score_correction_bias"] = random_activations((e,), seed=seed + 9,
                                                                dtype=torch.float32, scale=0.1)
    layer = mxmoe.MoELayer.from_float(
        w13, w2, activation=activation, swiglu_alpha=1.702, swiglu_limit=7.0, w13_bias=w13_bias,
        w2_bias=w2_bias, routing=routing, top_k=top_k, num_shared_experts=shared, **options)
    x = random_activations((tokens, h), seed=seed + 2, dtype=dtype, scale=3.0)
    logits = random_activations((tokens, e), seed=seed + 3, dtype=torch.float32)
    return layer, x, logits


def reference_forward(layer, x, logits=None, topk_ids=None, topk_weights=None):
    o = layer.model_options()
    return reference.moe_forward(
        x, layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales,
        router_logits=logits, top_k=o["top_k"], renormalize=o["renormalize"], topk_ids=topk_ids,
        topk_weights=topk_weights, expert_map=layer.expert_map, activation=o["activation"],
        swiglu_alpha=o["swiglu_alpha"], swiglu_limit=o["swiglu_limit"], w13_bias=o["w13_bias"],
        w2_bias=o["w2_bias"], routing=o["routing"], num_expert_groups=o["num_expert_groups"],
        topk_groups=o["topk_groups"], routed_scaling_factor=o["routed_scaling_factor"],
        e_score_correction_bias=o["e_score_correction_bias"],
        num_shared_experts=o["num_shared_experts"])


def assert_equal(out, want, context):
    assert out.shape == want.shape and out.dtype == want.dtype, context
    same = (out == want) | (torch.isnan(out) & torch.isnan(want))
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{context}: {int((~same).sum())} of {out.numel()} elements "
                             f"differ, first at {bad}")


# Every activation x bias dtype x routing mode; shared experts on every other combination.
COMBINATIONS = [(a, b, r, k % 2) for k, (a, b, r) in enumerate(itertools.product(
    ["silu", "swiglu_oai"], [None, BF16, torch.float32],
    ["softmax_topk", "topk_softmax", "sigmoid_grouped_topk"]))]


@pytest.mark.parametrize("activation,bias_dtype,routing,shared", COMBINATIONS)
def test_cpu_equals_reference(activation, bias_dtype, routing, shared):
    layer, x, logits = build(activation, bias_dtype, routing, shared, seed=len(routing) + shared)
    out = layer(x, logits)
    assert_equal(out, reference_forward(layer, x, logits),
                 f"{activation=} {bias_dtype=} {routing=} {shared=}")
    # The routing of moe_forward is ops.route, bit for bit.
    ids, weights = layer.route(logits)
    assert_equal(layer.forward_topk(x, ids, weights), out, "forward_topk(route(logits))")


def test_awkward_shapes_gpt_oss_width_fp16_one_token_and_empty_experts():
    # H = 2880 (= 22.5 x 128), I = 160 (not a multiple of 128), fp16, one token, most experts
    # empty, two shared experts.
    layer, x, logits = build("swiglu_oai", torch.float32, "topk_softmax", 2, e=6, h=2880,
                             i=160, tokens=1, seed=5, dtype=torch.float16, top_k=2)
    assert_equal(layer(x, logits), reference_forward(layer, x, logits), "H=2880 I=160 fp16 T=1")


@pytest.mark.parametrize("routing", list(ROUTING_OPTIONS))
def test_zero_tokens_in_every_routing_mode(routing):
    # T = 0 is a valid batch (an idle expert-parallel rank): empty ids, weights and output, in
    # the layer, ops.route and the reference alike.
    layer, x, logits = build("swiglu_oai", BF16, routing, 1, tokens=0, seed=11)
    assert x.shape[0] == 0 and logits.shape[0] == 0
    ids, weights = layer.route(logits)
    assert ids.shape == (0, 3) and ids.dtype == torch.int32
    assert weights.shape == (0, 3) and weights.dtype == torch.float32
    out = layer(x, logits)
    assert out.shape == (0, x.shape[1]) and out.dtype == x.dtype
    assert_equal(out, reference_forward(layer, x, logits), f"T=0 {routing=}")
    assert layer.forward_topk(x, ids, weights).shape == (0, x.shape[1])


def test_fp16_bias_and_bf16_logits_with_expert_map():
    e_global, h, i, top_k = 8, 64, 64, 2
    w13, w2 = expert_weights(e_global // 2 + 1, h, i, seed=40)
    w13_bias, w2_bias = expert_biases(e_global // 2 + 1, h, i, 41, torch.float16)
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[1::2] = torch.arange(e_global // 2, dtype=torch.int32)
    layer = mxmoe.MoELayer.from_float(w13, w2, expert_map=expert_map, activation="swiglu_oai",
                                      w13_bias=w13_bias, w2_bias=w2_bias, routing="topk_softmax",
                                      top_k=top_k, num_shared_experts=1)
    x = random_activations((17, h), seed=42)
    logits = random_activations((17, e_global), seed=43)
    assert_equal(layer(x, logits), reference_forward(layer, x, logits), "expert_map + shared")


def test_stages_compose_to_moe_forward():
    # What an expert-parallel rank does with mxmoe.ops, checked against the fused moe_forward.
    for activation, routing, shared in [("swiglu_oai", "topk_softmax", 0),
                                        ("silu", "sigmoid_grouped_topk", 1),
                                        ("silu", "softmax_topk", 0)]:
        layer, x, logits = build(activation, BF16, routing, shared, seed=11)
        o = layer.model_options()
        ids, weights = layer.route(logits)
        t, top_k = ids.shape
        e = layer.num_experts
        local = torch.cat([ids.long(), torch.arange(e - shared, e).expand(t, shared)], dim=1)
        slot_weights = torch.cat([weights, torch.ones(t, shared)], dim=1)
        order = torch.sort(local.flatten() * (t * (top_k + shared)) +
                           torch.arange(local.numel())).indices  # by (expert, token, slot)
        rows_expert = local.flatten()[order]
        counts = torch.bincount(rows_expert, minlength=e)
        eo, bo = ops.expert_offsets_from_counts(counts)
        xs = x[order // (top_k + shared)]
        a, a_scales = ops.experts_quantize(xs, eo, bo)
        g = ops.grouped_gemm(a, a_scales, layer.w13_packed, layer.w13_scales, eo, bo)
        y, y_scales = ops.moe_activation_quantize(g, eo, bo, activation, o["swiglu_alpha"],
                                                  o["swiglu_limit"], o["w13_bias"])
        out_rows = ops.grouped_gemm(y, y_scales, layer.w2_packed, layer.w2_scales, eo, bo)
        out_rows = ops.moe_add_expert_bias(out_rows, eo, o["w2_bias"])
        per_slot = torch.empty(local.numel(), x.shape[1], dtype=x.dtype)
        per_slot[order] = out_rows
        out = ops.moe_weighted_sum(per_slot.view(t, top_k + shared, -1), slot_weights)
        assert_equal(out, layer(x, logits), f"stages {activation=} {routing=} {shared=}")


# ---- routing edge cases -----------------------------------------------------------------------


def route(logits, top_k, **options):
    return ops.route(logits, top_k, **options)


def test_ties_go_to_the_lower_id_in_every_mode():
    logits = torch.zeros(3, 8)
    for routing, options in ROUTING_OPTIONS.items():
        ids, weights = route(logits, 3, routing=routing, **options)
        want = torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32)
        if routing == "sigmoid_grouped_topk":
            want = torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32)  # groups 0 and 1 kept
        assert torch.equal(ids, want), f"{routing}: {ids.tolist()}"
        assert torch.allclose(weights.sum(1), torch.full((3,), 2.5 if options else 1.0)), routing


def test_equal_group_scores_keep_the_lower_groups():
    # 4 groups of 2; groups 1 and 3 have equal scores above groups 0 and 2.
    logits = torch.tensor([[0.0, 0.0, 2.0, 1.0, -1.0, -1.0, 1.0, 2.0]])
    ids, _ = route(logits, 2, routing="sigmoid_grouped_topk", num_expert_groups=4, topk_groups=1)
    assert ids.tolist() == [[2, 3]]
    ids, _ = route(logits, 4, routing="sigmoid_grouped_topk", num_expert_groups=4, topk_groups=2)
    assert ids.tolist() == [[2, 7, 3, 6]]  # 2 and 7 tie: lower id first


def test_all_groups_kept_equals_no_grouping_and_top_k_equal_to_kept_experts():
    logits = random_activations((9, 16), seed=3, dtype=torch.float32)
    bias = random_activations((16,), seed=4, dtype=torch.float32, scale=0.2)
    all_kept = route(logits, 5, routing="sigmoid_grouped_topk", num_expert_groups=4,
                     topk_groups=4, e_score_correction_bias=bias)
    ungrouped = route(logits, 5, routing="sigmoid_grouped_topk", e_score_correction_bias=bias)
    assert torch.equal(all_kept[0], ungrouped[0]) and torch.equal(all_kept[1], ungrouped[1])
    ids, weights = route(logits, 8, routing="sigmoid_grouped_topk", num_expert_groups=4,
                         topk_groups=2, e_score_correction_bias=bias)
    # The 8 chosen experts are exactly the two kept groups (each of 4 experts).
    groups = (ids.long() // 4).sort(dim=1).values
    assert bool((groups[:, :4] == groups[:, :1]).all() and (groups[:, 4:] == groups[:, 4:5]).all())
    assert torch.allclose(weights.sum(1), torch.ones(9))
    layer, x, lg = build("silu", None, "sigmoid_grouped_topk", 0, e=16, top_k=8, seed=8)
    assert_equal(layer(x, lg), reference_forward(layer, x, lg), "top_k == kept experts")


def test_nan_logits_documented_behaviour():
    nan = float("nan")
    logits = torch.tensor([[nan, 1.0, 3.0, 2.0, nan, 0.0, -1.0, 5.0]])
    # topk_softmax and sigmoid: a NaN is never chosen while numbers remain; weights stay finite.
    ids, w = route(logits, 3, routing="topk_softmax")
    assert ids.tolist() == [[7, 2, 3]] and bool(torch.isfinite(w).all())
    ids, w = route(logits, 3, routing="sigmoid_grouped_topk", num_expert_groups=4, topk_groups=2)
    assert ids.tolist() == [[7, 2, 3]] and bool(torch.isfinite(w).all())
    ids, w = route(logits, 7, routing="topk_softmax")
    assert ids.tolist() == [[7, 2, 3, 1, 5, 6, 0]] and bool(torch.isnan(w).all())
    # softmax_topk: a NaN poisons the denominator, so every probability is NaN; the ids are
    # then the lowest ones (all rank equal) and the token's output is NaN.
    ids, w = route(logits, 2)
    assert ids.tolist() == [[0, 1]] and bool(torch.isnan(w).all())
    layer, x, _ = build("silu", None, "softmax_topk", 0, tokens=2, top_k=2)
    two = torch.cat([logits, torch.zeros(1, 8)])
    out = layer(x, two)
    assert bool(torch.isnan(out[0]).all()) and bool(torch.isfinite(out[1]).all())
    assert_equal(out, reference_forward(layer, x, two), "NaN logits")


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    e, h, i, t = 4, 64, 32, 5
    w13, w2 = expert_weights(e, h, i, seed=60)
    w = ops.quantize_weights(w13) + ops.quantize_weights(w2)
    return {"e": e, "h": h, "i": i, "t": t, "w": w, "x": random_activations((t, h), seed=61),
            "logits": random_activations((t, e), seed=62, dtype=torch.float32)}


def module_call(small, out, global_experts=None, topk=None, **fields):
    options = _mxmoe.MoeOptions()
    for name, value in fields.items():
        setattr(options, name, value)
    w13_packed, w13_scales, w2_packed, w2_scales = small["w"]
    logits = None if topk else small["logits"]
    ids, weights = topk if topk else (None, None)
    args = (small["x"], w13_packed, w13_scales, w2_packed, w2_scales, _mxmoe.WEIGHT_FORMAT_LINEAR,
            0, small["e"], small["i"], global_experts or small["e"], 2, True, logits, ids,
            weights, None, out, options)
    return lambda: _mxmoe.moe_forward(*args, torch.empty(1 << 22, dtype=torch.uint8))


BAD_FIELDS = [
    ({"activation": 2}, "activation must be SILU_AND_MUL (0) or SWIGLU_OAI (1), got 2"),
    ({"activation": 1, "swiglu_alpha": 1.0, "swiglu_limit": 0.0},
     "swiglu_limit must be > 0, got 0"),
    ({"activation": 1, "swiglu_alpha": 1.0, "swiglu_limit": -7.0},
     "swiglu_limit must be > 0, got -7"),
    ({"activation": 1, "swiglu_alpha": float("inf"), "swiglu_limit": 7.0},
     "swiglu_alpha must be finite, got inf"),
    ({"routing": 3}, "routing must be SOFTMAX_TOPK (0), TOPK_SOFTMAX (1) or SIGMOID_GROUPED_TOPK "
                     "(2), got 3"),
    ({"routing": 2, "num_expert_groups": 3}, "num_expert_groups must be 0 or a divisor of "
                                             "num_global_experts = 4, got 3"),
    ({"routing": 2, "num_expert_groups": 2, "topk_groups": 3}, "topk_groups must be in [0, "
                                                               "num_expert_groups = 2], got 3"),
    ({"routing": 2, "num_expert_groups": 4, "topk_groups": 1}, "top_k must be <= the 1 experts "
                                                               "of the kept groups"),
    ({"routing": 0, "num_expert_groups": 2}, "num_expert_groups applies to SIGMOID_GROUPED_TOPK"),
    ({"routed_scaling_factor": -1.0}, "routed_scaling_factor must be > 0 and finite, or 0 (= 1), "
                                      "got -1"),
    ({"num_shared_experts": 4}, "num_shared_experts must be in [0, num_local_experts - 1 = 3]"),
    ({"num_shared_experts": 1}, "expert_map is NULL, so num_global_experts (4) must equal "
                                "num_local_experts - num_shared_experts (4 - 1 = 3)"),
]


@pytest.mark.parametrize("fields,message", BAD_FIELDS)
def test_bad_model_options_leave_output_untouched(small, fields, message):
    out = poisoned((small["t"], small["h"]), BF16)
    expect_error(module_call(small, out, **fields), message)
    assert_untouched(out, "output")


def test_bad_biases(small):
    e, h, i = small["e"], small["h"], small["i"]
    out = poisoned((small["t"], small["h"]), BF16)
    expect_error(module_call(small, out, w13_bias=torch.zeros(e, i)), "w13_bias", "[4, 64]",
                 "[4, 32]")
    expect_error(module_call(small, out, w2_bias=torch.zeros(e, h, dtype=torch.int32)),
                 "w2_bias", "int32")
    expect_error(module_call(small, out, routing=0,
                             e_score_correction_bias=torch.zeros(e)),
                 "e_score_correction_bias applies to SIGMOID_GROUPED_TOPK routing only")
    ids = torch.zeros(small["t"], 2, dtype=torch.int32)
    topk = (ids, torch.ones(small["t"], 2))
    expect_error(module_call(small, out, topk=topk, routing=1),
                 "routing applies to router_logits only", "got 1")
    expect_error(module_call(small, out, topk=topk, routed_scaling_factor=2.5),
                 "routed_scaling_factor applies to router_logits only", "got 2.5")
    assert_untouched(out, "output")
    layer_args = (small["w"][0], small["w"][1], small["w"][2], small["w"][3])
    expect_error(lambda: mxmoe.MoELayer(*layer_args, activation="gelu"), "activation must be one "
                 "of 'silu', 'swiglu_oai', got 'gelu'")
    expect_error(lambda: mxmoe.MoELayer(*layer_args, routing="softmax"), "routing must be one of")
    expect_error(lambda: mxmoe.MoELayer(*layer_args, w13_bias=torch.zeros(e, 2 * i + 1)),
                 "w13_bias", "[4, 64]")
    expect_error(lambda: mxmoe.MoELayer(*layer_args, num_shared_experts=4),
                 "num_shared_experts must be in [0, 3]")
    expect_error(lambda: ops.route(small["logits"], 2, routing="sigmoid_grouped_topk",
                                   num_expert_groups=3), "num_expert_groups", "got 3")
    expect_error(lambda: mxmoe.MoELayer(*layer_args).forward_hidden(small["x"]),
                 "no router")
