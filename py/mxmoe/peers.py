"""torch MoE peers that mxmoe is measured against (docs/design.md): same routing, no mxmoe.

  TorchBf16Moe  bf16 expert weights, two ``torch._grouped_mm`` calls;
  TorchFp8Moe   FP8 e4m3 weights (per output channel scales) and activations (rowwise scales,
                quantized inside the call), two ``torch._scaled_grouped_mm`` calls.
Both: softmax -> top-k -> renormalise -> sort rows by expert -> GEMM1 -> SiLU-and-mul -> GEMM2
-> weighted scatter-add in fp32 -> bf16. Shapes as mxmoe: w13 [E, 2I, H] (gate rows, then up),
w2 [E, H, I], hidden [T, H] bf16, router logits [T, E].

Limits: CUDA only (torch's grouped GEMMs need Hopper or newer); router logits path with
renormalisation only; used by the demo and bench/bench_moe.py, not by the library.
"""

from __future__ import annotations

import torch

__all__ = ["TorchBf16Moe", "TorchFp8Moe", "route_and_sort"]

FP8_MAX = 448.0


def route_and_sort(logits: torch.Tensor, top_k: int, num_experts: int):
    """-> (weights [T*top_k] in expert-sorted order, token index per sorted row, offs [E] int32).

    Static shapes only (argsort, scatter_add, cumsum), so the whole layer is graph-capturable.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return weights.flatten()[order], order // top_k, offs


def _rowwise_fp8(x: torch.Tensor):
    scale = x.abs().amax(dim=-1).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def _combine(hidden: torch.Tensor, y: torch.Tensor, weights, token_index) -> torch.Tensor:
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    out.index_add_(0, token_index, y.float() * weights[:, None])
    return out.to(hidden.dtype)


class TorchBf16Moe:
    """bf16 MoE on ``torch._grouped_mm`` (B passed as a column-major [E, K, N] view)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int):
        self.w13_t, self.w2_t = w13.transpose(-2, -1), w2.transpose(-2, -1)
        self.top_k, self.num_experts, self.inter = top_k, w13.shape[0], w2.shape[2]

    def __call__(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, token_index, offs = route_and_sort(logits, self.top_k, self.num_experts)
        h = torch._grouped_mm(hidden[token_index], self.w13_t, offs=offs)
        a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
        y = torch._grouped_mm(a, self.w2_t, offs=offs)
        return _combine(hidden, y, weights, token_index)


class TorchFp8Moe:
    """FP8 rowwise MoE on ``torch._scaled_grouped_mm``; activation quantization included."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int):
        self.w13_q, self.w13_s = self._quantize_weight(w13)
        self.w2_q, self.w2_s = self._quantize_weight(w2)
        self.top_k, self.num_experts, self.inter = top_k, w13.shape[0], w2.shape[2]

    @staticmethod
    def _quantize_weight(w: torch.Tensor):
        # Expert by expert: a float32 copy of all experts at once would not fit real models.
        scale = w.abs().amax(dim=-1).float().clamp_min(1e-12) / FP8_MAX
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
        for e in range(w.shape[0]):
            q[e] = (w[e].float() / scale[e, :, None]).to(torch.float8_e4m3fn)
        return q.transpose(-2, -1), scale

    def __call__(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, token_index, offs = route_and_sort(logits, self.top_k, self.num_experts)
        xq, xs = _rowwise_fp8(hidden[token_index])
        h = torch._scaled_grouped_mm(xq, self.w13_q, xs, self.w13_s, offs=offs,
                                     out_dtype=torch.bfloat16)
        a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
        aq, as_ = _rowwise_fp8(a)
        y = torch._scaled_grouped_mm(aq, self.w2_q, as_, self.w2_s, offs=offs,
                                     out_dtype=torch.bfloat16)
        return _combine(hidden, y, weights, token_index)
