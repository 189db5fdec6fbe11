"""Expert and tensor parallelism for the MoE layer over ``torch.distributed``.

Each process of a group builds its part of one MoE layer from the same checkpoint and calls
forward on its own tokens:

    ep = ExpertParallelMoE.from_checkpoint("model.safetensors", "model.layers.0.mlp",
                                           num_experts=128, dispatch="mxfp4")
    out = ep(hidden_states, router_logits)       # [T_rank, H]; or ep.forward_hidden(hidden)

``ExpertParallelMoE`` (expert parallelism): rank r holds a contiguous block of the routed experts
(uneven splits allowed) and only reads those from the checkpoint; shared experts, the router and
the routing options are on every rank. A forward routes the rank's tokens with the layer's
routing (``ops.route``: every mode of ``MoELayer``), sorts the (token, slot) pairs by owning
rank and local expert, exchanges the counts (the one host synchronisation per call:
``all_to_all_single`` needs its split sizes on the host), sends the rows with
``all_to_all_single``, runs the experts on the received rows (and the shared experts on its own
tokens) with the library's stage ops (experts_quantize, grouped_gemm, moe_activation_quantize
with the layer's activation and biases, moe_add_expert_bias), sends the expert outputs back with
the reverse ``all_to_all_single`` and sums them on the token's rank in the single-process layer's
slot order and precision (fp32 products and sums, one rounding at the end). Each expert output
row depends only on its token row and its expert, so the result is bit-identical to
``MoELayer`` run on all the tokens in one process (tested on the CPU backend with gloo).

Dispatch formats: ``"bf16"`` sends activation rows as they are (2 H bytes; bf16 or fp16);
``"mxfp4"`` quantizes each token row once on the sender (``ops.quantize``, the contract's rule, the
same bits ``experts_quantize`` produces) and sends E2M1 codes + E8M0 scales (H/2 + H/32 bytes,
3.76x fewer); the receiver swizzles the scales into the per-expert layout GEMM1 reads, so GEMM1
sees exactly the bits it would have computed. Expert outputs always return in the activation
dtype (2 H bytes per (token, slot)): the bits the single-process reduce reads.

``TensorParallelMoE`` (tensor parallelism): every rank of the group holds every expert (shared
ones included) with a slice of the intermediate dimension I (gate and up rows of w13 and their
bias, columns of w2), runs the same tokens and router logits, and the fp32 weighted partial sums
are all-reduced, then rounded once. Shards are whole MXFP4 blocks of 32, so the intermediate
activations are quantized exactly as in one process; only GEMM2's sum over I is split, each part
rounded to the activation dtype (rank 0 adds the w2 bias, rounding once more). Bound (tested):
elementwise |out_tp - out_1| <= 2^-6 * A + 2^-7 * |out_1|, A = sum over slots s and ranks r of
w_s * |p_rs| (p_rs: rank r's expert output for slot s): about two bf16 roundings per partial.

Limits:
- One group: either expert or tensor parallelism; EP with TP inside each EP group is not built.
- Placement is a contiguous block of experts per rank (``experts_per_rank``).
- gloo serves CPU tensors, NCCL CUDA tensors (call torch.cuda.set_device(local_rank) first: the
  constructor's exchange is an all_gather_object). Over NCCL the code is the same; bit-identity
  there also needs the GPU backend's GEMM rows to be independent of the other rows of the group
  (tests/gpu/test_parallel_gpu.py checks it on 2 GPUs; not yet run).
- A rank that fails on its own mid-forward (bad input is checked before the first exchange)
  leaves its peers waiting until the process group's timeout.
- Every rank must call forward (with zero tokens if it has none): the exchanges are collective.
- Outputs of the library ops (GEMM results, quantized rows) are allocated per call through torch;
  the dispatch and combine buffers are kept and reused across calls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mxmoe import ops
from mxmoe.moe import MoELayer

__all__ = ["DISPATCH_FORMATS", "ExpertParallelMoE", "TensorParallelMoE", "shard_intermediate",
           "split_experts"]

DISPATCH_FORMATS = ("bf16", "mxfp4")
_BLOCK = ops.BLOCK_SIZE


# ---- Shared pieces ---------------------------------------------------------------------------


def _group_rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ops._invalid("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _exchange_descriptions(description: dict, group) -> list[dict]:
    """Every rank's description of its part of the layer, gathered on every rank.

    A problem found on one rank travels in its description, so every rank raises the same error
    instead of the others waiting for a collective that never comes.
    """
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, description, group=group)
    errors = [f"rank {r}: {d['error']}" for r, d in enumerate(gathered) if d.get("error")]
    if errors:
        raise ops._invalid("; ".join(errors))
    for key, what in (("hidden", "the hidden size H"), ("global_experts", "E_global"),
                      ("dispatch", "the dispatch format"), ("device_type", "the device type"),
                      ("intermediate", "the intermediate size I")):
        values = [d.get(key) for d in gathered]
        if any(v != values[0] for v in values):
            listed = ", ".join(f"rank {r} has {v}" for r, v in enumerate(values))
            raise ops._invalid(f"the ranks disagree on {what}: {listed}")
    for option in gathered[0]["config"]:
        values = [d["config"].get(option) for d in gathered]
        if any(v != values[0] for v in values):
            listed = ", ".join(f"rank {r} has {v}" for r, v in enumerate(values))
            raise ops._invalid(f"the ranks' layers disagree on {option}: {listed}")
    return gathered


class _Buffers:
    """Byte buffers kept across calls and grown on demand (dispatch/combine traffic)."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = rows * cols * itemsize
        key = (name, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._buffers[key] = buffer
        return buffer[:nbytes].view(dtype).view(rows, cols)

    def clear(self) -> None:
        self._buffers.clear()


def _check_tokens(hidden, topk_ids, topk_weights, hidden_size: int, global_experts: int):
    """-> hidden [T, H], topk_ids [T, k], topk_weights [T, k] (2-D views) and the lead shape."""
    hidden = ops._tensor(hidden, "hidden_states")
    topk_ids = ops._tensor(topk_ids, "topk_ids")
    topk_weights = ops._tensor(topk_weights, "topk_weights")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ops._invalid(f"hidden_states must be [..., H] with H = {hidden_size}, got shape "
                           f"{ops._shape_str(hidden.shape)}")
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden_size)
    ops._check(x, "hidden_states", "[T, H]", (None, hidden_size), ops._ACTIVATION_DTYPES)
    if topk_ids.dim() < 1 or tuple(topk_ids.shape[:-1]) != tuple(lead):
        raise ops._invalid(f"topk_ids must be [..., top_k] with the leading shape "
                           f"{ops._shape_str(lead)} of hidden_states, got "
                           f"{ops._shape_str(topk_ids.shape)}")
    top_k = topk_ids.shape[-1]
    ids = topk_ids.reshape(x.shape[0], top_k)
    ops._check(ids, "topk_ids", "[T, top_k]", (x.shape[0], None), (torch.int32,))
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ops._invalid(f"topk_weights must have the shape of topk_ids "
                           f"{ops._shape_str(topk_ids.shape)}, got "
                           f"{ops._shape_str(topk_weights.shape)}")
    weights = topk_weights.reshape(x.shape[0], top_k)
    ops._check(weights, "topk_weights", "[T, top_k]", (x.shape[0], top_k), (torch.float32,))
    ops._check_same_device(ids, "topk_ids", x, "hidden_states")
    ops._check_same_device(weights, "topk_weights", x, "hidden_states")
    if ids.device.type == "cpu" and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= global_experts:
            bad = low if low < 0 else high
            raise ops._invalid(f"topk_ids must be global expert ids in [0, {global_experts}), "
                               f"got {bad}")
    return x, ids, weights, lead


def _count(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of 0..n-1 in keys, int64 [n] (bincount would synchronise on a GPU)."""
    counts = torch.zeros(n, dtype=torch.int64, device=keys.device)
    return counts.scatter_add_(0, keys, torch.ones_like(keys))


def _run_experts(layer: MoELayer, a_packed, a_scales, expert_offsets, blockscale_offsets,
                 dtype: torch.dtype, w2_bias=None) -> torch.Tensor:
    """Rows grouped by local expert, MXFP4 [R, H/2] + swizzled scales -> expert outputs [R, H].

    The stage ops of ``ops.moe_forward`` in its order and rounding points: GEMM1, (+ w13 bias)
    activation and quantization, GEMM2, (+ w2 bias).
    """
    w13, w13_scales, w2, w2_scales = layer._weights()
    gemm1 = ops.grouped_gemm(a_packed, a_scales, w13, w13_scales, expert_offsets,
                             blockscale_offsets, out_dtype=dtype)
    inter_packed, inter_scales = ops.moe_activation_quantize(
        gemm1, expert_offsets, blockscale_offsets, activation=layer.activation,
        swiglu_alpha=layer.swiglu_alpha, swiglu_limit=layer.swiglu_limit,
        w13_bias=layer.w13_bias)
    y = ops.grouped_gemm(inter_packed, inter_scales, w2, w2_scales, expert_offsets,
                         blockscale_offsets, out_dtype=dtype)
    if w2_bias is not None:
        y = ops.moe_add_expert_bias(y, expert_offsets, w2_bias)
    return y


def _with_shared_weights(weights: torch.Tensor, num_shared: int) -> torch.Tensor:
    """[T, k] routed weights -> [T, k + S]: the shared experts' slots (weight 1) last, the
    single-process slot order."""
    if num_shared == 0:
        return weights
    ones = torch.ones(weights.shape[0], num_shared, dtype=torch.float32, device=weights.device)
    return torch.cat([weights, ones], dim=1)


def _weighted_sum(contributions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, P, H] expert outputs, [T, P] fp32 weights -> [T, H] fp32, unrounded.

    The single-process reduce (``ops.moe_weighted_sum`` before its final rounding): from +0,
    acc = acc + w_s * y_s in slot order, each product and sum rounded to fp32 separately (two
    torch ops, never a fused multiply-add).
    """
    t, slots, h = contributions.shape
    acc = torch.zeros(t, h, dtype=torch.float32, device=contributions.device)
    for s in range(slots):
        acc = acc + weights[:, s:s + 1] * contributions[:, s].to(torch.float32)
    return acc


def _route(layer: MoELayer, router_logits, top_k, renormalize, tokens: int):
    """The layer's routing (``ops.route``: the bits ``MoELayer.forward`` routes with)."""
    logits = ops._tensor(router_logits, "router_logits")
    if logits.dim() < 1:
        raise ops._invalid("router_logits must be [..., E_global], got a scalar")
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != tokens:
        raise ops._invalid(f"router_logits must have one row per token ({tokens}), got shape "
                           f"{ops._shape_str(logits.shape)}")
    top_k = layer._top_k(top_k)
    if tokens == 0:  # a rank without tokens this step (ops.route needs at least one row)
        return (torch.empty(0, top_k, dtype=torch.int32, device=logits.device),
                torch.empty(0, top_k, dtype=torch.float32, device=logits.device))
    return ops.route(logits, top_k,
                     layer.renormalize if renormalize is None else bool(renormalize),
                     **layer._routing_options())


def split_experts(num_experts: int, world_size: int,
                  experts_per_rank=None) -> list[tuple[int, int]]:
    """The contiguous block [begin, end) of global experts each rank holds.

    Default: as even as possible, the first E % world ranks holding one more.
    """
    num_experts, world_size = int(num_experts), int(world_size)
    if experts_per_rank is None:
        base, extra = divmod(num_experts, world_size)
        counts = [base + (r < extra) for r in range(world_size)]
    else:
        counts = [int(c) for c in experts_per_rank]
        if len(counts) != world_size or any(c < 0 for c in counts) or \
                sum(counts) != num_experts:
            raise ops._invalid(f"experts_per_rank must be {world_size} non-negative counts "
                               f"summing to E = {num_experts}, got {list(experts_per_rank)}")
    blocks, begin = [], 0
    for c in counts:
        blocks.append((begin, begin + c))
        begin += c
    return blocks


def _block_map(num_experts: int, begin: int, end: int) -> torch.Tensor:
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[begin:end] = torch.arange(end - begin, dtype=torch.int32)
    return expert_map


# ---- Expert parallelism --------------------------------------------------------------------------


class ExpertParallelMoE(torch.nn.Module):
    """One MoE layer spread over a process group by experts; bit-identical to ``MoELayer``.

    Parameters
    ----------
    local_layer : MoELayer
        This rank's experts, with an ``expert_map`` [E_global] (global -> local id, -1 = held by
        another rank). Every global expert must be held by exactly one rank.
    group : torch.distributed.ProcessGroup, optional
        Default: the world group.
    dispatch : str
        "mxfp4" (codes + scales, H/2 + H/32 bytes per (token, slot)) or "bf16" (the activation
        rows as they are, 2 H bytes; bf16 or fp16).

    The constructor is collective: every rank of the group calls it, and a rank whose layer
    disagrees with the others (H, I, E_global, dispatch, device type, overlapping or missing
    experts) makes every rank raise the same InvalidArgumentError.
    """

    def __init__(self, local_layer: MoELayer, group=None, dispatch: str = "mxfp4"):
        super().__init__()
        rank, world = _group_rank_world(group)
        error = None
        if dispatch not in DISPATCH_FORMATS:
            error = f"dispatch must be 'bf16' or 'mxfp4', got {dispatch!r}"
        if not isinstance(local_layer, MoELayer):
            raise ops._invalid(f"local_layer must be an MoELayer, got "
                               f"{type(local_layer).__name__}")
        routed = local_layer.num_experts - local_layer.num_shared_experts
        expert_map = local_layer.expert_map
        if expert_map is None:
            expert_map = torch.arange(routed, dtype=torch.int32)
        ids = expert_map.tolist()
        kept = sorted(v for v in ids if v >= 0)
        if error is None and routed == 0:
            error = "holds no routed experts; every rank needs at least one"
        if error is None and kept != list(range(routed)):
            error = (f"expert_map must map the {routed} local routed experts onto ids "
                     f"0..{routed - 1} once each, got local ids {kept}")
        description = {
            "error": error,
            "hidden": local_layer.hidden_size,
            "intermediate": local_layer.intermediate_size,
            "global_experts": len(ids),
            "dispatch": dispatch,
            "device_type": local_layer.w13_packed.device.type,
            "config": _layer_config(local_layer),
            "expert_map": ids,
        }
        gathered = _exchange_descriptions(description, group)
        global_experts = len(ids)
        owner = [-1] * global_experts
        local_id = [-1] * global_experts
        for r, d in enumerate(gathered):
            for g, local in enumerate(d["expert_map"]):
                if local < 0:
                    continue
                if owner[g] >= 0:
                    raise ops._invalid(f"expert {g} is held by ranks {owner[g]} and {r}; each "
                                       f"expert must be held by exactly one rank")
                owner[g], local_id[g] = r, local
        missing = [g for g in range(global_experts) if owner[g] < 0]
        if missing:
            raise ops._invalid(f"experts {missing[:8]} are held by no rank "
                               f"({len(missing)} of {global_experts})")
        self.local = local_layer
        self.group = group
        self.rank = rank
        self.world_size = world
        self.dispatch = dispatch
        self.experts_per_rank = [sum(v >= 0 for v in d["expert_map"]) for d in gathered]
        # Send key of a global expert: owner * max_local + local id, so that one stable sort
        # orders a rank's slots by (destination rank, local expert, token, slot).
        self._max_local = max(self.experts_per_rank)
        device = local_layer.w13_packed.device
        self.register_buffer("_send_key", torch.tensor(
            [o * self._max_local + lo for o, lo in zip(owner, local_id, strict=True)],
            dtype=torch.int64, device=device), persistent=False)
        self._traffic = _Buffers()

    @classmethod
    def from_checkpoint(cls, path_or_tensors, prefix: str, num_experts: int, group=None,
                        dispatch: str = "mxfp4", experts_per_rank=None, device=None,
                        **options) -> ExpertParallelMoE:
        """Reads this rank's block of experts from a checkpoint (``MoELayer.from_checkpoint``:
        any format it reads; shared experts, router and routing options on every rank).

        Parameters
        ----------
        path_or_tensors, prefix, options
            As for ``MoELayer.from_checkpoint`` (options: format, top_k, routing, ...).
        num_experts : int
            E_global, the routed experts.
        group, dispatch
            As for the constructor.
        experts_per_rank : sequence of int, optional
            Experts of each rank (contiguous blocks in rank order); default ``split_experts``.
        device : torch.device or str, optional
            Where this rank's weights live (its GPU under NCCL); default CPU.
        """
        rank, world = _group_rank_world(group)
        begin, end = split_experts(num_experts, world, experts_per_rank)[rank]
        if end == begin:
            raise ops._invalid(f"rank {rank} would hold no experts (experts_per_rank "
                               f"{experts_per_rank}); every rank needs at least one")
        layer = MoELayer.from_checkpoint(path_or_tensors, prefix, num_experts=num_experts,
                                         expert_map=_block_map(num_experts, begin, end),
                                         device=device, **options)
        return cls(layer, group=group, dispatch=dispatch)

    @classmethod
    def from_layer(cls, layer: MoELayer, group=None, dispatch: str = "mxfp4",
                   experts_per_rank=None) -> ExpertParallelMoE:
        """Keeps this rank's block of the routed experts of a whole (single-process) layer, and
        its shared experts, router and options."""
        if layer.expert_map is not None:
            raise ops._invalid("layer must hold all experts (no expert_map)")
        rank, world = _group_rank_world(group)
        routed = layer.num_experts - layer.num_shared_experts
        begin, end = split_experts(routed, world, experts_per_rank)[rank]
        if end == begin:
            raise ops._invalid(f"rank {rank} would hold no experts (E = {routed}, "
                               f"experts_per_rank {experts_per_rank}); every rank needs at "
                               f"least one")
        keep = [*range(begin, end), *range(routed, layer.num_experts)]  # shared experts last
        index = torch.tensor(keep, device=layer.w13_packed.device)
        options = layer.model_options()
        for name in ("w13_bias", "w2_bias"):
            if options[name] is not None:
                options[name] = options[name][index]
        local = MoELayer(layer.w13_packed[index], layer.w13_scales[index],
                         layer.w2_packed[index], layer.w2_scales[index],
                         expert_map=_block_map(routed, begin, end).to(layer.w13_packed.device),
                         **options)
        return cls(local, group=group, dispatch=dispatch)

    @property
    def num_global_experts(self) -> int:
        return self._send_key.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.local.hidden_size

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, experts={self.experts_per_rank}, "
                f"dispatch={self.dispatch}")

    def _apply(self, fn, *args, **kwargs):
        self._traffic.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                top_k: int | None = None, renormalize: bool | None = None) -> torch.Tensor:
        """Routes this rank's tokens with the layer's routing mode and runs them through the
        experts of all ranks (+ shared experts); arguments and result as ``MoELayer.forward``,
        bit-identical to it. Collective: every rank calls it, with zero tokens if it has none.
        """
        lead = hidden_states.shape[:-1]
        tokens = 1
        for d in lead:
            tokens *= int(d)
        ids, weights = _route(self.local, router_logits, top_k, renormalize, tokens)
        return self.forward_topk(hidden_states, ids.reshape(*lead, ids.shape[-1]),
                                 weights.reshape(*lead, ids.shape[-1]))

    def forward_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole MoE block from hidden states with the layer's router (every rank holds
        it), as ``MoELayer.forward_hidden``."""
        return self.forward(hidden_states, self.local.router_logits(hidden_states))

    def forward_topk(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """Runs this rank's tokens through the experts of all ranks, routing given.

        Parameters
        ----------
        hidden_states : torch.Tensor
            [..., H] bfloat16/float16 (any number of tokens, 0 included).
        topk_ids : torch.Tensor
            [..., top_k] int32 global expert ids (duplicates allowed).
        topk_weights : torch.Tensor
            [..., top_k] float32.

        Returns
        -------
        torch.Tensor
            [..., H] in hidden_states' dtype, bit-identical to ``MoELayer.forward_topk`` of the
            whole layer on these tokens (shared experts included).
        """
        x, ids, weights, lead = _check_tokens(hidden_states, topk_ids, topk_weights,
                                              self.hidden_size, self.num_global_experts)
        out = self._forward(x, ids, weights)
        return out.reshape(*lead, self.hidden_size)

    def dispatch_bytes_per_row(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes sent per (token, slot) by the dispatch (the combine returns 2 H bytes)."""
        h = self.hidden_size
        return h // 2 + h // _BLOCK if self.dispatch == "mxfp4" else \
            h * torch.empty((), dtype=dtype).element_size()

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 timings: dict | None = None) -> torch.Tensor:
        device, dtype = x.device, x.dtype
        t, top_k = ids.shape
        h = self.hidden_size
        world, max_local = self.world_size, self._max_local
        mark = _Timer(timings, device)

        # Sort this rank's (token, slot) pairs by (destination, local expert, token, slot).
        key = self._send_key[ids.reshape(-1).to(torch.int64)]
        order = torch.sort(key, stable=True).indices
        send_counts = _count(key, world * max_local)
        # The count exchange also carries each rank's row width, so that a rank sending rows of
        # another dtype or size is caught on every rank before the payload exchange.
        width = self.dispatch_bytes_per_row(dtype)
        signature = width * 2 + (dtype == torch.float16)
        send_meta = torch.cat([send_counts.view(world, max_local),
                               torch.full((world, 1), signature, dtype=torch.int64,
                                          device=device)], dim=1)
        recv_meta = torch.empty_like(send_meta)
        dist.all_to_all_single(recv_meta, send_meta, group=self.group)
        host = torch.cat([send_meta, recv_meta]).cpu()  # the one host synchronisation
        send_host, recv_host = host[:world], host[world:]
        signatures = recv_host[:, max_local].tolist()
        if any(sig != signature for sig in signatures):
            sent = ", ".join(f"rank {r}: {sig // 2}-byte {'float16' if sig % 2 else 'bfloat16'}"
                             for r, sig in enumerate(signatures))
            raise ops._invalid(f"the ranks' hidden_states disagree in dtype or row size "
                               f"({sent}; dispatch {self.dispatch}, H={h}): every rank must "
                               f"pass the same activation dtype")
        in_splits = send_host[:, :max_local].sum(1).tolist()
        out_splits = recv_host[:, :max_local].sum(1).tolist()
        rows = sum(out_splits)

        # Dispatch: one payload row per (token, slot), in send order.
        if self.dispatch == "mxfp4":
            codes, scales = ops.quantize(x)
            payload = torch.cat([codes, scales], dim=1)
        else:
            payload = x.view(torch.uint8)
        send = self._traffic.get("send", t * top_k, width, torch.uint8, device)
        torch.index_select(payload, 0, order // top_k, out=send)
        recv = self._traffic.get("recv", rows, width, torch.uint8, device)
        mark.part("dispatch_prepare")
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=self.group)
        mark.part("dispatch_all_to_all")
        mark("dispatch")

        # Received rows come by (source rank, local expert); group them by local expert, then
        # append this rank's own tokens once per shared expert (local experts routed.., last).
        num_shared = self.local.num_shared_experts
        routed = self.local.num_experts - num_shared
        recv_expert_counts = recv_meta[:, :routed]  # [world, routed] on the device
        expert_of_row = torch.arange(routed, device=device).repeat(world).repeat_interleave(
            recv_expert_counts.reshape(-1), output_size=rows)
        grouped_order = torch.sort(expert_of_row, stable=True).indices
        counts = recv_expert_counts.sum(0)
        per_expert = recv_host[:, :routed].sum(0).tolist() + [t] * num_shared
        if num_shared:
            counts = torch.cat([counts, torch.full((num_shared,), t, dtype=torch.int64,
                                                   device=device)])
        # Offsets from the device copy of the counts (a host -> device copy would synchronise);
        # the scale row count, an allocation size, from the host copy.
        expert_offsets, blockscale_offsets = ops.expert_offsets_from_counts(counts)
        scale_rows = sum((c + 127) // 128 * 128 for c in per_expert)
        grouped = recv[grouped_order]
        if num_shared:
            grouped = torch.cat([grouped, payload.repeat(num_shared, 1)])
        if self.dispatch == "mxfp4":
            # A fresh [R, H/2] tensor: a column slice of no rows still has the payload's strides.
            a_packed = torch.empty(grouped.shape[0], h // 2, dtype=torch.uint8, device=device)
            a_packed.copy_(grouped[:, :h // 2])
            # Scale row j of expert e goes to row blockscale_offsets[e] + j of a linear [scale_rows,
            # H/32] matrix, zeros elsewhere; swizzling it 128 rows at a time gives the per-expert
            # swizzled layout experts_quantize writes (expert blocks start at multiples of 128).
            sorted_expert = expert_of_row[grouped_order]
            if num_shared:
                sorted_expert = torch.cat([sorted_expert, routed + torch.arange(
                    num_shared, device=device).repeat_interleave(t)])
            shift = (blockscale_offsets - expert_offsets)[:-1].to(torch.int64)
            target = torch.arange(grouped.shape[0], device=device) + shift[sorted_expert]
            linear = torch.zeros(scale_rows, h // _BLOCK, dtype=torch.uint8, device=device)
            linear[target] = grouped[:, h // 2:]
            a_scales = ops.swizzle_scales(linear)
        else:
            a_packed, a_scales = ops.experts_quantize(grouped.view(dtype), expert_offsets,
                                                      blockscale_offsets, scale_rows)
        y = _run_experts(self.local, a_packed, a_scales, expert_offsets, blockscale_offsets,
                         dtype, self.local.w2_bias)
        mark("experts")

        # Combine: outputs go back in received order, then into their (token, slot) places;
        # the shared experts' outputs (weight 1) follow the routed slots.
        back_send = self._traffic.get("back_send", rows, h, dtype, device)
        back_send[grouped_order] = y[:rows]
        back_recv = self._traffic.get("back_recv", t * top_k, h, dtype, device)
        mark.part("combine_prepare")
        dist.all_to_all_single(back_recv, back_send, in_splits, out_splits, group=self.group)
        mark.part("combine_all_to_all")
        slots = top_k + num_shared
        contributions = self._traffic.get("contributions", t * slots, h, dtype, device).view(
            t, slots, h)
        place = order if num_shared == 0 else (order // top_k) * slots + order % top_k
        contributions.view(t * slots, h)[place] = back_recv
        if num_shared:
            contributions[:, top_k:] = y[rows:].view(num_shared, t, h).transpose(0, 1)
        out = _weighted_sum(contributions, _with_shared_weights(weights, num_shared)).to(dtype)
        mark("combine")
        return out


class _Timer:
    """Wall time of the stages of a forward, when asked for (benchmarks); free otherwise.

    ``mark(stage)`` ends a stage (dispatch, experts, combine); ``mark.part(name)`` records the
    time since the stage's start or its previous part (e.g. dispatch_all_to_all) without ending
    the stage, so the stages still sum to the forward."""

    def __init__(self, timings: dict | None, device: torch.device):
        self._timings = timings
        self._device = device
        if timings is not None:
            import time

            self._clock = time.perf_counter
            self._last = self._part = self._clock()

    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return self._clock()

    def part(self, name: str) -> None:
        if self._timings is None:
            return
        now = self._now()
        self._timings[name] = self._timings.get(name, 0.0) + now - self._part
        self._part = now

    def __call__(self, stage: str) -> None:
        if self._timings is None:
            return
        now = self._now()
        self._timings[stage] = self._timings.get(stage, 0.0) + now - self._last
        self._last = self._part = now


def _layer_config(layer: MoELayer) -> dict:
    """What besides shapes must agree across ranks: the model options (tensors by presence and
    shape; their values are each rank's own)."""
    config = {}
    for name, value in layer.model_options().items():
        if isinstance(value, torch.Tensor):  # per-expert tensors differ in size across ranks
            value = f"{str(value.dtype).replace('torch.', '')} tensor"
        config[name] = value
    return config


# ---- Tensor parallelism --------------------------------------------------------------------------


def shard_intermediate(intermediate_size: int, world_size: int,
                       equal_shards: bool = True) -> list[tuple[int, int, int]]:
    """How I splits over tensor-parallel ranks: (begin, end, width) per rank.

    Shards are whole blocks of 32 columns, as even as possible (so I/tp need not be a multiple of
    32: GPT-OSS I = 2880 at tp = 4 gives 736, 736, 704, 704). With ``equal_shards`` every rank's
    width is the largest shard's, the shorter ones padded with zero rows of w13 and zero columns
    of w2 (exact: a zero gate and up give a zero activation, zero weights add nothing).
    """
    intermediate_size, world_size = int(intermediate_size), int(world_size)
    blocks = intermediate_size // _BLOCK
    if intermediate_size % _BLOCK or blocks < world_size:
        raise ops._invalid(f"I must be a multiple of 32 with at least one block of 32 per rank, "
                           f"got I={intermediate_size} over {world_size} ranks")
    base, extra = divmod(blocks, world_size)
    shards, begin = [], 0
    for r in range(world_size):
        width = (base + (r < extra)) * _BLOCK
        shards.append((begin, begin + width, width))
        begin += width
    if equal_shards:
        widest = shards[0][2]
        shards = [(b, e, widest) for b, e, _ in shards]
    return shards


def _shard_layer(layer: MoELayer, begin: int, end: int, width: int) -> MoELayer:
    """The experts of ``layer`` restricted to intermediate columns [begin, end), zero-padded to
    ``width``."""
    i = layer.intermediate_size
    e, _, half_h = layer.w13_packed.shape
    h = layer.hidden_size
    device = layer.w13_packed.device

    def rows(t, *cols):  # [E, 2I, ...] -> [E, 2 width, ...]: gate rows, then up, zero-padded
        out = torch.zeros(e, 2 * width, *cols, dtype=t.dtype, device=device)
        out[:, :end - begin] = t[:, begin:end]
        out[:, width:width + end - begin] = t[:, i + begin:i + end]
        return out

    def cols(t, per):  # [E, H, I/per] -> [E, H, width/per]
        out = torch.zeros(e, h, width // per, dtype=t.dtype, device=device)
        out[:, :, :(end - begin) // per] = t[:, :, begin // per:end // per]
        return out

    options = layer.model_options()
    if options["w13_bias"] is not None:  # zero bias on the padding: a zero activation there
        options["w13_bias"] = rows(options["w13_bias"])
    return MoELayer(rows(layer.w13_packed, half_h), rows(layer.w13_scales, h // _BLOCK),
                    cols(layer.w2_packed, 2), cols(layer.w2_scales, _BLOCK), **options)


class TensorParallelMoE(torch.nn.Module):
    """One MoE layer with its intermediate dimension split over a process group.

    Every rank passes the same tokens and routing and gets the whole output. Use
    ``from_layer`` / ``from_checkpoint``; the constructor takes this rank's shard.

    Parameters
    ----------
    shard_layer : MoELayer
        Every expert, intermediate columns of this rank only (``shard_intermediate``).
    intermediate_size : int
        I of the whole layer.
    group : torch.distributed.ProcessGroup, optional
        Default: the world group.
    """

    def __init__(self, shard_layer: MoELayer, intermediate_size: int, group=None):
        super().__init__()
        rank, world = _group_rank_world(group)
        description = {
            "error": None if shard_layer.expert_map is None else
            "the shard layer must hold every expert (no expert_map)",
            "hidden": shard_layer.hidden_size,
            "intermediate": int(intermediate_size),
            "global_experts": shard_layer.num_experts,
            "device_type": shard_layer.w13_packed.device.type,
            "config": _layer_config(shard_layer),
            "width": shard_layer.intermediate_size,
        }
        _exchange_descriptions(description, group)
        self.shard = shard_layer
        self.intermediate_size = int(intermediate_size)
        self.group = group
        self.rank = rank
        self.world_size = world

    @classmethod
    def from_layer(cls, layer: MoELayer, group=None, equal_shards: bool = True):
        """Keeps this rank's intermediate shard of a whole layer."""
        rank, world = _group_rank_world(group)
        begin, end, width = shard_intermediate(layer.intermediate_size, world, equal_shards)[rank]
        return cls(_shard_layer(layer, begin, end, width), layer.intermediate_size, group)

    @classmethod
    def from_checkpoint(cls, path_or_tensors, prefix: str, num_experts: int | None = None,
                        group=None, equal_shards: bool = True, device=None, **options):
        """Reads the layer on the CPU (``MoELayer.from_checkpoint``, with its options), keeps
        this rank's shard, moves it to ``device``."""
        layer = MoELayer.from_checkpoint(path_or_tensors, prefix, num_experts=num_experts,
                                         **options)
        return cls.from_layer(layer, group, equal_shards).to(device or "cpu")

    @property
    def hidden_size(self) -> int:
        return self.shard.hidden_size

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, intermediate={self.intermediate_size}, "
                f"shard={self.shard.intermediate_size}")

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                top_k: int | None = None, renormalize: bool | None = None) -> torch.Tensor:
        """Same arguments and result as ``MoELayer.forward`` (within the bound above);
        collective: every rank passes the same tokens and logits."""
        lead = hidden_states.shape[:-1]
        tokens = 1
        for d in lead:
            tokens *= int(d)
        ids, weights = _route(self.shard, router_logits, top_k, renormalize, tokens)
        return self.forward_topk(hidden_states, ids.reshape(*lead, ids.shape[-1]),
                                 weights.reshape(*lead, ids.shape[-1]))

    def forward_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole MoE block from hidden states with the layer's router."""
        return self.forward(hidden_states, self.shard.router_logits(hidden_states))

    def forward_topk(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """Same arguments and result as ``MoELayer.forward_topk`` (within the bound above);
        collective: every rank passes the same tokens and routing."""
        routed = self.shard.num_experts - self.shard.num_shared_experts
        x, ids, weights, lead = _check_tokens(hidden_states, topk_ids, topk_weights,
                                              self.hidden_size, routed)
        partial = _weighted_sum(self._expert_outputs(x, ids),
                                _with_shared_weights(weights, self.shard.num_shared_experts))
        dist.all_reduce(partial, group=self.group)
        return partial.to(x.dtype).reshape(*lead, self.hidden_size)

    def _expert_outputs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[T, H], [T, k] -> this rank's expert outputs [T, k + S, H] (activation dtype; the w2
        bias, added once, on rank 0 only), shared experts' slots last."""
        t = ids.shape[0]
        e, num_shared = self.shard.num_experts, self.shard.num_shared_experts
        if num_shared:
            shared = torch.arange(e - num_shared, e, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, shared.expand(t, num_shared)], dim=1)
        slots = ids.shape[1]
        key = ids.reshape(-1).to(torch.int64)
        order = torch.sort(key, stable=True).indices
        expert_offsets, blockscale_offsets = ops.expert_offsets_from_counts(_count(key, e))
        a_packed, a_scales = ops.experts_quantize(x[order // slots], expert_offsets,
                                                  blockscale_offsets)
        y = _run_experts(self.shard, a_packed, a_scales, expert_offsets, blockscale_offsets,
                         x.dtype, self.shard.w2_bias if self.rank == 0 else None)
        contributions = torch.empty(t * slots, self.hidden_size, dtype=x.dtype, device=x.device)
        contributions[order] = y
        return contributions.view(t, slots, self.hidden_size)
