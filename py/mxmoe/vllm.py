"""Drop-ins for vLLM's MXFP4 W4A4 MoE ops and experts class, on every mxmoe backend.

The functions keep vLLM's names, parameter names and order, dtypes, output shapes and
semantics (``vllm/_custom_ops.py`` and ``vllm/model_executor/layers/fused_moe/cutlass_moe.py``),
so call sites work unchanged, positionally or by keyword:

    from mxmoe import vllm as ops
    a_fp4, a_scales = ops.mxfp4_experts_quant(a, expert_offsets, blockscale_offsets, e, topk)
    ops.cutlass_mxfp4_moe_mm(c, a_fp4, w_fp4, a_scales, w_scales, problem_sizes,
                             expert_offsets[:-1], blockscale_offsets[:-1])

Shapes and layouts (vLLM's):
- ``mxfp4_experts_quant`` / ``silu_and_mul_mxfp4_experts_quant``: output uint8
  [m_numtopk, K/2]; output_scales uint8 [MAX_TOKENS_PER_EXPERT * topk, round_up(K/32, 4)],
  expert e's scales swizzled 128x4 from row blockscale_offsets[e], every other byte 0.
  MAX_TOKENS_PER_EXPERT is vLLM's ``VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE`` (read from the same
  environment variable, default 65536), so the scale buffer is as large as vLLM's: zero-filling
  it costs 65536 * topk * round_up(K/32, 4) bytes of writes per call.
- ``cutlass_mxfp4_moe_mm``: b_scales are each expert's [N, K/32] scales swizzled 128x4
  (``swizzle_mxfp4_scales``), in any shape holding E * round_up(N,128) * round_up(K/32,4) bytes
  (vLLM's tests view them as [E, N, K/32]); expert_offsets and sf_offsets are the [E] start rows
  (``[:-1]`` of the [E+1] offsets). The result is written into out_tensors (one copy of the
  [rows, N] result: mxmoe's GEMM allocates its own output).
- ``run_cutlass_moe_mxfp4``: writes ``output`` [m, k] in place; the final top-k combine is
  vLLM's expression (weights cast to the output dtype, products summed over top-k by torch).
  workspace13 and workspace2 are accepted and not used (mxmoe allocates what it needs).

Numerics: the quantizers and the GEMM are mxmoe's (docs/format.md lists every difference from
vLLM's kernels). Activations: SiLU-and-mul only (``MoEActivation.SILU`` or "silu"); the others
raise UnsupportedError.

``MxfpMoEExperts`` implements vLLM's modular-kernel experts interface
(``FusedMoEExpertsModular``, formerly ``FusedMoEPermuteExpertsUnpermute``): standard activation
format, ``workspace_shapes``, ``apply`` with ``expert_map``. ``vllm_experts_class()`` returns it
as a subclass of vLLM's base class; vLLM is imported only there.

Limits: inference only; ``apply_router_weight_on_input`` needs topk == 1 (as in vLLM).
"""

from __future__ import annotations

import os

import torch

from mxmoe import ops

__all__ = [
    "MxfpMoEExperts",
    "cutlass_mxfp4_moe_mm",
    "max_tokens_per_expert",
    "mxfp4_experts_quant",
    "run_cutlass_moe_mxfp4",
    "silu_and_mul_mxfp4_experts_quant",
    "swizzle_mxfp4_scales",
    "vllm_experts_class",
]

_DEFAULT_MAX_TOKENS_PER_EXPERT = 65536


def max_tokens_per_expert() -> int:
    """vLLM's VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE (default 65536): the scale buffers' row bound."""
    value = os.environ.get("VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE", _DEFAULT_MAX_TOKENS_PER_EXPERT)
    try:
        value = int(value)
    except ValueError:
        raise ops._invalid(f"VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE must be an integer, got "
                           f"{value!r}") from None
    if value <= 0:
        raise ops._invalid(f"VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE must be > 0, got {value}")
    return value


def _round_up(x, m: int):
    return (x + m - 1) // m * m


def _experts_quant(op, input_tensor, expert_offsets, blockscale_offsets, n_experts: int,
                   topk: int):
    x = ops._tensor(input_tensor, "input_tensor")
    if x.dim() != 2:
        raise ops._invalid(f"input_tensor must be 2-D [m_numtopk, K], got shape "
                           f"{ops._shape_str(x.shape)}")
    if int(topk) < 1:
        raise ops._invalid(f"topk must be >= 1, got {topk}")
    bound = max_tokens_per_expert()
    if x.shape[0] > bound * int(topk):
        raise ops._invalid(f"input_tensor has m_numtopk={x.shape[0]} rows, more than "
                           f"MAX_TOKENS_PER_EXPERT * topk = {bound} * {topk}; raise "
                           f"VLLM_MAX_TOKENS_PER_EXPERT_FP4_MOE")
    eo = ops._tensor(expert_offsets, "expert_offsets")
    if eo.dim() == 1 and eo.shape[0] != int(n_experts) + 1:
        raise ops._invalid(f"expert_offsets must have n_experts + 1 = {int(n_experts) + 1} "
                           f"entries, got shape {ops._shape_str(eo.shape)}")
    # vLLM's scale buffer has MAX_TOKENS_PER_EXPERT * topk rows whatever the batch; mxmoe never
    # allocates more than a valid layout of these rows can use (the tight bound), so a larger
    # vLLM buffer is the tight result followed by zero rows (which vLLM's kernels never read).
    vllm_rows = bound * int(topk)
    tight = ops.default_scale_rows(x.shape[0], int(n_experts))
    if vllm_rows <= tight:
        return op(x, eo, blockscale_offsets, scale_rows=vllm_rows)
    packed, scales = op(x, eo, blockscale_offsets)
    full = scales.new_zeros(vllm_rows, scales.shape[1])
    full[:scales.shape[0]] = scales
    return packed, full


def mxfp4_experts_quant(input_tensor: torch.Tensor, expert_offsets: torch.Tensor,
                        blockscale_offsets: torch.Tensor, n_experts: int,
                        topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``mxfp4_experts_quant``: rows grouped by expert -> MXFP4 codes and E8M0 scales.

    Parameters
    ----------
    input_tensor : torch.Tensor
        [m_numtopk, K] bfloat16/float16, K % 32 == 0; expert e owns rows
        [expert_offsets[e], expert_offsets[e+1]).
    expert_offsets, blockscale_offsets : torch.Tensor
        [n_experts + 1] int32 (blockscale_offsets: cumulative round_up(m_e, 128)).
    n_experts, topk : int

    Returns
    -------
    output : torch.Tensor
        [m_numtopk, K/2] uint8.
    output_scales : torch.Tensor
        [MAX_TOKENS_PER_EXPERT * topk, round_up(K/32, 4)] uint8, swizzled 128x4 per expert.
    """
    return _experts_quant(ops.experts_quantize, input_tensor, expert_offsets, blockscale_offsets,
                          n_experts, topk)


def silu_and_mul_mxfp4_experts_quant(input_tensor: torch.Tensor, expert_offsets: torch.Tensor,
                                     blockscale_offsets: torch.Tensor, n_experts: int,
                                     topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``silu_and_mul_mxfp4_experts_quant``: [m, 2N] gate | up -> silu(gate) * up ->
    output [m, N/2] uint8, output_scales [MAX_TOKENS_PER_EXPERT * topk, round_up(N/32, 4)]."""
    return _experts_quant(ops.silu_mul_experts_quantize, input_tensor, expert_offsets,
                          blockscale_offsets, n_experts, topk)


def swizzle_mxfp4_scales(scales: torch.Tensor, N: int, K: int) -> torch.Tensor:  # noqa: N803
    """vLLM's ``swizzle_mxfp4_scales``: flat [N, K/32] E8M0 scales -> the 128x4 tiled layout.

    Returns a 1-D uint8 tensor of round_up(N, 128) * round_up(K/32, 4) bytes, padding 0.
    """
    s = ops._tensor(scales, "scales")
    if s.dtype != torch.uint8:
        raise ops._invalid(f"scales must have dtype uint8, got "
                           f"{str(s.dtype).replace('torch.', '')}")
    N, K = int(N), int(K)  # noqa: N806
    if N < 0 or K < 0 or K % 32:
        raise ops._invalid(f"N must be >= 0 and K a multiple of 32, got N={N} K={K}")
    if s.numel() != N * (K // 32):
        raise ops._invalid(f"scales must hold N * K/32 = {N * (K // 32)} bytes ([N, K/32] with "
                           f"N={N} K={K}), got shape {ops._shape_str(s.shape)}")
    return ops.swizzle_scales(s.reshape(N, K // 32)).reshape(-1)


def _full_offsets(starts: torch.Tensor, problem_sizes: torch.Tensor, align: int) -> torch.Tensor:
    """[E] start rows + problem_sizes [E, 3] -> [E+1] int32 offsets (no host synchronisation)."""
    last = starts[-1:] + (_round_up(problem_sizes[-1:, 0], align) if align > 1
                          else problem_sizes[-1:, 0])
    return torch.cat([starts, last.to(starts.dtype)])


def cutlass_mxfp4_moe_mm(out_tensors: torch.Tensor, a_tensors: torch.Tensor,
                         b_tensors: torch.Tensor, a_scales: torch.Tensor,
                         b_scales: torch.Tensor, problem_sizes: torch.Tensor,
                         expert_offsets: torch.Tensor, sf_offsets: torch.Tensor) -> None:
    """vLLM's ``cutlass_mxfp4_moe_mm``: per-expert out[rows of e] = A[rows of e] x B[e]^T.

    Parameters
    ----------
    out_tensors : torch.Tensor
        [rows, N] bfloat16/float16, written in place (rows past the last expert's untouched).
    a_tensors : torch.Tensor
        [rows, K/2] uint8 (``mxfp4_experts_quant`` output).
    b_tensors : torch.Tensor
        [E, N, K/2] uint8.
    a_scales : torch.Tensor
        [scale_rows, round_up(K/32, 4)] uint8, expert e's from row sf_offsets[e].
    b_scales : torch.Tensor
        E * round_up(N,128) * round_up(K/32,4) uint8 bytes, each expert's swizzled 128x4.
    problem_sizes : torch.Tensor
        [E, 3] int32 (m_e, N, K).
    expert_offsets, sf_offsets : torch.Tensor
        [E] int32 start row of each expert in a_tensors / a_scales.
    """
    out = ops._tensor(out_tensors, "out_tensors")
    b = ops._tensor(b_tensors, "b_tensors")
    ops._check(b, "b_tensors", "[E, N, K/2]", (None, None, None), (torch.uint8,))
    e, n, half_k = b.shape
    k = half_k * 2
    bs = ops._tensor(b_scales, "b_scales")
    want = e * _round_up(n, 128) * _round_up(k // 32, 4)
    if bs.dtype != torch.uint8 or bs.numel() != want or not bs.is_contiguous():
        raise ops._invalid(f"b_scales must be contiguous uint8 holding E * round_up(N,128) * "
                           f"round_up(K/32,4) = {want} bytes (E={e} N={n} K={k}), got shape "
                           f"{ops._shape_str(bs.shape)} dtype {bs.dtype}")
    bs = bs.reshape(e, _round_up(n, 128), _round_up(k // 32, 4))
    ps = ops._tensor(problem_sizes, "problem_sizes")
    ops._check(ps, "problem_sizes", "[E, 3] (m_e, N, K)", (e, 3), (torch.int32,))
    starts = ops._tensor(expert_offsets, "expert_offsets")
    ops._check(starts, "expert_offsets", "[E] (start rows)", (e,), (torch.int32,))
    sf = ops._tensor(sf_offsets, "sf_offsets")
    ops._check(sf, "sf_offsets", "[E] (start scale rows)", (e,), (torch.int32,))
    ops._check(out, "out_tensors", "[rows, N]", (a_tensors.shape[0], n), ops._ACTIVATION_DTYPES)
    c = ops.grouped_gemm(a_tensors, a_scales, b, bs, _full_offsets(starts, ps, 1),
                         _full_offsets(sf, ps, 128), problem_sizes=ps, out_dtype=out.dtype,
                         b_format="swizzled")
    out.copy_(c)


# ---- The whole MoE -------------------------------------------------------------------------------


def _activation_name(activation) -> str:
    name = getattr(activation, "name", activation)
    name = str(name).lower()
    if name != "silu":
        raise ops._error(ops.UnsupportedError, "UNSUPPORTED",
                         f"activation {activation!r} is not served by mxmoe.vllm (SiLU-and-mul "
                         f"only)")
    return name


def _route(topk_ids: torch.Tensor, e: int):
    """Rows grouped by expert, without a host synchronisation.

    topk_ids [m, topk] local ids (-1 = no local expert) -> (expert_offsets [e+1],
    blockscale_offsets [e+1], problem-row order [m*topk] (flat index into topk_ids), valid
    [m*topk] bool in that order).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, torch.full_like(flat, e))  # dropped rows sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=e + 1)[:e]
    expert_offsets, blockscale_offsets = ops.expert_offsets_from_counts(counts)
    return expert_offsets, blockscale_offsets, order, valid[order]


def run_cutlass_moe_mxfp4(output: torch.Tensor, a: torch.Tensor, w1_fp4: torch.Tensor,
                          w1_blockscale: torch.Tensor, w2_fp4: torch.Tensor,
                          w2_blockscale: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, activation, workspace13, workspace2, m: int,
                          n: int, k: int, e: int, device, apply_router_weight_on_input: bool =
                          False) -> None:
    """vLLM's ``run_cutlass_moe_mxfp4``: the MXFP4 x MXFP4 MoE, written into ``output``.

    Parameters (vLLM's): output [m, k]; a [m, k] bf16/fp16; w1_fp4 [e, 2n, k/2] uint8 with
    w1_blockscale each expert's [2n, k/32] scales swizzled 128x4; w2_fp4 [e, k, n/2] with
    w2_blockscale likewise; topk_weights / topk_ids [m, topk] (ids local, -1 = none);
    activation SILU; m, n, k, e the sizes; device ignored (the tensors' own).
    """
    del workspace13, workspace2, device
    _activation_name(activation)
    a = ops._tensor(a, "a")
    ops._check(a, "a", "[m, k]", (int(m), int(k)), ops._ACTIVATION_DTYPES)
    topk_ids = ops._tensor(topk_ids, "topk_ids")
    topk_weights = ops._tensor(topk_weights, "topk_weights")
    if topk_weights.shape != topk_ids.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != m:
        raise ops._invalid(f"topk_weights and topk_ids must both be [m, topk] with m={m}, got "
                           f"{ops._shape_str(topk_weights.shape)} and "
                           f"{ops._shape_str(topk_ids.shape)}")
    w1 = ops._tensor(w1_fp4, "w1_fp4")
    w2 = ops._tensor(w2_fp4, "w2_fp4")
    ops._check(w1, "w1_fp4", "[e, 2n, k/2]", (int(e), 2 * int(n), int(k) // 2), (torch.uint8,))
    ops._check(w2, "w2_fp4", "[e, k, n/2]", (int(e), int(k), int(n) // 2), (torch.uint8,))
    out = ops._tensor(output, "output")
    ops._check(out, "output", "[m, k]", (int(m), int(k)), (a.dtype,))
    topk = topk_ids.shape[1]
    if apply_router_weight_on_input:
        if topk != 1:
            raise ops._invalid(f"apply_router_weight_on_input needs topk == 1, got {topk}")
        a = a * topk_weights.to(a.dtype)
    eo, bo, order, valid = _route(topk_ids, int(e))
    rows = a[order // topk]  # the token of each (token, slot) pair, grouped by expert
    c1 = torch.empty(m * topk, 2 * n, dtype=a.dtype, device=a.device)
    starts, sf_starts = eo[:-1], bo[:-1]
    problem1 = torch.stack([eo[1:] - eo[:-1], torch.full_like(starts, 2 * n),
                            torch.full_like(starts, k)], 1)
    problem2 = torch.stack([eo[1:] - eo[:-1], torch.full_like(starts, k),
                            torch.full_like(starts, n)], 1)
    a_fp4, a_scales = mxfp4_experts_quant(rows, eo, bo, e, topk)
    cutlass_mxfp4_moe_mm(c1, a_fp4, w1, a_scales, w1_blockscale, problem1, starts, sf_starts)
    i_fp4, i_scales = silu_and_mul_mxfp4_experts_quant(c1, eo, bo, e, topk)
    c3 = torch.empty(m * topk, k, dtype=a.dtype, device=a.device)
    cutlass_mxfp4_moe_mm(c3, i_fp4, w2, i_scales, w2_blockscale, problem2, starts, sf_starts)
    # Back to (token, slot) order; pairs without a local expert contribute 0, and rows past
    # the last expert (never written) are masked the same way.
    c3 = torch.where(valid[:, None], c3, torch.zeros((), dtype=c3.dtype, device=c3.device))
    unsorted = torch.empty_like(c3)
    unsorted[order] = c3
    if apply_router_weight_on_input:
        out.copy_(unsorted.view(m, topk, k).sum(dim=1))
    else:
        out.copy_((unsorted.view(m, topk, k) * topk_weights.view(m, topk, 1).to(a.dtype))
                  .sum(dim=1))


# ---- vLLM's modular-kernel experts interface -----------------------------------------------------


class MxfpMoEExperts:
    """mxmoe's experts for vLLM's modular kernel (the ``FusedMoEExpertsModular`` contract).

    Holds the swizzled weight scales, as vLLM's CUTLASS MXFP4 experts do
    (``w1_scale`` [e, 2n, k/32] / ``w2_scale`` [e, k, n/32] scales swizzled 128x4 per expert);
    ``apply`` receives the packed weights. ``vllm_experts_class()`` gives the same class as a
    subclass of vLLM's base (needed where vLLM type-checks its experts).
    """

    def __init__(self, w1_scale: torch.Tensor, w2_scale: torch.Tensor):
        self.w1_scale = w1_scale
        self.w2_scale = w2_scale

    @staticmethod
    def activation_format():
        """vLLM's ``FusedMoEActivationFormat.Standard`` ("standard" without vLLM)."""
        try:
            from vllm.model_executor.layers.fused_moe import modular_kernel as mk
        except ImportError:
            return "standard"
        return mk.FusedMoEActivationFormat.Standard

    @property
    def expects_unquantized_inputs(self) -> bool:
        return True

    def supports_expert_map(self) -> bool:
        return True

    def supports_chunking(self) -> bool:
        return True

    def workspace_dtype(self, act_dtype: torch.dtype) -> torch.dtype:
        return act_dtype

    def workspace_shapes(self, M: int, N: int, K: int, topk: int,  # noqa: N803
                         global_num_experts: int, local_num_experts: int, expert_tokens_meta,
                         activation) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(workspace13, workspace2, output) shapes, as vLLM's CUTLASS MXFP4 experts ask."""
        return (M * topk, max(2 * N, K)), (M * topk, N), (M, K)

    def finalize_weight_and_reduce_impl(self):
        """vLLM's TopKWeightAndReduceNoOP: apply() already weights and sums the top-k."""
        from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
            TopKWeightAndReduceNoOP,
        )

        return TopKWeightAndReduceNoOP()

    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
              w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation,
              global_num_experts: int, expert_map: torch.Tensor | None, a1q_scale, a2_scale,
              workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input: bool) -> None:
        """Writes the MoE of hidden_states [M, K] into output [M, K].

        topk_ids are global ids; with ``expert_map`` [global_num_experts] (global -> local, -1
        = not here) the pairs routed elsewhere contribute 0.
        """
        del a1q_scale, a2_scale, expert_tokens_meta
        e, two_n, _ = w1.shape
        if expert_map is not None:
            em = ops._tensor(expert_map, "expert_map")
            ids = ops._tensor(topk_ids, "topk_ids").to(torch.int64)
            in_range = (ids >= 0) & (ids < em.shape[0])
            topk_ids = torch.where(in_range, em[ids.clamp(0, em.shape[0] - 1)].to(torch.int64),
                                   torch.full_like(ids, -1))
        run_cutlass_moe_mxfp4(output, hidden_states, w1, self.w1_scale, w2, self.w2_scale,
                              topk_weights, topk_ids, activation, workspace13, workspace2,
                              hidden_states.shape[0], two_n // 2, hidden_states.shape[1], e,
                              hidden_states.device, apply_router_weight_on_input)


def vllm_experts_class():
    """``MxfpMoEExperts`` as a subclass of vLLM's ``FusedMoEExpertsModular`` (or of its former
    name ``FusedMoEPermuteExpertsUnpermute``). Imports vLLM; raises ImportError without it."""
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk

    base = getattr(mk, "FusedMoEExpertsModular", None) or mk.FusedMoEPermuteExpertsUnpermute

    class VllmMxfpMoEExperts(MxfpMoEExperts, base):
        def __init__(self, w1_scale, w2_scale, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            MxfpMoEExperts.__init__(self, w1_scale, w2_scale)

    return VllmMxfpMoEExperts
