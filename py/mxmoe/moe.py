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


_OPTIONAL_BUFFERS = ("w13_bias", "w2_bias", "e_score_correction_bias", "router_weight",
                     "router_bias")


class MoELayer(torch.nn.Module):
    """A Mixture-of-Experts layer with MXFP4 (W4A4) experts.

    Build it from interchange tensors (below), from bf16 weights (``from_float``) or from a
    checkpoint (``from_checkpoint``: compressed-tensors or GPT-OSS MXFP4). The layer remembers
    its model's block (activation, biases, routing, shared experts, optional router), so
    ``layer(hidden_states, router_logits)`` and ``layer.forward_hidden(hidden_states)`` run that
    model's MoE block; docs/format.md ("MoE forward") states the arithmetic.

    Parameters
    ----------
    w13_packed : torch.Tensor
        [E, 2I, H/2] uint8 E2M1 codes of the gate|up projections (E includes shared experts).
    w13_scales : torch.Tensor
        [E, 2I, H/32] uint8 E8M0 scales.
    w2_packed : torch.Tensor
        [E, H, I/2] uint8 codes of the down projection.
    w2_scales : torch.Tensor
        [E, H, I/32] uint8 scales.
    expert_map : torch.Tensor, optional
        [E_global] int32, global -> local routed expert id (-1 = not on this device), for
        expert-parallel deployments; router logits and topk ids then use global ids.
    activation : str
        "silu" (Qwen3, DeepSeek) or "swiglu_oai" (GPT-OSS, with ``swiglu_alpha`` and
        ``swiglu_limit``).
    w13_bias, w2_bias : torch.Tensor, optional
        [E, 2I] and [E, H] expert biases (bfloat16/float16/float32).
    routing : str
        "softmax_topk" (Qwen3), "topk_softmax" (GPT-OSS) or "sigmoid_grouped_topk" (DeepSeek-V3,
        with ``num_expert_groups``, ``topk_groups``, ``e_score_correction_bias`` [E_global]).
    top_k : int, optional
        Routed experts per token (``forward`` may override it).
    renormalize : bool
        Renormalise the chosen weights to sum 1 (softmax_topk, sigmoid_grouped_topk).
    routed_scaling_factor : float
        Multiplies the routed weights (DeepSeek-V3: 2.5).
    num_shared_experts : int
        The last ``num_shared_experts`` experts of the weights are used by every token with
        weight 1.
    router_weight, router_bias : torch.Tensor, optional
        [E_global, H] and [E_global]: the router for ``forward_hidden``; logits are
        ``F.linear(hidden.to(router_weight.dtype), router_weight, router_bias)`` (torch's
        matmul: a float32 router weight gives float32 logits, as DeepSeek-V3 computes them).
    """

    def __init__(self, w13_packed: torch.Tensor, w13_scales: torch.Tensor,
                 w2_packed: torch.Tensor, w2_scales: torch.Tensor,
                 expert_map: torch.Tensor | None = None, *, activation: str = "silu",
                 swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                 w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
                 routing: str = "softmax_topk", top_k: int | None = None,
                 renormalize: bool = True, num_expert_groups: int = 0, topk_groups: int = 0,
                 routed_scaling_factor: float = 1.0,
                 e_score_correction_bias: torch.Tensor | None = None,
                 num_shared_experts: int = 0, router_weight: torch.Tensor | None = None,
                 router_bias: torch.Tensor | None = None):
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
        ops._choice(activation, "activation", ops.ACTIVATIONS)
        ops._choice(routing, "routing", ops.ROUTINGS)
        num_shared_experts = int(num_shared_experts)
        if not 0 <= num_shared_experts < e:
            raise ops._invalid(f"num_shared_experts must be in [0, {e - 1}] (E = {e} weight "
                               f"experts), got {num_shared_experts}")
        self.activation = activation
        self.swiglu_alpha = float(swiglu_alpha)
        self.swiglu_limit = float(swiglu_limit)
        self.routing = routing
        self.top_k = None if top_k is None else int(top_k)
        self.renormalize = bool(renormalize)
        self.num_expert_groups = int(num_expert_groups)
        self.topk_groups = int(topk_groups)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.num_shared_experts = num_shared_experts
        global_experts = (expert_map.shape[0] if expert_map is not None
                          else e - num_shared_experts)
        shapes = {"w13_bias": ([e, two_i], "[E, 2I]"), "w2_bias": ([e, h], "[E, H]"),
                  "e_score_correction_bias": ([global_experts], "[E_global]"),
                  "router_weight": ([global_experts, h], "[E_global, H]"),
                  "router_bias": ([global_experts], "[E_global]")}
        values = {"w13_bias": w13_bias, "w2_bias": w2_bias,
                  "e_score_correction_bias": e_score_correction_bias,
                  "router_weight": router_weight, "router_bias": router_bias}
        for name in _OPTIONAL_BUFFERS:
            value = values[name]
            if value is not None:
                value = ops._tensor(value, name)
                shape, desc = shapes[name]
                ops._check(value, name, desc, shape, ops._BIAS_DTYPES)
            self.register_buffer(name, value)
        if router_bias is not None and router_weight is None:
            raise ops._invalid("router_bias needs router_weight")
        self._prepared: dict[torch.device, tuple] = {}

    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor,
                   expert_map: torch.Tensor | None = None, **options) -> MoELayer:
        """Quantizes bf16/fp16 expert weights: w13 [E, 2I, H], w2 [E, H, I]. ``options`` are
        the constructor's keyword arguments (activation, biases, routing, ...)."""
        w13_packed, w13_scales = ops.quantize_weights(w13)
        w2_packed, w2_scales = ops.quantize_weights(w2)
        return cls(w13_packed, w13_scales, w2_packed, w2_scales, expert_map, **options)

    def model_options(self) -> dict:
        """The keyword arguments that make another layer compute the same block."""
        options = {name: getattr(self, name) for name in (
            "activation", "swiglu_alpha", "swiglu_limit", "routing", "top_k", "renormalize",
            "num_expert_groups", "topk_groups", "routed_scaling_factor", "num_shared_experts")}
        options.update({name: getattr(self, name) for name in _OPTIONAL_BUFFERS})
        return options

    @classmethod
    def from_checkpoint(cls, path_or_tensors, prefix: str, num_experts: int | None = None,
                        expert_map=None, device=None, format: str = "auto",
                        **options) -> MoELayer:
        """Loads one MoE block from its model's checkpoint, without requantizing.

        ``format`` (``mxmoe.checkpoint`` has the tensor names and shapes of each):

        - ``"compressed-tensors"``: per-expert ``{prefix}.experts.{e}.{proj}.weight_packed``
          uint8 [N, K/2] and ``.weight_scale`` uint8 or float8_e8m0fnu [N, K/32], proj in
          gate_proj, up_proj, down_proj (Qwen3-MoE, DeepSeek-V3 MXFP4 exports); DeepSeek-V3's
          ``{prefix}.gate.e_score_correction_bias`` (sigmoid grouped routing, options from
          ``config.json``), ``{prefix}.gate.weight`` (router) and ``{prefix}.shared_experts.*``
          (shared experts) when present;
        - ``"gpt-oss"``: ``{prefix}.experts.gate_up_proj_blocks`` [E, 2I, H/32, 16],
          ``_scales``, ``_bias``, ``down_proj_*`` and ``{prefix}.router.weight/bias``; the
          interleaved gate/up rows are de-interleaved once (an exact permutation);
        - ``"auto"``: gpt-oss when ``gate_up_proj_blocks`` exists, else compressed-tensors.

        Files are read lazily: headers are checked before data is copied to ``device``. A
        ``config.json`` next to the files supplies top_k and the routing options; keyword
        ``options`` (the constructor's: top_k, routing, num_expert_groups, ...) override it.

        Parameters
        ----------
        path_or_tensors : str, os.PathLike, list of paths, or dict
            A ``.safetensors`` file, a list of files (sharded), a directory of them, a
            ``.safetensors.index.json``, or a dict name -> tensor.
        prefix : str
            The layer's name, e.g. ``"model.layers.0.mlp"``.
        num_experts : int, optional
            E_global; default: inferred from the names or shapes.
        expert_map : torch.Tensor or sequence of int, optional
            [E_global] global -> local expert id, -1 = not on this device: loads only the kept
            experts and becomes the layer's ``expert_map`` (int32).
        device : torch.device or str, optional
            Where the weights live; default CPU.

        Raises
        ------
        InvalidArgumentError (a ValueError)
            A missing tensor, a wrong dtype or shape, inconsistent H or I, a DeepSeek-V3 router
            without its group options; the message names the file, the tensor, its shape and
            dtype, and what was expected.
        """
        loaded = checkpoint.load_moe_layer(path_or_tensors, prefix, format=format,
                                           num_experts=num_experts, expert_map=expert_map,
                                           device=device, explicit_options=options.keys())
        loaded.update(options)
        weights = [loaded.pop(n) for n in ("w13_packed", "w13_scales", "w2_packed",
                                           "w2_scales")]
        if expert_map is not None:
            expert_map = torch.as_tensor(
                expert_map.tolist() if hasattr(expert_map, "tolist") else list(expert_map),
                dtype=torch.int32, device=weights[0].device)
        return cls(*weights, expert_map=expert_map, **loaded)

    def save_checkpoint(self, path, prefix: str, scale_dtype: torch.dtype = torch.uint8,
                        format: str = "compressed-tensors") -> None:
        """Writes the block in a format ``from_checkpoint`` reads (one safetensors file).

        Parameters
        ----------
        path : str or os.PathLike
            The ``.safetensors`` file (replaced if it exists).
        prefix : str
            The layer's name.
        scale_dtype : torch.dtype
            uint8 (default) or float8_e8m0fnu for the compressed-tensors ``weight_scale``.
        format : str
            "compressed-tensors": ``{prefix}.experts.{e}.{proj}.weight_packed`` [N, K/2] and
            ``.weight_scale`` [N, K/32] (global expert ids with an ``expert_map``), plus
            ``{prefix}.gate.weight`` (router), ``{prefix}.gate.e_score_correction_bias`` and
            ``{prefix}.shared_experts.*`` (the shared experts as one MLP) when the layer has
            them. Biases cannot be stored in this format. "gpt-oss": the GPT-OSS MXFP4 names
            (biases are written as zeros when the layer has none). Routing options and top_k
            are not tensors: keep them in a config.json.
        """
        e = self.num_experts
        s = self.num_shared_experts
        i = self.intermediate_size
        if format == "gpt-oss":
            if s or self.expert_map is not None:
                raise ops._invalid("format='gpt-oss' has no shared experts or expert_map")
            zeros13 = torch.zeros(e, 2 * i, dtype=torch.bfloat16)
            zeros2 = torch.zeros(e, self.hidden_size, dtype=torch.bfloat16)
            checkpoint.save_gpt_oss(
                path, prefix, self.w13_packed, self.w13_scales, self.w2_packed, self.w2_scales,
                zeros13 if self.w13_bias is None else self.w13_bias,
                zeros2 if self.w2_bias is None else self.w2_bias, self.router_weight,
                self.router_bias if self.router_bias is not None or self.router_weight is None
                else torch.zeros(self.router_weight.shape[0], dtype=self.router_weight.dtype))
            return
        if format != "compressed-tensors":
            raise ops._invalid(f"format must be 'compressed-tensors' or 'gpt-oss', got "
                               f"{format!r}")
        if self.w13_bias is not None or self.w2_bias is not None:
            raise ops._invalid("the compressed-tensors format has no expert biases; use "
                               "format='gpt-oss'")
        routed = e - s
        prefix = prefix.rstrip(".")
        extra = {}
        dot = f"{prefix}." if prefix else ""
        if self.router_weight is not None:
            extra[f"{dot}gate.weight"] = self.router_weight
        if self.e_score_correction_bias is not None:
            extra[f"{dot}gate.e_score_correction_bias"] = self.e_score_correction_bias
        if s:
            w13p, w13s = self.w13_packed[routed:], self.w13_scales[routed:]
            w2p, w2s = self.w2_packed[routed:], self.w2_scales[routed:]
            shared = {
                "gate_proj": (w13p[:, :i].reshape(s * i, -1), w13s[:, :i].reshape(s * i, -1)),
                "up_proj": (w13p[:, i:].reshape(s * i, -1), w13s[:, i:].reshape(s * i, -1)),
                "down_proj": (torch.cat(list(w2p), dim=1), torch.cat(list(w2s), dim=1)),
            }
            for proj, (packed, scales) in shared.items():
                extra[f"{dot}shared_experts.{proj}.weight_packed"] = packed
                extra[f"{dot}shared_experts.{proj}.weight_scale"] = scales.view(scale_dtype)
        checkpoint.save_moe_weights(path, prefix, self.w13_packed[:routed],
                                    self.w13_scales[:routed], self.w2_packed[:routed],
                                    self.w2_scales[:routed], expert_map=self.expert_map,
                                    scale_dtype=scale_dtype, extra=extra)

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
        shared = f", shared={self.num_shared_experts}" if self.num_shared_experts else ""
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, activation={self.activation}, "
                f"routing={self.routing}{shared}, device={self.w13_packed.device}{mapped}")

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

    def _expert_options(self) -> dict:
        return {"activation": self.activation, "swiglu_alpha": self.swiglu_alpha,
                "swiglu_limit": self.swiglu_limit, "w13_bias": self.w13_bias,
                "w2_bias": self.w2_bias, "num_shared_experts": self.num_shared_experts}

    def _routing_options(self) -> dict:
        return {"routing": self.routing, "num_expert_groups": self.num_expert_groups,
                "topk_groups": self.topk_groups,
                "routed_scaling_factor": self.routed_scaling_factor,
                "e_score_correction_bias": self.e_score_correction_bias}

    def _top_k(self, top_k: int | None) -> int:
        top_k = self.top_k if top_k is None else top_k
        if top_k is None:
            raise ops._invalid("top_k must be given (the layer was built without top_k)")
        return int(top_k)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                top_k: int | None = None, renormalize: bool | None = None) -> torch.Tensor:
        """Routes with the layer's routing mode and runs the experts (+ shared experts).

        Parameters
        ----------
        hidden_states : torch.Tensor
            [..., H] bfloat16/float16.
        router_logits : torch.Tensor
            [..., E_global] float32/bfloat16/float16, same leading dimensions.
        top_k : int, optional
            Routed experts per token; default the layer's ``top_k``.
        renormalize : bool, optional
            Default the layer's ``renormalize``.

        Returns
        -------
        torch.Tensor
            [..., H] in hidden_states' dtype.
        """
        lead = hidden_states.shape[:-1]
        out = ops.moe_forward(hidden_states.reshape(-1, hidden_states.shape[-1]),
                              *self._weights(),
                              router_logits=router_logits.reshape(-1, router_logits.shape[-1]),
                              top_k=self._top_k(top_k),
                              renormalize=self.renormalize if renormalize is None
                              else renormalize,
                              expert_map=self.expert_map, **self._expert_options(),
                              **self._routing_options())
        return out.reshape(*lead, out.shape[-1])

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., E_global] with the layer's router (torch's linear)."""
        if self.router_weight is None:
            raise ops._invalid("this layer has no router (router_weight); pass router_logits "
                               "to forward() instead")
        x = hidden_states.to(self.router_weight.dtype)
        bias = None if self.router_bias is None else self.router_bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.router_weight, bias)

    def route(self, router_logits: torch.Tensor,
              top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E_global] logits -> (topk_ids int32, topk_weights float32) [T, top_k]: the
        routing ``forward`` does, bit for bit (``ops.route``)."""
        return ops.route(router_logits, self._top_k(top_k), self.renormalize,
                         **self._routing_options())

    def forward_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole MoE block from hidden states: router, routing, experts, shared experts."""
        return self.forward(hidden_states, self.router_logits(hidden_states))

    def forward_topk(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """Runs the experts (+ shared experts) with precomputed routing.

        Parameters
        ----------
        hidden_states : torch.Tensor
            [..., H] bfloat16/float16.
        topk_ids : torch.Tensor
            [..., top_k] int32 global expert ids.
        topk_weights : torch.Tensor
            [..., top_k] float32 (used as given: no scaling factor).
        """
        lead = hidden_states.shape[:-1]
        out = ops.moe_forward(hidden_states.reshape(-1, hidden_states.shape[-1]),
                              *self._weights(),
                              topk_ids=topk_ids.reshape(-1, topk_ids.shape[-1]),
                              topk_weights=topk_weights.reshape(-1, topk_weights.shape[-1]),
                              expert_map=self.expert_map, **self._expert_options())
        return out.reshape(*lead, out.shape[-1])
