"""MoE forward (CPU backend) and MoELayer against the reference MoE with the same quantization.

Gate: relative L2 error <= 5e-3 against reference.moe_forward (float64 GEMMs on the dequantized
operands, the contract's rounding points). The error against the unquantized bf16 layer is
printed as a report (MXFP4's own error), never asserted.
"""

import pytest
import torch
from expectations import random_activations, rel_l2

import mxmoe
from mxmoe import ops, reference


def make_weights(e, h, i, seed, dtype=torch.bfloat16):
    w13 = random_activations((e, 2 * i, h), seed=seed, dtype=dtype, scale=h**-0.5)
    w2 = random_activations((e, h, i), seed=seed + 1, dtype=dtype, scale=i**-0.5)
    return w13, w2


def check_layer(e, h, i, top_k, tokens, seed, renormalize=True, dtype=torch.bfloat16,
                logits_dtype=torch.float32):
    w13, w2 = make_weights(e, h, i, seed, dtype)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    x = random_activations((tokens, h), seed=seed + 2, dtype=dtype)
    logits = random_activations((tokens, e), seed=seed + 3, dtype=logits_dtype)
    out = layer(x, logits, top_k=top_k, renormalize=renormalize)
    assert out.shape == (tokens, h) and out.dtype == dtype
    want = reference.moe_forward(x, layer.w13_packed, layer.w13_scales, layer.w2_packed,
                        layer.w2_scales, router_logits=logits, top_k=top_k,
                        renormalize=renormalize)
    err = rel_l2(out, want)
    ids, weights = reference.route(logits, top_k, renormalize)
    unquantized = reference.moe_forward_unquantized(x, w13, w2, ids, weights)
    print(f"E={e} H={h} I={i} top_k={top_k} T={tokens}: rel L2 vs reference {err:.2e}, "
          f"vs unquantized {dtype} layer {rel_l2(out, unquantized):.3f} (report)")
    assert err <= 5e-3, f"{e=} {h=} {i=} {top_k=} {tokens=} {renormalize=}: rel L2 {err:.3e}"
    return layer


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("renormalize", [True, False])
def test_small_layer(tokens, renormalize):
    check_layer(e=8, h=256, i=128, top_k=2, tokens=tokens, seed=tokens, renormalize=renormalize)


def test_gpt_oss_hidden_size():
    # H = 2880 = 22.5 x 128, I = 2880 too: nothing may need multiples of 128.
    check_layer(e=4, h=2880, i=2880, top_k=2, tokens=9, seed=21)


def test_fp16_activations_and_bf16_logits():
    check_layer(e=6, h=128, i=96, top_k=3, tokens=33, seed=22, dtype=torch.float16,
                logits_dtype=torch.bfloat16)


def test_single_expert_top1():
    check_layer(e=1, h=64, i=32, top_k=1, tokens=5, seed=23)


def test_256_experts():
    check_layer(e=256, h=64, i=32, top_k=8, tokens=40, seed=24)


def test_precomputed_topk_with_duplicates():
    e, h, i, tokens = 4, 128, 64, 5
    w13, w2 = make_weights(e, h, i, seed=30)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    x = random_activations((tokens, h), seed=31)
    ids = torch.tensor([[1, 1], [0, 2], [3, 3], [2, 0], [1, 3]], dtype=torch.int32)
    weights = torch.tensor([[0.25, 0.5]] * tokens, dtype=torch.float32)
    out = layer.forward_topk(x, ids, weights)
    want = reference.moe_forward(x, layer.w13_packed, layer.w13_scales, layer.w2_packed,
                                 layer.w2_scales, topk_ids=ids, topk_weights=weights)
    err = rel_l2(out, want)
    assert err <= 5e-3, f"duplicate experts in top-k: rel L2 {err:.3e}"


def test_expert_map_keeps_half_the_experts():
    e_global, h, i, top_k, tokens = 8, 64, 64, 2, 24
    w13, w2 = make_weights(e_global // 2, h, i, seed=40)
    expert_map = torch.full((e_global,), -1, dtype=torch.int32)
    expert_map[1::2] = torch.arange(e_global // 2, dtype=torch.int32)
    layer = mxmoe.MoELayer.from_float(w13, w2, expert_map=expert_map)
    x = random_activations((tokens, h), seed=41)
    logits = random_activations((tokens, e_global), seed=42, dtype=torch.float32)
    out = layer(x, logits, top_k=top_k)
    want = reference.moe_forward(x, layer.w13_packed, layer.w13_scales, layer.w2_packed,
                                 layer.w2_scales, router_logits=logits, top_k=top_k,
                                 expert_map=expert_map)
    err = rel_l2(out, want)
    assert err <= 5e-3, f"expert_map: rel L2 {err:.3e}"
    # Tokens whose experts are all remote get exactly zero.
    ids, _ = reference.route(logits, top_k)
    remote = (expert_map[ids.long()] < 0).all(dim=1)
    if remote.any():
        assert bool((out[remote] == 0).all())


def test_layer_api_leading_dims_state_dict_and_backend():
    e, h, i = 4, 64, 32
    w13, w2 = make_weights(e, h, i, seed=50)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    assert layer.backend == "cpu" and mxmoe.backend_for(w13) == "cpu"
    assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (e, h, i)
    assert "experts=4" in repr(layer)
    x = random_activations((2, 3, h), seed=51)
    logits = random_activations((2, 3, e), seed=52, dtype=torch.float32)
    out = layer(x, logits, top_k=2)
    assert out.shape == (2, 3, h)
    flat = layer(x.reshape(6, h), logits.reshape(6, e), top_k=2)
    assert torch.equal(out.reshape(6, h), flat)
    clone = mxmoe.MoELayer(*(torch.empty_like(t) for t in (
        layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales)))
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x, logits, top_k=2), out)


def test_moe_forward_op_directly():
    e, h, i, tokens = 3, 96, 64, 10
    w13, w2 = make_weights(e, h, i, seed=60)
    w13_packed, w13_scales = ops.quantize_weights(w13)
    w2_packed, w2_scales = ops.quantize_weights(w2)
    x = random_activations((tokens, h), seed=61)
    logits = random_activations((tokens, e), seed=62, dtype=torch.float32)
    out = ops.moe_forward(x, w13_packed, w13_scales, w2_packed, w2_scales,
                          router_logits=logits, top_k=2)
    ids, weights = reference.route(logits, 2)
    out_topk = ops.moe_forward(x, w13_packed, w13_scales, w2_packed, w2_scales, topk_ids=ids,
                               topk_weights=weights)
    assert rel_l2(out, out_topk) <= 1e-3
    want = reference.moe_forward(x, w13_packed, w13_scales, w2_packed, w2_scales,
                                 router_logits=logits, top_k=2)
    assert rel_l2(out, want) <= 5e-3


def test_zero_tokens():
    e, h, i = 2, 32, 32
    w13, w2 = make_weights(e, h, i, seed=70)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    out = layer(torch.empty(0, h, dtype=torch.bfloat16), torch.empty(0, e), top_k=1)
    assert out.shape == (0, h)
