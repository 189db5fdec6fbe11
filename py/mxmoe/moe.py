"""MoELayer: a torch.nn.Module holding MXFP4 expert weights and running the mxmoe MoE forward.

The weights are buffers (they move with ``.to()`` and are saved in ``state_dict``) in the public
LINEAR interchange format: w13 [E, 2I, H/2] + scales [E, 2I, H/32] (rows [0, I) gate, [I, 2I)
up) and w2 [E, H, I/2] + scales [E, H, I/32]. On every backend the layer converts them once into
the backend's prepared layout (on the CPU: decoded panels, ~1.9x the LINEAR bytes) and caches the
result per device (dropped when the module moves).

Three ways to build one:

    layer = MoELayer(w13_packed, w13_scales, w2_packed, w2_scales)   # interchange tensors
    layer = MoELayer.from_float(w13, w2)                             # bf16 [E, 2I, H], [E, H, I]
    layer = MoELayer.from_checkpoint("model.safetensors", "model.layers.0.mlp", device="cuda")

``from_checkpoint`` reads compressed-tensors / vLLM style MXFP4 W4A4 experts (per expert
``{prefix}.experts.{e}.{gate_proj|up_proj|down_proj}.{weight_packed|weight_scale}``, uint8
[N, K/2] codes and uint8 or float8_e8m0fnu [N, K/32] scales; ``mxmoe.checkpoint`` has the
details) and ``save_checkpoint`` writes that format, so bf16 weights can be quantized once:

    MoELayer.from_float(w13, w2).save_checkpoint("experts.safetensors", "model.layers.0.mlp")

Limits: inference only (no autograd through the quantized path).
"""

from __future__ import annotations

import torch

from mxmoe import checkpoint, ops

__all__ = ["MoELayer"]


class MoELayer(torch.nn.Module):
    """A Mixture-of-Experts layer with MXFP4 (W4A4) experts.

    Build it from interchange tensors (below), from bf16 weights (``from_float``) or from a
    compressed-tensors style safetensors checkpoint (``from_checkpoint``, the inverse of
    ``save_checkpoint``).

    Parameters
    ----------
    w13_packed : torch.Tensor
        [E, 2I, H/2] uint8 E2M1 codes of the gate|up projections.
    w13_scales : torch.Tensor
        [E, 2I, H/32] uint8 E8M0 scales.
    w2_packed : torch.Tensor
        [E, H, I/2] uint8 codes of the down projection.
    w2_scales : torch.Tensor
        [E, H, I/32] uint8 scales.
    expert_map : torch.Tensor, optional
        [E_global] int32, global -> local expert id (-1 = not on this device), for
        expert-parallel deployments; router logits and topk ids then use global ids.
    """

    def __init__(self, w13_packed: torch.Tensor, w13_scales: torch.Tensor,
                 w2_packed: torch.Tensor, w2_scales: torch.Tensor,
                 expert_map: torch.Tensor | None = None):
        super().__init__()
        w13_packed, w13_scales = ops._check_linear_weights(w13_packed, w13_scales, "w13_packed",
                                                           "w13_scales")
        w2_packed, w2_scales = ops._check_linear_weights(w2_packed, w2_scales, "w2_packed",
                                                         "w2_scales")
        e, two_i, half_h = w13_packed.shape
        e2, h, half_i = w2_packed.shape
        if e2 != e or h != half_h * 2 or two_i != half_i * 4:
            raise ops._invalid(
                f"w13_packed [E, 2I, H/2] and w2_packed [E, H, I/2] disagree: w13 "
                f"{list(w13_packed.shape)} gives E={e} H={half_h * 2} I={two_i // 2}, w2 "
                f"{list(w2_packed.shape)} gives E={e2} H={h} I={half_i * 2}")
        self.register_buffer("w13_packed", w13_packed)
        self.register_buffer("w13_scales", w13_scales)
        self.register_buffer("w2_packed", w2_packed)
        self.register_buffer("w2_scales", w2_scales)
        if expert_map is not None:
            expert_map = ops._tensor(expert_map, "expert_map")
            ops._check(expert_map, "expert_map", "[E_global]", (None,), (torch.int32,))
        self.register_buffer("expert_map", expert_map)
        self._prepared: dict[torch.device, tuple] = {}

    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor,
                   expert_map: torch.Tensor | None = None) -> MoELayer:
        """Quantizes bf16/fp16 expert weights: w13 [E, 2I, H], w2 [E, H, I]."""
        w13_packed, w13_scales = ops.quantize_weights(w13)
        w2_packed, w2_scales = ops.quantize_weights(w2)
        return cls(w13_packed, w13_scales, w2_packed, w2_scales, expert_map)

    @classmethod
    def from_checkpoint(cls, path_or_tensors, prefix: str, num_experts: int | None = None,
                        expert_map=None, device=None) -> MoELayer:
        """Loads MXFP4 experts from a compressed-tensors style safetensors checkpoint.

        Tensors ``{prefix}.experts.{e}.{proj}.weight_packed`` uint8 [N, K/2] (E2M1 codes,
        element 2i in the low nibble) and ``.weight_scale`` uint8 or float8_e8m0fnu [N, K/32]
        (E8M0), proj in gate_proj [I, H/2], up_proj [I, H/2], down_proj [H, I/2]; gate and up
        are stacked into w13 [E, 2I, H/2] (gate rows first), down into w2 [E, H, I/2]. Files are
        read lazily: all headers are checked before one tensor at a time is copied to ``device``.

        Parameters
        ----------
        path_or_tensors : str, os.PathLike, list of paths, or dict
            A ``.safetensors`` file, a list of files (sharded), a directory of them, a
            ``.safetensors.index.json``, or a dict name -> tensor.
        prefix : str
            The layer's name, e.g. ``"model.layers.0.mlp"``.
        num_experts : int, optional
            E_global; default: inferred from the names (experts 0..E-1 must all be present).
        expert_map : torch.Tensor or sequence of int, optional
            [E_global] global -> local expert id, -1 = not on this device: loads only the kept
            experts (local expert l from global g with expert_map[g] == l) and becomes the
            layer's ``expert_map`` (int32).
        device : torch.device or str, optional
            Where the weights live; default CPU.

        Returns
        -------
        MoELayer

        Raises
        ------
        InvalidArgumentError (a ValueError)
            A missing expert or projection, a wrong dtype or rank, H or I inconsistent across
            experts or projections, K/32 scales that do not match K/2 codes, H or I not a
            multiple of 32; the message names the tensor, its shape, dtype and what was expected.
        """
        weights = checkpoint.load_moe_weights(path_or_tensors, prefix, num_experts=num_experts,
                                              expert_map=expert_map, device=device)
        if expert_map is not None:
            expert_map = torch.as_tensor(
                expert_map.tolist() if hasattr(expert_map, "tolist") else list(expert_map),
                dtype=torch.int32, device=weights[0].device)
        return cls(*weights, expert_map=expert_map)

    def save_checkpoint(self, path, prefix: str, scale_dtype: torch.dtype = torch.uint8) -> None:
        """Writes the experts in the format ``from_checkpoint`` reads (one safetensors file).

        Parameters
        ----------
        path : str or os.PathLike
            The ``.safetensors`` file (replaced if it exists).
        prefix : str
            The layer's name; tensors are ``{prefix}.experts.{e}.{proj}.weight_packed`` [N, K/2]
            and ``.weight_scale`` [N, K/32], with global expert ids when the layer has an
            ``expert_map``.
        scale_dtype : torch.dtype
            uint8 (default) or float8_e8m0fnu for ``weight_scale``.
        """
        checkpoint.save_moe_weights(path, prefix, self.w13_packed, self.w13_scales,
                                    self.w2_packed, self.w2_scales, expert_map=self.expert_map,
                                    scale_dtype=scale_dtype)

    @property
    def num_experts(self) -> int:
        """Local experts held by this layer."""
        return self.w13_packed.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w2_packed.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w2_packed.shape[2] * 2

    @property
    def backend(self) -> str:
        """The backend serving this layer's device: "cpu", "sm90" or "sm100"."""
        return ops.backend_for(self.w13_packed)

    def extra_repr(self) -> str:
        mapped = "" if self.expert_map is None else f", expert_map={self.expert_map.shape[0]}"
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, device={self.w13_packed.device}"
                f"{mapped}")

    def _apply(self, fn, *args, **kwargs):
        self._prepared = {}
        return super()._apply(fn, *args, **kwargs)

    def _weights(self) -> tuple:
        """(w13, w13_scales, w2, w2_scales) in the fastest format the backend reads."""
        device = self.w13_packed.device
        linear = (self.w13_packed, self.w13_scales, self.w2_packed, self.w2_scales)
        if device not in self._prepared:
            try:
                w13 = ops.prepare_weights(self.w13_packed, self.w13_scales)
                w2 = ops.prepare_weights(self.w2_packed, self.w2_scales)
                self._prepared[device] = (w13, None, w2, None)
            except ops.UnsupportedError:
                # The backend reads the interchange format directly.
                self._prepared[device] = linear
        return self._prepared[device]

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, top_k: int,
                renormalize: bool = True) -> torch.Tensor:
        """Routes with softmax + top-k and runs the experts.

        Parameters
        ----------
        hidden_states : torch.Tensor
            [..., H] bfloat16/float16.
        router_logits : torch.Tensor
            [..., E_global] float32/bfloat16/float16, same leading dimensions.
        top_k : int
            Experts per token.
        renormalize : bool
            Renormalise the top-k weights to sum 1.

        Returns
        -------
        torch.Tensor
            [..., H] in hidden_states' dtype.
        """
        lead = hidden_states.shape[:-1]
        out = ops.moe_forward(hidden_states.reshape(-1, hidden_states.shape[-1]),
                              *self._weights(),
                              router_logits=router_logits.reshape(-1, router_logits.shape[-1]),
                              top_k=top_k, renormalize=renormalize, expert_map=self.expert_map)
        return out.reshape(*lead, out.shape[-1])

    def forward_topk(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """Runs the experts with precomputed routing.

        Parameters
        ----------
        hidden_states : torch.Tensor
            [..., H] bfloat16/float16.
        topk_ids : torch.Tensor
            [..., top_k] int32 global expert ids.
        topk_weights : torch.Tensor
            [..., top_k] float32.
        """
        lead = hidden_states.shape[:-1]
        out = ops.moe_forward(hidden_states.reshape(-1, hidden_states.shape[-1]),
                              *self._weights(),
                              topk_ids=topk_ids.reshape(-1, topk_ids.shape[-1]),
                              topk_weights=topk_weights.reshape(-1, topk_weights.shape[-1]),
                              expert_map=self.expert_map)
        return out.reshape(*lead, out.shape[-1])
