"""Swap the experts of Hugging Face transformers MoE models for mxmoe layers, in one call.

    from mxmoe.integrations.transformers import replace_moe_experts
    replaced = replace_moe_experts(model)          # {module name: MxmoeExperts}
    with torch.inference_mode():
        logits = model(input_ids).logits

Serves the transformers >= 5 layout, in which a model's experts are one module holding
``gate_up_proj`` [E, 2I, H] (rows [0, I) gate, [I, 2I) up), ``down_proj`` [E, H, I] and a SiLU
``act_fn``, called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``:
Qwen3-MoE (``Qwen3MoeExperts``), Mixtral (``MixtralExperts``) and DeepSeek-V3
(``DeepseekV3Experts``), and any other model whose experts module has that shape. Only the
experts are replaced: the model's own router (softmax top-k, DeepSeek's grouped sigmoid routing
with its bias and scaling) and its shared experts keep running as they are; the router's int64
ids and bf16/fp32 weights go straight into ``MoELayer.forward_topk``.

Weights are quantized to MXFP4 once (bf16 weights directly; fp32 weights rounded to bf16
first). The replaced module's bf16 weights are released with it.

Limits:
- GPT-OSS experts (``GptOssExperts``: transposed, interleaved, with biases and a clamped
  SwiGLU) are not served yet: ``replace_moe_experts`` raises UnsupportedError naming the module.
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

_UNSERVED = {"GptOssExperts": "GPT-OSS experts (transposed, interleaved gate/up, biases, "
                              "clamped SwiGLU) are not served yet"}


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


def _to_mxmoe(name: str, module: torch.nn.Module) -> MxmoeExperts:
    w13, w2 = module.gate_up_proj, module.down_proj
    e, two_i, h = w13.shape
    if w2.shape != (e, h, two_i // 2) or two_i % 2:
        raise ops._error(ops.UnsupportedError, "UNSUPPORTED",
                         f"{name} ({type(module).__name__}): gate_up_proj {list(w13.shape)} and "
                         f"down_proj {list(w2.shape)} are not [E, 2I, H] and [E, H, I]")
    if not _is_silu(getattr(module, "act_fn", None)):
        raise ops._error(ops.UnsupportedError, "UNSUPPORTED",
                         f"{name} ({type(module).__name__}): activation "
                         f"{type(getattr(module, 'act_fn', None)).__name__} is not SiLU")
    if getattr(module, "gate_up_proj_bias", None) is not None or \
            getattr(module, "down_proj_bias", None) is not None:
        raise ops._error(ops.UnsupportedError, "UNSUPPORTED",
                         f"{name} ({type(module).__name__}): expert biases are not served yet")
    with torch.no_grad():
        def low(w):
            return w.detach() if w.dtype in (torch.bfloat16, torch.float16) else \
                w.detach().to(torch.bfloat16)

        layer = MoELayer.from_float(low(w13).contiguous(), low(w2).contiguous())
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
        An experts module mxmoe cannot serve (GPT-OSS, a non-SiLU activation, biases, odd
        shapes); nothing is replaced then.
    """
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in _UNSERVED:
            raise ops._error(ops.UnsupportedError, "UNSUPPORTED",
                             f"{name} ({kind}): {_UNSERVED[kind]}")
        if kind.endswith("Experts") and _experts_like(module):
            found.append((name, module))
    replacements = {name: _to_mxmoe(name, module) for name, module in found}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return replacements
