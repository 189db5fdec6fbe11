"""GPT-OSS, DeepSeek-V3 and Qwen3-MoE blocks: loaded from each model's own checkpoint format and
checked against an independent float64 reference of that model's block.

Each test writes random weights the way the model's checkpoint stores them (GPT-OSS: MXFP4
``*_blocks``/``*_scales`` with interleaved gate/up rows and biases; DeepSeek-V3 and Qwen3:
per-expert compressed-tensors MXFP4, DeepSeek's ``gate.e_score_correction_bias`` and
``shared_experts``), loads them with ``MoELayer.from_checkpoint`` and runs ``forward_hidden``.

The float64 references below are written from the models' published definitions (transformers'
modeling_gpt_oss.py, modeling_deepseek_v3.py, modeling_qwen3_moe.py), not from mxmoe's code:
the model's router (its own dtype), routing, expert MLPs on the dequantized MXFP4 weights in
float64, with the activations quantized to MXFP4 where mxmoe quantizes them (the GEMM inputs).
The values that reach the activation quantizer are rounded to bf16 where the bf16 model rounds
them (the first GEMM's output, after its bias, and the activation's result): without that, a
value a bf16 ulp away from an E2M1 rounding boundary moves by a whole code step, which alone
costs ~1e-2 of relative error and would hide nothing but the choice of rounding points.
Gate: relative L2 <= 5e-3. Against the unquantized bf16 block (transformers' own module with the
same dequantized weights, so only the activation quantization differs): printed, with a loose
sanity bound.
"""

import json

import pytest
import torch
from expectations import random_activations, rel_l2
from safetensors.torch import save_file

import mxmoe
from mxmoe import ops, reference

BF16 = torch.bfloat16

transformers = pytest.importorskip("transformers")


def bf16(x: torch.Tensor) -> torch.Tensor:
    """A bf16 rounding point of the model, kept in float64."""
    return x.to(BF16).double()


def quantize_like_mxmoe(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 round trip of activations (bf16 rows), as float64: the GEMM inputs mxmoe sees."""
    codes, scales = reference.quantize_codes(x.to(BF16))
    return reference.dequantize(reference.pack_codes(codes), scales)


def mxfp4(w: torch.Tensor):
    """bf16 [E, N, K] -> (packed [E, N, K/2], scales [E, N, K/32], dequantized bf16)."""
    packed, scales = ops.quantize_weights(w.to(BF16))
    deq = torch.stack([reference.dequantize(packed[e], scales[e]) for e in range(w.shape[0])])
    return packed, scales, deq.to(BF16)


def report(name, out, ref64, bf16_block, bound=0.5):
    err = rel_l2(out, ref64)
    vs_bf16 = rel_l2(out, bf16_block)
    print(f"{name}: rel L2 vs float64 reference {err:.2e}, vs bf16 block {vs_bf16:.3f} (report)")
    assert err <= 5e-3, f"{name}: rel L2 vs float64 reference {err:.3e}"
    assert vs_bf16 < bound, f"{name}: rel L2 vs bf16 block {vs_bf16:.3f} (sanity bound {bound})"


def stable_topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, ties to the lower index."""
    return torch.sort(-v, dim=-1, stable=True).indices[..., :k]


# ---- GPT-OSS -------------------------------------------------------------------------------------


def gpt_oss_reference(x, router_w, router_b, gate_up, gate_up_bias, down, down_bias, top_k,
                      alpha, limit):
    """GptOssMLP in float64: router linear (bf16, as the model), top-k of the logits, softmax
    over them; experts: gate_up = x @ W + b with gate = even columns, up = odd; gate clamped
    above, up clamped both ways; (up + 1) * gate * sigmoid(alpha * gate); @ down + b."""
    logits = torch.nn.functional.linear(x, router_w, router_b).double()
    ids = stable_topk(logits, top_k)
    weights = torch.softmax(torch.gather(logits, 1, ids), dim=1)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    xq = quantize_like_mxmoe(x)
    for t in range(x.shape[0]):
        for s in range(top_k):
            e = int(ids[t, s])
            gu = bf16(bf16(xq[t] @ gate_up[e].double()) + gate_up_bias[e].double())
            gate, up = gu[0::2].clamp(max=limit), gu[1::2].clamp(-limit, limit)
            y = (up + 1) * (gate * torch.sigmoid(gate * alpha))
            yq = quantize_like_mxmoe(y.unsqueeze(0))[0]
            out[t] += weights[t, s] * (yq @ down[e].double() + down_bias[e].double())
    return out


def write_gpt_oss(tmp_path, e, h, i, top_k, seed):
    """Random GPT-OSS layer in its checkpoint format; returns the path and the bf16 tensors in
    transformers' in-memory layout (gate_up_proj [E, H, 2I] interleaved columns, ...)."""
    w13_rows = random_activations((e, 2 * i, h), seed=seed, scale=h**-0.5)  # interleaved rows
    w2 = random_activations((e, h, i), seed=seed + 1, scale=i**-0.5)
    p13, s13, d13 = mxfp4(w13_rows)
    p2, s2, d2 = mxfp4(w2)
    b13 = random_activations((e, 2 * i), seed=seed + 2, scale=0.3)
    b2 = random_activations((e, h), seed=seed + 3, scale=0.1)
    router_w = random_activations((e, h), seed=seed + 4, scale=h**-0.5)
    router_b = random_activations((e,), seed=seed + 5, scale=0.1)
    prefix = "model.layers.3.mlp"
    save_file({
        f"{prefix}.experts.gate_up_proj_blocks": p13.reshape(e, 2 * i, h // 32, 16),
        f"{prefix}.experts.gate_up_proj_scales": s13,
        f"{prefix}.experts.gate_up_proj_bias": b13,
        f"{prefix}.experts.down_proj_blocks": p2.reshape(e, h, i // 32, 16),
        f"{prefix}.experts.down_proj_scales": s2,
        f"{prefix}.experts.down_proj_bias": b2,
        f"{prefix}.router.weight": router_w,
        f"{prefix}.router.bias": router_b,
    }, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt_oss", "num_experts_per_tok": top_k, "swiglu_limit": 7.0}))
    model = {"gate_up_proj": d13.transpose(1, 2).contiguous(), "gate_up_proj_bias": b13,
             "down_proj": d2.transpose(1, 2).contiguous(), "down_proj_bias": b2,
             "router_w": router_w, "router_b": router_b}
    return tmp_path / "model.safetensors", prefix, model


def test_gpt_oss_block(tmp_path):
    e, h, i, top_k, t = 8, 96, 64, 4, 9
    path, prefix, m = write_gpt_oss(tmp_path, e, h, i, top_k, seed=1)
    layer = mxmoe.MoELayer.from_checkpoint(path, prefix)  # format="auto" -> gpt-oss
    assert (layer.activation, layer.routing, layer.top_k) == ("swiglu_oai", "topk_softmax", 4)
    x = random_activations((t, h), seed=9)
    out = layer.forward_hidden(x)
    ref = gpt_oss_reference(x, m["router_w"], m["router_b"], m["gate_up_proj"],
                            m["gate_up_proj_bias"], m["down_proj"], m["down_proj_bias"], top_k,
                            1.702, 7.0)
    config = transformers.GptOssConfig(hidden_size=h, intermediate_size=i, num_local_experts=e,
                                       num_experts_per_tok=top_k, num_hidden_layers=1)
    block = transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP(config).to(BF16)
    with torch.no_grad():
        block.router.weight.copy_(m["router_w"])
        block.router.bias.copy_(m["router_b"])
        for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            getattr(block.experts, name).copy_(m[name])
        bf16_out, _ = block(x.unsqueeze(0))
    report("gpt-oss", out, ref, bf16_out[0])
    # The same checkpoint with format given explicitly, and a sharded copy via an index.
    assert torch.equal(mxmoe.MoELayer.from_checkpoint(path, prefix, format="gpt-oss")
                       .forward_hidden(x), out)


# ---- DeepSeek-V3 ---------------------------------------------------------------------------------


def deepseek_v3_reference(x, router_w, correction, w13, w2, shared13, shared2, top_k, groups,
                          kept, scaling):
    """DeepseekV3MoE in float64: float32 router logits, sigmoid scores, choice = score +
    correction bias, group score = sum of the group's top-2 choices, keep `kept` groups, top-k
    of the kept experts by choice, weights = scores renormalized (norm_topk_prob) times the
    scaling factor; experts SiLU MLPs; the shared expert added with weight 1."""
    logits = torch.nn.functional.linear(x.float(), router_w.float()).double()
    scores = torch.sigmoid(logits)
    choice = scores + correction.double()
    t, e = choice.shape
    group_scores = choice.view(t, groups, e // groups).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros(t, groups, dtype=torch.bool)
    keep.scatter_(1, stable_topk(group_scores, kept), True)
    masked = choice.masked_fill(~keep.repeat_interleave(e // groups, dim=1), float("-inf"))
    ids = stable_topk(masked, top_k)
    weights = torch.gather(scores, 1, ids)
    weights = weights / weights.sum(-1, keepdim=True) * scaling
    xq = quantize_like_mxmoe(x)
    i = w2.shape[2]

    def mlp(xrow, gate_up, down):
        g = bf16(xrow @ gate_up.double().T)
        y = torch.nn.functional.silu(g[:i]) * g[i:]
        return quantize_like_mxmoe(y.unsqueeze(0))[0] @ down.double().T

    out = torch.zeros(t, x.shape[1], dtype=torch.float64)
    for r in range(t):
        for s in range(top_k):
            out[r] += weights[r, s] * mlp(xq[r], w13[int(ids[r, s])], w2[int(ids[r, s])])
        out[r] += mlp(xq[r], shared13, shared2)
    return out


def save_compressed_tensors(tensors, head, packed13, scales13, packed2, scales2, i):
    for e in range(packed13.shape[0]):
        for proj, p, s in (("gate_proj", packed13[e, :i], scales13[e, :i]),
                           ("up_proj", packed13[e, i:], scales13[e, i:]),
                           ("down_proj", packed2[e], scales2[e])):
            tensors[f"{head}{e}.{proj}.weight_packed"] = p.contiguous()
            tensors[f"{head}{e}.{proj}.weight_scale"] = s.contiguous()


def test_deepseek_v3_block(tmp_path):
    e, h, i, top_k, t, groups, kept, scaling = 16, 64, 64, 4, 11, 4, 2, 2.5
    w13 = random_activations((e + 1, 2 * i, h), seed=20, scale=h**-0.5)
    w2 = random_activations((e + 1, h, i), seed=21, scale=i**-0.5)
    p13, s13, d13 = mxfp4(w13)
    p2, s2, d2 = mxfp4(w2)
    router_w = random_activations((e, h), seed=22, dtype=torch.float32, scale=h**-0.5)
    correction = random_activations((e,), seed=23, dtype=torch.float32, scale=0.05)
    prefix = "model.layers.5.mlp"
    tensors = {f"{prefix}.gate.weight": router_w, f"{prefix}.gate.e_score_correction_bias":
               correction}
    save_compressed_tensors(tensors, f"{prefix}.experts.", p13[:e], s13[:e], p2[:e], s2[:e], i)
    for proj, p, s in (("gate_proj", p13[e, :i], s13[e, :i]), ("up_proj", p13[e, i:], s13[e, i:]),
                       ("down_proj", p2[e], s2[e])):
        tensors[f"{prefix}.shared_experts.{proj}.weight_packed"] = p.contiguous()
        tensors[f"{prefix}.shared_experts.{proj}.weight_scale"] = s.contiguous()
    # Sharded: experts in one file, router and shared expert in another, joined by an index.
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": [n for n in names if ".experts." in n]}
    shards["model-00002-of-00002.safetensors"] = [n for n in names if ".experts." not in n]
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, ms in shards.items() for n in ms}}))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "deepseek_v3", "num_experts_per_tok": top_k, "n_group": groups,
         "topk_group": kept, "routed_scaling_factor": scaling, "norm_topk_prob": True}))
    layer = mxmoe.MoELayer.from_checkpoint(tmp_path / "model.safetensors.index.json", prefix)
    assert (layer.routing, layer.num_shared_experts, layer.top_k) == (
        "sigmoid_grouped_topk", 1, top_k)
    x = random_activations((t, h), seed=24)
    out = layer.forward_hidden(x)
    ref = deepseek_v3_reference(x, router_w, correction, d13[:e], d2[:e], d13[e], d2[e], top_k,
                                groups, kept, scaling)
    config = transformers.DeepseekV3Config(
        hidden_size=h, moe_intermediate_size=i, n_routed_experts=e, num_experts_per_tok=top_k,
        n_group=groups, topk_group=kept, routed_scaling_factor=scaling, n_shared_experts=1,
        norm_topk_prob=True, num_hidden_layers=1)
    block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(config).to(BF16)
    with torch.no_grad():
        block.gate.weight.copy_(router_w)
        block.gate.e_score_correction_bias.copy_(correction)
        block.experts.gate_up_proj.copy_(d13[:e])
        block.experts.down_proj.copy_(d2[:e])
        block.shared_experts.gate_proj.weight.copy_(d13[e, :i])
        block.shared_experts.up_proj.weight.copy_(d13[e, i:])
        block.shared_experts.down_proj.weight.copy_(d2[e])
        bf16_out = block(x.unsqueeze(0))[0]
    report("deepseek-v3", out, ref, bf16_out)
    # Without config.json the grouped routing cannot be guessed: an error says what to pass.
    (tmp_path / "config.json").unlink()
    with pytest.raises(mxmoe.InvalidArgumentError, match="num_expert_groups, topk_groups"):
        mxmoe.MoELayer.from_checkpoint(tmp_path / "model.safetensors.index.json", prefix)
    explicit = mxmoe.MoELayer.from_checkpoint(
        tmp_path / "model.safetensors.index.json", prefix, top_k=top_k, num_expert_groups=groups,
        topk_groups=kept, routed_scaling_factor=scaling)
    assert torch.equal(explicit.forward_hidden(x), out)


# ---- Qwen3-MoE -----------------------------------------------------------------------------------


def qwen3_moe_reference(x, router_w, w13, w2, top_k):
    """Qwen3MoeSparseMoeBlock in float64: bf16 router logits, softmax in float, top-k,
    renormalized (norm_topk_prob); SiLU-and-mul experts."""
    logits = torch.nn.functional.linear(x, router_w).double()
    probs = torch.softmax(logits, dim=-1)
    ids = stable_topk(probs, top_k)
    weights = torch.gather(probs, 1, ids)
    weights = weights / weights.sum(-1, keepdim=True)
    xq = quantize_like_mxmoe(x)
    i = w2.shape[2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for r in range(x.shape[0]):
        for s in range(top_k):
            e = int(ids[r, s])
            g = bf16(xq[r] @ w13[e].double().T)
            y = quantize_like_mxmoe((torch.nn.functional.silu(g[:i]) * g[i:]).unsqueeze(0))[0]
            out[r] += weights[r, s] * (y @ w2[e].double().T)
    return out


def test_qwen3_moe_block(tmp_path):
    e, h, i, top_k, t = 16, 128, 32, 8, 7
    w13 = random_activations((e, 2 * i, h), seed=30, scale=h**-0.5)
    w2 = random_activations((e, h, i), seed=31, scale=i**-0.5)
    p13, s13, d13 = mxfp4(w13)
    p2, s2, d2 = mxfp4(w2)
    router_w = random_activations((e, h), seed=32, scale=h**-0.5)
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.gate.weight": router_w}
    save_compressed_tensors(tensors, f"{prefix}.experts.", p13, s13, p2, s2, i)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_moe", "num_experts_per_tok": top_k, "norm_topk_prob": True}))
    layer = mxmoe.MoELayer.from_checkpoint(tmp_path / "model.safetensors", prefix,
                                           format="compressed-tensors")
    assert (layer.routing, layer.top_k, layer.activation) == ("softmax_topk", top_k, "silu")
    x = random_activations((t, h), seed=33)
    out = layer.forward_hidden(x)
    ref = qwen3_moe_reference(x, router_w, d13, d2, top_k)
    config = transformers.Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e,
                                         num_experts_per_tok=top_k, norm_topk_prob=True,
                                         num_hidden_layers=1)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config)
    block = block.to(BF16)
    with torch.no_grad():
        block.gate.weight.copy_(router_w)
        block.experts.gate_up_proj.copy_(d13)
        block.experts.down_proj.copy_(d2)
        bf16_out = block(x.unsqueeze(0))[0]
    report("qwen3-moe", out, ref, bf16_out)


# ---- malformed checkpoints -----------------------------------------------------------------------


def test_malformed_gpt_oss_checkpoints_name_file_tensor_and_shape(tmp_path):
    path, prefix, _ = write_gpt_oss(tmp_path, 4, 64, 32, 2, seed=40)
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    bad = dict(tensors)
    bad[f"{prefix}.experts.down_proj_bias"] = torch.zeros(4, 65, dtype=BF16)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(mxmoe.InvalidArgumentError) as info:
        mxmoe.MoELayer.from_checkpoint(tmp_path / "bad.safetensors", prefix)
    message = str(info.value)
    for fragment in ("bad.safetensors", "down_proj_bias", "[4, 65]", "[E, H]", "[4, 64]"):
        assert fragment in message, message
    bad = dict(tensors)
    bad[f"{prefix}.experts.gate_up_proj_scales"] = torch.zeros(4, 64, 2, dtype=torch.int32)
    save_file(bad, str(tmp_path / "bad2.safetensors"))
    with pytest.raises(mxmoe.InvalidArgumentError, match=r"gate_up_proj_scales.*int32"):
        mxmoe.MoELayer.from_checkpoint(tmp_path / "bad2.safetensors", prefix)
    bad = {k: v for k, v in tensors.items() if "down_proj_blocks" not in k}
    save_file(bad, str(tmp_path / "bad3.safetensors"))
    with pytest.raises(mxmoe.InvalidArgumentError, match="down_proj_blocks not found"):
        mxmoe.MoELayer.from_checkpoint(tmp_path / "bad3.safetensors", prefix)
    with pytest.raises(mxmoe.InvalidArgumentError, match="format='gpt-oss' but"):
        mxmoe.MoELayer.from_checkpoint({"x": torch.zeros(1)}, prefix, format="gpt-oss")
    with pytest.raises(mxmoe.InvalidArgumentError, match="format must be one of"):
        mxmoe.MoELayer.from_checkpoint(path, prefix, format="ggml")


def test_gpt_oss_round_trip_and_expert_map(tmp_path):
    path, prefix, _ = write_gpt_oss(tmp_path, 6, 64, 32, 2, seed=50)
    layer = mxmoe.MoELayer.from_checkpoint(path, prefix)
    layer.save_checkpoint(tmp_path / "again.safetensors", prefix, format="gpt-oss")
    again = mxmoe.MoELayer.from_checkpoint(tmp_path / "again.safetensors", prefix, top_k=2)
    for name in ("w13_packed", "w13_scales", "w2_packed", "w2_scales", "w13_bias", "w2_bias"):
        assert torch.equal(getattr(layer, name), getattr(again, name)), name
    expert_map = [-1, 0, -1, 1, 2, -1]
    part = mxmoe.MoELayer.from_checkpoint(path, prefix, expert_map=expert_map)
    assert torch.equal(part.w13_packed, layer.w13_packed[[1, 3, 4]])
    assert torch.equal(part.w13_bias, layer.w13_bias[[1, 3, 4]])
    x = random_activations((5, 64), seed=51)
    ids, weights = layer.route(layer.router_logits(x))
    keep = torch.tensor([m >= 0 for m in expert_map])[ids.long()]
    want = layer.forward_topk(x, torch.where(keep, ids, 0),
                              torch.where(keep, weights, torch.zeros_like(weights)))
    # Remote slots contribute nothing: the full layer with those weights zeroed, bit for bit.
    assert torch.equal(part.forward_hidden(x), want)
