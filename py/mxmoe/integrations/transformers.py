"""Swap the experts of Hugging Face transformers MoE models for mxmoe layers, in one call.

    from mxmoe.integrations.transformers import replace_moe_experts
    replaced = replace_moe_experts(model)          # {module name: MxmoeExperts}
    with torch.inference_mode():
        logits = model(input_ids).logits

Serves the transformers >= 5 layout, in which a model's experts are one module holding
``gate_up_proj`` [E, 2I, H] (rows [0, I) gate, [I, 2I) up), ``down_proj`` [E, H, I] and a SiLU
``act_fn``, called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``:
Qwen3-MoE (``Qwen3MoeExperts``), Mixtral (``MixtralExperts``) and DeepSeek-V3
(``DeepseekV3Experts``), and any other model whose experts module has that shape. GPT-OSS
(``GptOssExperts``: ``gate_up_proj`` [E, H, 2I] with gate/up columns interleaved,
``down_proj`` [E, I, H], both with biases, and the clamped SwiGLU of ``alpha`` and ``limit``) is
transposed and de-interleaved into the same layout and served with ``activation="swiglu_oai"``
and its biases. Only the experts are replaced: the model's own router (softmax top-k, GPT-OSS's
top-k-then-softmax, DeepSeek's grouped sigmoid routing with its bias and scaling) and its shared
experts keep running as they are; the router's int64 ids and bf16/fp32 weights go straight into
``MoELayer.forward_topk``.

Weights are quantized to MXFP4 once (bf16 weights directly; fp32 weights rounded to bf16
first). The replaced module's bf16 weights are released with it.

Limits:
- An experts module of another layout (a non-SiLU activation, biases outside GPT-OSS, other
  shapes) raises UnsupportedError naming the module; nothing is replaced then.
- Inference only: run the model under ``torch.inference_mode()`` / ``torch.no_grad()``
  (mxmoe refuses activations that require grad).
- fp32 activations are computed in bf16 and returned in fp32 (mxmoe's activations are bf16 or
  fp16).
"""

from __future__ import annotations

import torch

from mxmoe import ops
from mxmoe.moe import MoELayer

__all__ = ["MxmoeExperts", "replace_moe_experts"]

class MxmoeExperts(torch.nn.Module):
    """A transformers experts module backed by an mxmoe ``MoELayer`` (same call signature)."""

    def __init__(self, layer: MoELayer, replaced: str = ""):
        super().__init__()
        self.moe = layer
        self.replaced = replaced
        self.num_experts = layer.num_experts
        self.hidden_dim = layer.hidden_size
        self.intermediate_dim = layer.intermediate_size

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states if hidden_states.dtype in (torch.bfloat16, torch.float16) else \
            hidden_states.to(torch.bfloat16)
        out = self.moe.forward_topk(x, top_k_index, top_k_weights)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"replaces={self.replaced}"


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _experts_like(module: torch.nn.Module) -> bool:
    w13 = getattr(module, "gate_up_proj", None)
    w2 = getattr(module, "down_proj", None)
    return isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor) and \
        w13.dim() == 3 and w2.dim() == 3


def _low(w: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 weights as they are; fp32 rounded to bf16 (the quantizer's input dtypes)."""
    w = w.detach()
    return w if w.dtype in (torch.bfloat16, torch.float16) else w.to(torch.bfloat16)


def _unsupported(name: str, module: torch.nn.Module, what: str) -> Exception:
    return ops._error(ops.UnsupportedError, "UNSUPPORTED",
                      f"{name} ({type(module).__name__}): {what}")


def _gpt_oss_to_mxmoe(name: str, module: torch.nn.Module) -> MxmoeExperts:
    """GptOssExperts: out = (clamped SwiGLU(x @ gate_up_proj[e] + gate_up_proj_bias[e]))
    @ down_proj[e] + down_proj_bias[e], gate = columns 0::2, up = columns 1::2."""
    w13, w2 = module.gate_up_proj, module.down_proj
    b13, b2 = module.gate_up_proj_bias, module.down_proj_bias
    e, h, two_i = w13.shape
    if two_i % 2 or w2.shape != (e, two_i // 2, h) or b13 is None or b2 is None or \
            b13.shape != (e, two_i) or b2.shape != (e, h):
        raise _unsupported(name, module, f"gate_up_proj {list(w13.shape)}, down_proj "
                           f"{list(w2.shape)} and their biases are not GPT-OSS's [E, H, 2I], "
                           f"[E, I, H], [E, 2I], [E, H]")
    with torch.no_grad():
        w13_t = w13.detach().transpose(1, 2)  # [E, 2I, H], rows interleaved gate/up
        gate_up = torch.cat([w13_t[:, 0::2], w13_t[:, 1::2]], dim=1)
        bias13 = torch.cat([b13.detach()[:, 0::2], b13.detach()[:, 1::2]], dim=1)
        layer = MoELayer.from_float(
            _low(gate_up).contiguous(), _low(w2.transpose(1, 2)).contiguous(),
            activation="swiglu_oai", swiglu_alpha=float(module.alpha),
            swiglu_limit=float(module.limit), w13_bias=bias13.contiguous(),
            w2_bias=b2.detach().contiguous())
    return MxmoeExperts(layer, replaced=type(module).__name__)


def _to_mxmoe(name: str, module: torch.nn.Module) -> MxmoeExperts:
    if type(module).__name__ == "GptOssExperts":
        return _gpt_oss_to_mxmoe(name, module)
    w13, w2 = module.gate_up_proj, module.down_proj
    e, two_i, h = w13.shape
    if w2.shape != (e, h, two_i // 2) or two_i % 2:
        raise _unsupported(name, module, f"gate_up_proj {list(w13.shape)} and down_proj "
                           f"{list(w2.shape)} are not [E, 2I, H] and [E, H, I]")
    if not _is_silu(getattr(module, "act_fn", None)):
        raise _unsupported(name, module, f"activation "
                           f"{type(getattr(module, 'act_fn', None)).__name__} is not SiLU")
    if getattr(module, "gate_up_proj_bias", None) is not None or \
            getattr(module, "down_proj_bias", None) is not None:
        raise _unsupported(name, module, "expert biases outside GPT-OSS's layout are not served")
    with torch.no_grad():
        layer = MoELayer.from_float(_low(w13).contiguous(), _low(w2).contiguous())
    return MxmoeExperts(layer, replaced=type(module).__name__)


def replace_moe_experts(model: torch.nn.Module) -> dict[str, MxmoeExperts]:
    """Replaces every transformers experts module of ``model`` with an ``MxmoeExperts``.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (or any module tree) in the transformers >= 5 layout.

    Returns
    -------
    dict
        Dotted module name -> the new MxmoeExperts, in model order (empty if none matched).

    Raises
    ------
    UnsupportedError
        An experts module mxmoe cannot serve (a non-SiLU activation outside GPT-OSS, biases
        outside GPT-OSS, odd shapes); nothing is replaced then.
    """
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Experts") and _experts_like(module):
            found.append((name, module))
    replacements = {name: _to_mxmoe(name, module) for name, module in found}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return replacements
