"""mxmoe.integrations.transformers on tiny random-config transformers models built locally (no
hub): Qwen3-MoE, Mixtral and DeepSeek-V3 have their experts swapped in one call, the model's own
routing is kept (the swapped module returns exactly MoELayer.forward_topk of the router's ids
and weights), and the logits stay close to the bf16 model's: the relative L2 error is printed
as a report and bounded (MXFP4 W4A4 on random weights). GPT-OSS is refused with a clear error.
Cost: a few seconds (two-layer models, 8 tokens)."""

import pytest
import torch

import mxmoe
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


def test_gpt_oss_is_refused_by_name():
    config = transformers.GptOssConfig(**TINY, intermediate_size=64, num_local_experts=4,
                                       num_experts_per_tok=2, head_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(mxmoe.UnsupportedError, match="GptOssExperts.*not served yet"):
        replace_moe_experts(model)
