"""Whole transformers models (tiny random configs, built locally, no hub) with their MoE blocks
swapped for mxmoe: GPT-OSS, DeepSeek-V3 and Qwen3-MoE.

Each model runs twice on the same tokens: as built (bf16, transformers' own MoE modules) and with
every MoE block replaced by an ``MoELayer`` holding the same experts quantized to MXFP4 (plus the
model's router, routing, biases and shared expert). The logits' relative L2 difference is the
cost of MXFP4 weights and activations through the whole model: printed, with a sanity bound
(a wrong activation, bias, routing or de-interleaving gives errors near 1). A tiny GPT-OSS is
also written in GPT-OSS's MXFP4 checkpoint format and loaded back with format="gpt-oss".
Cost: about 10 s on 2 cores, most of it importing transformers.
"""

import pytest
import torch

import mxmoe
from mxmoe import checkpoint
from mxmoe.measure import rel_l2

transformers = pytest.importorskip("transformers")
BF16 = torch.bfloat16


def randomize(module, seed, scale=0.05):
    """Random values for every float parameter and buffer (transformers inits biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.dtype.is_floating_point and "inv_freq" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class GptOssBlock(torch.nn.Module):
    """GptOssMLP's interface (returns (hidden, router_scores)) over an MoELayer."""

    def __init__(self, mlp):
        super().__init__()
        ex = mlp.experts
        w13 = ex.gate_up_proj.transpose(1, 2)  # [E, 2I, H], rows interleaved gate/up
        b13 = ex.gate_up_proj_bias
        self.layer = mxmoe.MoELayer.from_float(
            torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1).contiguous().to(BF16),
            ex.down_proj.transpose(1, 2).contiguous().to(BF16),
            activation="swiglu_oai", swiglu_alpha=ex.alpha, swiglu_limit=ex.limit,
            w13_bias=torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1).contiguous(),
            w2_bias=ex.down_proj_bias.detach(), routing="topk_softmax", top_k=mlp.router.top_k,
            router_weight=mlp.router.weight.detach(), router_bias=mlp.router.bias.detach())

    def forward(self, hidden_states):
        shape = hidden_states.shape
        out = self.layer.forward_hidden(hidden_states.reshape(-1, shape[-1]))
        return out.reshape(shape), None


class TensorBlock(torch.nn.Module):
    """A block returning a tensor (DeepSeek-V3, Qwen3-MoE) over an MoELayer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states):
        shape = hidden_states.shape
        return self.layer.forward_hidden(hidden_states.reshape(-1, shape[-1])).reshape(shape)


def deepseek_block(moe, config):
    ex, shared = moe.experts, moe.shared_experts
    w13 = torch.cat([ex.gate_up_proj, torch.cat([shared.gate_proj.weight,
                                                 shared.up_proj.weight]).unsqueeze(0)])
    w2 = torch.cat([ex.down_proj, shared.down_proj.weight.unsqueeze(0)])
    return TensorBlock(mxmoe.MoELayer.from_float(
        w13.detach().to(BF16), w2.detach().to(BF16), routing="sigmoid_grouped_topk",
        top_k=config.num_experts_per_tok, renormalize=config.norm_topk_prob,
        num_expert_groups=config.n_group, topk_groups=config.topk_group,
        routed_scaling_factor=config.routed_scaling_factor,
        e_score_correction_bias=moe.gate.e_score_correction_bias.detach().float(),
        num_shared_experts=1, router_weight=moe.gate.weight.detach().float()))


def qwen3_block(moe, config):
    ex = moe.experts
    return TensorBlock(mxmoe.MoELayer.from_float(
        ex.gate_up_proj.detach().to(BF16), ex.down_proj.detach().to(BF16),
        routing="softmax_topk", top_k=config.num_experts_per_tok,
        renormalize=config.norm_topk_prob, router_weight=moe.gate.weight.detach()))


def compare(model, swap, name, seed, bound=0.35):
    model = model.to(BF16).eval()
    randomize(model, seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9),
                           generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(tokens).logits.float()
        swapped = 0
        for layer in model.model.layers:
            block = swap(layer.mlp)
            if block is not None:
                layer.mlp = block
                swapped += 1
        got = model(tokens).logits.float()
    assert swapped > 0
    err = rel_l2(got, want)
    print(f"{name}: {swapped} MoE blocks swapped, logits rel L2 vs bf16 model {err:.3f} (report)")
    assert err < bound, f"{name}: logits rel L2 {err:.3f} above the sanity bound {bound}"
    return model


def test_gpt_oss_model(tmp_path):
    config = transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=64)
    model = compare(transformers.GptOssForCausalLM(config), GptOssBlock, "gpt-oss", seed=1)
    # The MXFP4 GPT-OSS checkpoint format, written and read back: the same block bit for bit.
    layer = model.model.layers[0].mlp.layer
    layer.save_checkpoint(tmp_path / "gpt_oss.safetensors", "model.layers.0.mlp",
                          format="gpt-oss")
    loaded = mxmoe.MoELayer.from_checkpoint(tmp_path / "gpt_oss.safetensors",
                                            "model.layers.0.mlp", format="gpt-oss", top_k=2)
    x = torch.randn(5, 64).to(BF16)
    assert torch.equal(loaded.forward_hidden(x), layer.forward_hidden(x))
    assert loaded.w13_bias.dtype == layer.w13_bias.dtype
    assert "gpt-oss" in checkpoint.FORMATS


def test_deepseek_v3_model():
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=64)

    def swap(mlp):
        if not hasattr(mlp, "experts"):
            return None  # the dense first layer
        return deepseek_block(mlp, config)

    compare(transformers.DeepseekV3ForCausalLM(config), swap, "deepseek-v3", seed=2)


def test_qwen3_moe_model():
    config = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64)
    compare(transformers.Qwen3MoeForCausalLM(config), lambda mlp: qwen3_block(mlp, config),
            "qwen3-moe", seed=3)
