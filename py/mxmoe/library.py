"""The mxmoe entry points as torch custom ops (``torch.ops.mxmoe.*``).

``mxmoe.ops`` checks and explains its arguments, then calls the op registered here; the op
allocates its outputs, queries and caches the workspace and calls the C API. Registering the
ops with ``torch.library`` is what lets ``torch.compile(fullgraph=True)``, ``torch.export``
and ``torch.jit.trace`` see them: each op has a fake (meta) implementation that computes the
output shapes from the input shapes alone, never reading data.

Output shapes never depend on tensor contents, with one exception: the byte size of a prepared
weight buffer (``prepare_weights``) is the backend's business, so under tracing it is an
unbacked symbolic size. Everything else is an explicit argument: the scale rows of the
per-expert quantizers (``scale_rows``, for which ``mxmoe.ops`` passes a data-independent
bound) and every weight dimension (E, N, K, I), which the callers know from the weight shapes.

The ops are inference only: none has a backward. ``mxmoe.ops`` refuses inputs that require
grad (outside ``torch.no_grad()`` / ``torch.inference_mode()``) with a message naming the
argument; calling ``torch.ops.mxmoe.*`` directly on such inputs raises torch's own
"no autograd kernel" error at backward time.

Adding an argument to an op (as ``moe_forward``'s activation, bias, routing and shared-expert
options were) means adding it, with a default, to the op's ``_<name>_impl`` signature here and
to its ``_<name>_fake``; the schema is inferred from the type hints.

Eager calls outside any tracing skip the dispatcher: ``mxmoe.ops`` calls ``DIRECT.<name>`` (the
same Python implementation) when nothing could record the call (not compiling, not
``torch.jit`` tracing, no dispatch mode such as FakeTensorMode or make_fx's proxy mode, plain
tensors), and ``torch.ops.mxmoe.<name>`` otherwise. bench/bench_op_overhead.py measures both.

Limits: integer codes (scale layout, weight format, backend) are the C API's enum values, as
in ``mxmoe._mxmoe``; the ops do not re-validate what ``mxmoe.ops`` already checked, the C API
does (a direct caller still gets its status and message).
"""

from __future__ import annotations

import types

import torch

from mxmoe import _mxmoe
from mxmoe import ops as _ops

__all__ = ["NAMESPACE", "OP_NAMES"]

NAMESPACE = "mxmoe"
OP_NAMES = (
    "quantize",
    "dequantize",
    "experts_quantize",
    "silu_mul_experts_quantize",
    "swizzle_scales",
    "unswizzle_scales",
    "quantize_weights",
    "prepare_weights",
    "grouped_gemm",
    "moe_forward",
)

_SWIZZLED = _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4
Tensor = torch.Tensor


def _round_up(x, m: int):
    return (x + m - 1) // m * m


def _scale_shape(rows, k, layout: int) -> tuple:
    """Scales of [rows, K] values: LINEAR [rows, K/32], SWIZZLED [round_up(rows,128), ...]."""
    if layout == _SWIZZLED:
        return (_round_up(rows, 128), _round_up(k // 32, 4))
    return (rows, k // 32)


# ---- Quantize / dequantize -----------------------------------------------------------------------


def _quantize_impl(x: Tensor, scale_layout: int) -> tuple[Tensor, Tensor]:
    """x [rows, K] bf16/fp16 -> packed [rows, K/2] uint8, scales (LINEAR or SWIZZLED) uint8."""
    rows, k = x.shape
    packed = torch.empty(rows, k // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(_scale_shape(rows, k, scale_layout), dtype=torch.uint8, device=x.device)
    _mxmoe.quantize(x, packed, scales, scale_layout, _ops._stream(x.device))
    return packed, scales


def _quantize_fake(x, scale_layout):
    rows, k = x.shape
    return (x.new_empty((rows, k // 2), dtype=torch.uint8),
            x.new_empty(_scale_shape(rows, k, scale_layout), dtype=torch.uint8))


def _dequantize_impl(packed: Tensor, scales: Tensor, scale_layout: int,
                     dtype: torch.dtype) -> Tensor:
    """packed [rows, K/2], scales -> [rows, K] in dtype."""
    rows, half_k = packed.shape
    out = torch.empty(rows, half_k * 2, dtype=dtype, device=packed.device)
    _mxmoe.dequantize(packed, scales, scale_layout, out, _ops._stream(packed.device))
    return out


def _dequantize_fake(packed, scales, scale_layout, dtype):
    rows, half_k = packed.shape
    return packed.new_empty((rows, half_k * 2), dtype=dtype)


# ---- Grouped (per-expert) activations ----------------------------------------------------------


def _experts_quantize(op, x, expert_offsets, blockscale_offsets, scale_rows, width):
    packed = torch.empty(x.shape[0], width // 2, dtype=torch.uint8, device=x.device)
    # Zero-filled: rows no expert owns stay 0, as the contract promises.
    scales = torch.zeros(scale_rows, _round_up(width // 32, 4), dtype=torch.uint8,
                         device=x.device)
    op(x, expert_offsets, blockscale_offsets, packed, scales, _ops._stream(x.device))
    return packed, scales


def _experts_quantize_impl(x: Tensor, expert_offsets: Tensor, blockscale_offsets: Tensor,
                           scale_rows: int) -> tuple[Tensor, Tensor]:
    """x [rows, K] -> packed [rows, K/2], scales [scale_rows, round_up(K/32, 4)]."""
    return _experts_quantize(_mxmoe.experts_quantize, x, expert_offsets, blockscale_offsets,
                             scale_rows, x.shape[1])


def _experts_quantize_fake(x, expert_offsets, blockscale_offsets, scale_rows):
    k = x.shape[1]
    return (x.new_empty((x.shape[0], k // 2), dtype=torch.uint8),
            x.new_empty((scale_rows, _round_up(k // 32, 4)), dtype=torch.uint8))


def _silu_mul_experts_quantize_impl(x: Tensor, expert_offsets: Tensor,
                                    blockscale_offsets: Tensor,
                                    scale_rows: int) -> tuple[Tensor, Tensor]:
    """x [rows, 2N] (gate | up) -> packed [rows, N/2], scales [scale_rows, round_up(N/32, 4)]."""
    return _experts_quantize(_mxmoe.silu_mul_experts_quantize, x, expert_offsets,
                             blockscale_offsets, scale_rows, x.shape[1] // 2)


def _silu_mul_experts_quantize_fake(x, expert_offsets, blockscale_offsets, scale_rows):
    n = x.shape[1] // 2
    return (x.new_empty((x.shape[0], n // 2), dtype=torch.uint8),
            x.new_empty((scale_rows, _round_up(n // 32, 4)), dtype=torch.uint8))


# ---- Scale layouts -------------------------------------------------------------------------------


def _swizzle_scales_impl(s: Tensor) -> Tensor:
    """[batch, rows, cols] LINEAR -> [batch, round_up(rows,128), round_up(cols,4)] SWIZZLED."""
    batch, rows, cols = s.shape
    out = torch.empty(batch, _round_up(rows, 128), _round_up(cols, 4), dtype=torch.uint8,
                      device=s.device)
    _mxmoe.swizzle_scales(s, out, _ops._stream(s.device))
    return out


def _swizzle_scales_fake(s):
    batch, rows, cols = s.shape
    return s.new_empty((batch, _round_up(rows, 128), _round_up(cols, 4)))


def _unswizzle_scales_impl(s: Tensor, rows: int, cols: int) -> Tensor:
    """[batch, round_up(rows,128), round_up(cols,4)] SWIZZLED -> [batch, rows, cols] LINEAR."""
    out = torch.empty(s.shape[0], rows, cols, dtype=torch.uint8, device=s.device)
    _mxmoe.unswizzle_scales(s, out, _ops._stream(s.device))
    return out


def _unswizzle_scales_fake(s, rows, cols):
    return s.new_empty((s.shape[0], rows, cols))


# ---- Expert weights ------------------------------------------------------------------------------


def _quantize_weights_impl(w: Tensor, scale_layout: int) -> tuple[Tensor, Tensor]:
    """w [E, N, K] -> packed [E, N, K/2], scales [E, N, K/32] or [E, round_up(N,128), ...]."""
    e, n, k = w.shape
    packed = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e, *_scale_shape(n, k, scale_layout), dtype=torch.uint8,
                         device=w.device)
    _mxmoe.quantize_weights(w, packed, scales, scale_layout, _ops._stream(w.device))
    return packed, scales


def _quantize_weights_fake(w, scale_layout):
    e, n, k = w.shape
    return (w.new_empty((e, n, k // 2), dtype=torch.uint8),
            w.new_empty((e, *_scale_shape(n, k, scale_layout)), dtype=torch.uint8))


def _prepare_weights_impl(packed: Tensor, scales: Tensor, backend: int) -> Tensor:
    """LINEAR packed [E, N, K/2] + scales [E, N, K/32] -> the backend's opaque uint8 buffer."""
    e, n, half_k = packed.shape
    nbytes = _mxmoe.prepare_weights_size(packed, scales, e, n, half_k * 2, backend)
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=packed.device)
    _mxmoe.prepare_weights(packed, scales, e, n, half_k * 2, backend, buffer,
                           _ops._stream(packed.device))
    return buffer


def _prepare_weights_fake(packed, scales, backend):
    # The prepared layout's size is the backend's choice, known only to the C library.
    nbytes = torch.library.get_ctx().new_dynamic_size()
    return packed.new_empty((nbytes,), dtype=torch.uint8)


# ---- Grouped GEMM --------------------------------------------------------------------------------


def _grouped_gemm_impl(a: Tensor, a_scales: Tensor, b: Tensor, b_scales: Tensor | None,
                       b_format: int, b_backend: int, num_experts: int, n: int, k: int,
                       expert_offsets: Tensor, blockscale_offsets: Tensor,
                       problem_sizes: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """a [rows, K/2] x expert weights b (E, N, K) -> c [rows, N] out_dtype."""
    c = torch.empty(a.shape[0], n, dtype=out_dtype, device=a.device)
    args = (a, a_scales, b, b_scales, b_format, b_backend, num_experts, n, k, expert_offsets,
            blockscale_offsets, problem_sizes, c)
    nbytes = _ops._workspace_size(_mxmoe.grouped_gemm_workspace_size, *args)
    _mxmoe.grouped_gemm(*args, _ops._workspace(a.device, nbytes), _ops._stream(a.device))
    return c


def _grouped_gemm_fake(a, a_scales, b, b_scales, b_format, b_backend, num_experts, n, k,
                       expert_offsets, blockscale_offsets, problem_sizes, out_dtype):
    return a.new_empty((a.shape[0], n), dtype=out_dtype)


# ---- MoE forward ---------------------------------------------------------------------------------


def _moe_forward_impl(hidden: Tensor, w13: Tensor, w13_scales: Tensor | None, w2: Tensor,
                      w2_scales: Tensor | None, weight_format: int, weight_backend: int,
                      num_experts: int, intermediate_size: int, num_global_experts: int,
                      top_k: int, renormalize: bool, router_logits: Tensor | None,
                      topk_ids: Tensor | None, topk_weights: Tensor | None,
                      expert_map: Tensor | None, activation: int = 0, swiglu_alpha: float = 1.702,
                      swiglu_limit: float = 7.0, w13_bias: Tensor | None = None,
                      w2_bias: Tensor | None = None, routing: int = 0,
                      num_expert_groups: int = 0, topk_groups: int = 0,
                      routed_scaling_factor: float = 1.0,
                      e_score_correction_bias: Tensor | None = None,
                      num_shared_experts: int = 0) -> Tensor:
    """The whole MoE layer: hidden [T, H] -> [T, H] in hidden's dtype. The trailing model
    options are ``mxmoe.ops.moe_forward``'s (activation and routing as the C enum codes)."""
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    options = _ops._make_moe_options(activation, swiglu_alpha, swiglu_limit, w13_bias, w2_bias,
                                     routing, num_expert_groups, topk_groups,
                                     routed_scaling_factor, e_score_correction_bias,
                                     num_shared_experts)
    args = (hidden, w13, w13_scales, w2, w2_scales, weight_format, weight_backend, num_experts,
            intermediate_size, num_global_experts, top_k, renormalize, router_logits, topk_ids,
            topk_weights, expert_map, out, options)
    nbytes = _ops._workspace_size(_mxmoe.moe_forward_workspace_size, *args)
    _mxmoe.moe_forward(*args, _ops._workspace(hidden.device, nbytes),
                       _ops._stream(hidden.device))
    return out


def _moe_forward_fake(hidden, w13, w13_scales, w2, w2_scales, weight_format, weight_backend,
                      num_experts, intermediate_size, num_global_experts, top_k, renormalize,
                      router_logits, topk_ids, topk_weights, expert_map, activation=0,
                      swiglu_alpha=1.702, swiglu_limit=7.0, w13_bias=None, w2_bias=None,
                      routing=0, num_expert_groups=0, topk_groups=0, routed_scaling_factor=1.0,
                      e_score_correction_bias=None, num_shared_experts=0):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


# ---- Registration --------------------------------------------------------------------------------

# torch.ops.mxmoe.<name> from _<name>_impl (schema inferred from its type hints) and
# _<name>_fake; the module attribute <name> is the op's CustomOpDef.
for _name in OP_NAMES:
    _op = torch.library.custom_op(f"{NAMESPACE}::{_name}", globals()[f"_{_name}_impl"],
                                  mutates_args=())
    _op.register_fake(globals()[f"_{_name}_fake"])
    globals()[_name] = _op
del _name, _op

# The implementations themselves, for eager calls outside any tracing (``mxmoe.ops`` uses them
# then): the dispatcher's per-call cost is skipped where nothing would record the call.
DIRECT = types.SimpleNamespace(**{name: globals()[f"_{name}_impl"] for name in OP_NAMES})
