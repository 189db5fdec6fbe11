"""torch MoE peers that mxmoe is measured against (docs/design.md): same block, no mxmoe.

  TorchBf16Moe  bf16 expert weights, two ``torch._grouped_mm`` calls;
  TorchFp8Moe   FP8 e4m3 weights (per output channel scales) and activations (rowwise scales,
                quantized inside the call), two ``torch._scaled_grouped_mm`` calls.
Both: route -> (+ shared-expert slots) -> sort rows by expert -> GEMM1 (+ w13_bias) ->
activation -> GEMM2 (+ w2_bias) -> weighted scatter-add in fp32 -> bf16. Shapes as mxmoe:
w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I], hidden [T, H] bf16, router logits
[T, E - num_shared_experts]. The model options are ``mxmoe.ops.moe_forward``'s keyword
arguments with the same names and meanings (docs/format.md "MoE forward"); the defaults are the
Qwen3-style block (softmax top-k, renormalised, SiLU-and-mul, no biases, no shared experts).

Routing: ``route`` is the routing a torch MoE runs (torch.softmax / sigmoid / topk), timed as
part of the layer. It chooses the same experts as the contract's routing (``mxmoe.ops.route``)
except on ties and near-ties (scores within an ulp), and its weights differ from it in the last
bits (torch's exp, another sum order). ``ops.route`` itself is the bit-exact emulation (float64
FMA emulation: ~800 torch ops per call) and makes scalar tensors from host constants, which
CUDA-graph capture rejects (pytorch/pytorch#168991): no fit for a timed peer. Callers that
need the very same ids and weights (accuracy comparisons) pass ``topk_ids``/``topk_weights``
from ``ops.route``.
Numerics otherwise: bias sums in fp32 rounded once; SiLU-and-mul as two bf16 ops (torch's usual
``silu(g) * u``), SwiGLU-OAI in fp32 rounded once.

Limits: the GEMMs are CUDA only (torch's grouped GEMMs need Hopper or newer); the routing,
activation and reduce are plain torch on any device; used by the demo and bench/bench_moe.py,
not by the library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MoeBlock", "TorchBf16Moe", "TorchFp8Moe", "activation", "route", "sort_rows"]

FP8_MAX = 448.0


@dataclass(frozen=True)
class MoeBlock:
    """The model options of a MoE block (``ops.moe_forward``'s names and defaults)."""

    top_k: int
    renormalize: bool = True
    activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    routing: str = "softmax_topk"
    num_expert_groups: int = 0
    topk_groups: int = 0
    routed_scaling_factor: float = 1.0
    e_score_correction_bias: torch.Tensor | None = None
    num_shared_experts: int = 0

    def __post_init__(self):
        if self.activation not in ("silu", "swiglu_oai"):
            raise ValueError(f"activation must be 'silu' or 'swiglu_oai', got "
                             f"{self.activation!r}")
        if self.routing not in ("softmax_topk", "topk_softmax", "sigmoid_grouped_topk"):
            raise ValueError(f"routing must be 'softmax_topk', 'topk_softmax' or "
                             f"'sigmoid_grouped_topk', got {self.routing!r}")


def route(logits: torch.Tensor, block: MoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids int64 [T, top_k], weights float32 [T, top_k]): the block's routing in torch.

    Static shapes only, so the whole layer is graph-capturable.
    """
    v = logits.float()
    k = block.top_k
    if block.routing == "softmax_topk":
        weights, ids = torch.topk(torch.softmax(v, dim=-1), k, dim=-1)
        if block.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif block.routing == "topk_softmax":
        chosen, ids = torch.topk(v, k, dim=-1)
        weights = torch.softmax(chosen, dim=-1)
    else:  # sigmoid_grouped_topk (DeepSeek-V3): choose by s + bias, weigh by s
        s = torch.sigmoid(v)
        c = s if block.e_score_correction_bias is None else (
            s + block.e_score_correction_bias.float())
        groups = block.num_expert_groups or 1
        kept = block.topk_groups or groups
        if kept < groups:
            t, e = c.shape
            grouped = c.view(t, groups, e // groups)
            score = torch.topk(grouped, min(2, e // groups), dim=-1).values.sum(dim=-1)
            keep = torch.zeros(t, groups, dtype=torch.bool, device=c.device)
            keep.scatter_(1, torch.topk(score, kept, dim=-1).indices, True)
            c = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)
        ids = torch.topk(c, k, dim=-1).indices
        weights = torch.gather(s, 1, ids)
        if block.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if block.routed_scaling_factor not in (0.0, 1.0):
        weights = weights * block.routed_scaling_factor
    return ids, weights


@dataclass
class SortedRows:
    """One row per (token, slot), grouped by expert: what the grouped GEMMs consume."""

    weights: torch.Tensor  # [rows] float32
    token: torch.Tensor  # [rows] int64, the token of each row
    expert: torch.Tensor  # [rows] int64, the expert of each row
    offs: torch.Tensor  # [E] int32, cumulative rows per expert (torch._grouped_mm's offs)


def sort_rows(ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
              num_shared: int = 0) -> SortedRows:
    """Routed slots (ids [T, top_k] in [0, E - num_shared)), then the shared experts
    E - num_shared .. E - 1 with weight 1 on every token, sorted by expert (stable: token,
    slot order within an expert). Static shapes only (argsort, scatter_add, cumsum)."""
    t = ids.shape[0]
    ids = ids.to(torch.int64)
    weights = weights.to(torch.float32)
    if num_shared:
        shared = torch.arange(num_experts - num_shared, num_experts, device=ids.device)
        ids = torch.cat([ids, shared.expand(t, num_shared)], dim=1)
        weights = torch.cat([weights, weights.new_ones(t, num_shared)], dim=1)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return SortedRows(weights.flatten()[order], order // ids.shape[1], flat[order], offs)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, expert: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return y
    # A bf16 + bf16 add is computed in fp32 and rounded once: the contract's rnd(y + bias).
    return torch.add(y, bias[expert]).to(y.dtype)


def activation(h: torch.Tensor, block: MoeBlock) -> torch.Tensor:
    """GEMM1 rows h [rows, 2I] (gate | up) -> [rows, I] in h's dtype."""
    inter = h.shape[1] // 2
    gate, up = h[:, :inter], h[:, inter:]
    if block.activation == "silu":
        return torch.nn.functional.silu(gate) * up
    limit = block.swiglu_limit
    g = gate.float().clamp(max=limit)
    u = up.float().clamp(-limit, limit)
    return (g * torch.sigmoid(block.swiglu_alpha * g) * (u + 1)).to(h.dtype)


def _rowwise_fp8(x: torch.Tensor):
    scale = x.abs().amax(dim=-1).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def _combine(hidden: torch.Tensor, y: torch.Tensor, rows: SortedRows) -> torch.Tensor:
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, rows.token, y.float() * rows.weights[:, None])
    return out.to(hidden.dtype)


class _TorchMoe:
    """The layer around two grouped GEMMs (``_gemm1``/``_gemm2``: sorted rows, offs -> bf16
    rows) that the subclasses provide. Options: ``MoeBlock``'s fields as keywords."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int, **options):
        self.block = MoeBlock(top_k, **options)
        self.num_experts = w13.shape[0]
        if not 0 <= self.block.num_shared_experts < self.num_experts:
            raise ValueError(f"num_shared_experts must be in [0, {self.num_experts}), got "
                             f"{self.block.num_shared_experts}")

    def __call__(self, hidden: torch.Tensor, logits: torch.Tensor | None = None,
                 topk_ids: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] and either router logits [T, E - S] (routed by ``route``) or
        ``topk_ids``/``topk_weights`` [T, top_k] (e.g. ``mxmoe.ops.route``'s) -> [T, H]."""
        if topk_ids is None:
            topk_ids, topk_weights = route(logits, self.block)
        rows = sort_rows(topk_ids, topk_weights, self.num_experts,
                         self.block.num_shared_experts)
        h = _add_bias(self._gemm1(hidden[rows.token], rows.offs), self.block.w13_bias,
                      rows.expert)
        y = self._gemm2(activation(h, self.block), rows.offs)
        return _combine(hidden, _add_bias(y, self.block.w2_bias, rows.expert), rows)

    def _gemm1(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _gemm2(self, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchBf16Moe(_TorchMoe):
    """bf16 MoE on ``torch._grouped_mm`` (B passed as a column-major [E, K, N] view)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int, **options):
        super().__init__(w13, w2, top_k, **options)
        self.w13_t, self.w2_t = w13.transpose(-2, -1), w2.transpose(-2, -1)

    def _gemm1(self, x, offs):
        return torch._grouped_mm(x, self.w13_t, offs=offs)

    def _gemm2(self, a, offs):
        return torch._grouped_mm(a, self.w2_t, offs=offs)


class TorchFp8Moe(_TorchMoe):
    """FP8 rowwise MoE on ``torch._scaled_grouped_mm``; activation quantization included."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int, **options):
        super().__init__(w13, w2, top_k, **options)
        self.w13_q, self.w13_s = self._quantize_weight(w13)
        self.w2_q, self.w2_s = self._quantize_weight(w2)

    @staticmethod
    def _quantize_weight(w: torch.Tensor):
        # Expert by expert: a float32 copy of all experts at once would not fit real models.
        scale = w.abs().amax(dim=-1).float().clamp_min(1e-12) / FP8_MAX
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
        for e in range(w.shape[0]):
            q[e] = (w[e].float() / scale[e, :, None]).to(torch.float8_e4m3fn)
        return q.transpose(-2, -1), scale

    def _gemm1(self, x, offs):
        xq, xs = _rowwise_fp8(x)
        return torch._scaled_grouped_mm(xq, self.w13_q, xs, self.w13_s, offs=offs,
                                        out_dtype=torch.bfloat16)

    def _gemm2(self, a, offs):
        aq, as_ = _rowwise_fp8(a)
        return torch._scaled_grouped_mm(aq, self.w2_q, as_, self.w2_s, offs=offs,
                                        out_dtype=torch.bfloat16)
