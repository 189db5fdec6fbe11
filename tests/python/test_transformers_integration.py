"""mxmoe.integrations.transformers on tiny random-config transformers models built locally (no
hub): Qwen3-MoE, Mixtral, DeepSeek-V3 and GPT-OSS have their experts swapped in one call, the model's own
routing is kept (the swapped module returns exactly MoELayer.forward_topk of the router's ids
and weights), and the logits stay close to the bf16 model's: the relative L2 error is printed
as a report and bounded (MXFP4 W4A4 on random weights). GPT-OSS's swapped experts (transposed,
de-interleaved, biases, clamped SwiGLU) are also checked against GptOssExperts itself computed in
float32 on the dequantized MXFP4 weights. An unservable experts module is refused by name.
Cost: a few seconds (two-layer models, 8 tokens)."""

import pytest
import torch

import mxmoe
from mxmoe import ops
from mxmoe.integrations.transformers import MxmoeExperts, replace_moe_experts

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64)


def qwen3_moe():
    return transformers.Qwen3MoeConfig(**TINY, intermediate_size=96, moe_intermediate_size=32,
                                       num_experts=8, num_experts_per_tok=2, head_dim=32,
                                       norm_topk_prob=True)


def mixtral():
    return transformers.MixtralConfig(**TINY, intermediate_size=64, num_local_experts=6,
                                      num_experts_per_tok=2, head_dim=32)


def deepseek_v3():
    return transformers.DeepseekV3Config(**TINY, intermediate_size=96, moe_intermediate_size=32,
                                         n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                         topk_group=1, n_shared_experts=1,
                                         first_k_dense_replace=1, q_lora_rank=None,
                                         kv_lora_rank=32, qk_rope_head_dim=16,
                                         qk_nope_head_dim=16, v_head_dim=32)


# Relative L2 error of the logits against the bf16 model, bounded loosely: random weights and
# activations give MXFP4 W4A4 its typical per-layer error of 10-20%, diluted by the residuals
# (measured: Qwen3-MoE 0.015, Mixtral 0.023, DeepSeek-V3 0.027).
BOUND = 0.08


@pytest.mark.parametrize("make_config", [qwen3_moe, mixtral, deepseek_v3])
def test_replace_moe_experts_keeps_routing_and_bounds_logits(make_config):
    torch.manual_seed(0)
    config = make_config()
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.inference_mode():
        want = model(ids).logits.float()
    experts_before = {n: m for n, m in model.named_modules() if type(m).__name__.endswith(
        "Experts")}
    replaced = replace_moe_experts(model)
    assert replaced and set(replaced) == set(experts_before), f"{set(replaced)}"
    calls = []
    for module in replaced.values():
        assert isinstance(module, MxmoeExperts)
        module.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
    with torch.inference_mode():
        got = model(ids).logits.float()
    assert len(calls) == len(replaced)
    for module, (hidden, top_k_index, top_k_weights), out in calls:
        # The model's router produced these; the swap computes exactly the mxmoe layer on them.
        assert top_k_index.dtype == torch.int64
        assert torch.equal(out, module.moe.forward_topk(hidden, top_k_index, top_k_weights))
    err = float((got - want).norm() / want.norm())
    print(f"{type(model).__name__}: logits rel L2 vs bf16 {err:.3f} (bound {BOUND})")
    assert torch.isfinite(got).all() and err < BOUND, f"{err=}"
    assert not any(type(m).__name__ == type(next(iter(experts_before.values()))).__name__
                   for m in model.modules())


def gpt_oss():
    return transformers.GptOssConfig(**TINY, intermediate_size=64, num_local_experts=4,
                                     num_experts_per_tok=2, head_dim=32, sliding_window=8)


def randomize_biases(model, seed):
    # transformers initialises the expert and router biases to 0: give them values, so a bias
    # added twice, to the wrong half or not at all shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_gpt_oss_experts_are_served():
    torch.manual_seed(1)
    config = gpt_oss()
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    randomize_biases(model, 2)
    originals = {n: m for n, m in model.named_modules() if type(m).__name__ == "GptOssExperts"}
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.inference_mode():
        want = model(ids).logits.float()
    replaced = replace_moe_experts(model)
    assert set(replaced) == set(originals)
    with torch.inference_mode():
        got = model(ids).logits.float()
    err = float((got - want).norm() / want.norm())
    print(f"GptOssForCausalLM: logits rel L2 vs bf16 {err:.3f} (bound {BOUND})")
    assert torch.isfinite(got).all() and err < BOUND, f"{err=}"

    # One block against GptOssExperts' own forward in float32 on the dequantized weights and
    # the layer's quantized activations: a de-interleaving or transposition error is O(1).
    name, original = next(iter(originals.items()))
    moe = replaced[name].moe
    torch.manual_seed(3)
    x = (torch.randn(6, config.hidden_size) * 2).to(torch.bfloat16)
    top_ids = torch.stack([torch.randperm(config.num_local_experts)[:2] for _ in range(6)])
    top_w = torch.softmax(torch.randn(6, 2), dim=1)
    with torch.inference_mode():
        out = replaced[name](x, top_ids, top_w)
        w13 = ops.dequantize(moe.w13_packed, moe.w13_scales).double()  # [E, 2I, H] gate | up
        w2 = ops.dequantize(moe.w2_packed, moe.w2_scales).double()  # [E, H, I]
        i = w2.shape[2]
        interleaved = torch.empty_like(w13)
        interleaved[:, 0::2], interleaved[:, 1::2] = w13[:, :i], w13[:, i:]
        # float32 (transformers' grouped-mm experts path takes no float64; the dequantized
        # operands are exact in it, only the accumulation rounds).
        ref = original.float()
        ref.gate_up_proj.copy_(interleaved.transpose(1, 2))
        ref.down_proj.copy_(w2.transpose(1, 2))
        xq = ops.dequantize(*ops.quantize(x)).float()
        want_block = ref(xq, top_ids, top_w).double()
    block_err = float((out.double() - want_block).norm() / want_block.norm())
    print(f"GptOssExperts block: rel L2 vs float32 GPT-OSS on dequantized operands "
          f"{block_err:.4f}")
    # Left: the MXFP4 quantization of the activation between the GEMMs and bf16 roundings.
    assert block_err < 0.08, f"{block_err=}"


def test_unservable_experts_are_refused_by_name():
    config = qwen3_moe()
    model = transformers.AutoModelForCausalLM.from_config(config)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    experts.act_fn = torch.nn.GELU()
    with pytest.raises(mxmoe.UnsupportedError, match="Qwen3MoeExperts.*GELU is not SiLU"):
        replace_moe_experts(model)
    assert not any(isinstance(m, MxmoeExperts) for m in model.modules())
