"""Torch functions for every mxmoe entry point.

Each function checks its arguments (messages name the argument and the offending value),
allocates the outputs on the inputs' device, queries and caches the workspace per device,
passes ``torch.cuda.current_stream().cuda_stream`` for CUDA tensors and calls the C API through
the thin ``mxmoe._mxmoe`` module. The backend is chosen by the C library from the tensors'
device (and the ``MXMOE_BACKEND`` environment variable); ``backend_for`` says which.

numpy arrays and any object with ``__dlpack__`` (CuPy, JAX, ...) are accepted wherever a tensor
is (zero-copy views; zero-size arrays with any strides are valid); results are always torch
tensors. Each function calls one ``torch.ops.mxmoe`` custom op (``mxmoe.library``), so
``torch.compile(fullgraph=True)``, ``torch.export`` and ``torch.jit.trace`` see the calls.
Inference only: an input that requires grad is refused (message naming it) unless grad mode is
off (``torch.no_grad()`` / ``torch.inference_mode()``).

Limits:
- Offsets and expert ids in CUDA tensors cannot be checked here without a host synchronisation;
  the C API documents what each CUDA entry point checks on the device.
- Outputs are allocated with ``torch.empty`` where the C API writes every byte; rows the C API
  leaves untouched (past ``expert_offsets[E]``) are uninitialised, except in scale outputs, which
  are zero-filled.
- The CUDA workspace is cached per device (one stream at a time per device, as in inference):
  warm an operation up before capturing it in a CUDA graph so that the capture does not allocate.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from mxmoe import _mxmoe

__all__ = [
    "Error",
    "InvalidArgumentError",
    "PreparedWeights",
    "UnsupportedError",
    "backend_for",
    "dequantize",
    "expert_offsets_from_counts",
    "experts_quantize",
    "grouped_gemm",
    "moe_activation_quantize",
    "moe_add_expert_bias",
    "moe_forward",
    "moe_weighted_sum",
    "prepare_weights",
    "quantize",
    "quantize_weights",
    "route",
    "silu_mul_experts_quantize",
    "swizzle_scales",
    "unswizzle_scales",
]

Error = _mxmoe.Error
InvalidArgumentError = _mxmoe.InvalidArgumentError
UnsupportedError = _mxmoe.UnsupportedError

BLOCK_SIZE = 32
_INT32_MAX = 2**31 - 1
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
_SCALE_LAYOUTS = {
    "linear": _mxmoe.SCALE_LAYOUT_LINEAR,
    "swizzled": _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4,
}
_WEIGHT_FORMATS = {
    "linear": _mxmoe.WEIGHT_FORMAT_LINEAR,
    "swizzled": _mxmoe.WEIGHT_FORMAT_SWIZZLED_128X4,
}
_BACKENDS = {
    "auto": _mxmoe.BACKEND_AUTO,
    "cpu": _mxmoe.BACKEND_CPU,
    "sm90": _mxmoe.BACKEND_SM90,
    "sm100": _mxmoe.BACKEND_SM100,
}


# ---- Errors and argument checks -----------------------------------------------------------------


def _error(cls, status: str, message: str) -> Exception:
    exc = cls(f"{status}: {message}")
    exc.status = status
    exc.message = message
    return exc


def _invalid(message: str) -> Exception:
    return _error(InvalidArgumentError, "INVALID_ARGUMENT", message)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _int_arg(value, name: str) -> int:
    """An integer argument: Python/numpy ints and integer 0-d tensors; 2.7 or True is an error
    (int() would silently make them 2 and 1)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, bool):
        raise _invalid(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise _invalid(f"{name} must be an integer, got {value!r} "
                       f"({type(value).__name__})") from None


def _shape_str(shape) -> str:
    return "[" + ", ".join("*" if d is None else str(int(d)) for d in shape) + "]"


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def _tensor(x, name: str) -> torch.Tensor:
    """A tensor view of x (torch.Tensor, numpy.ndarray or any ``__dlpack__`` object).

    A tensor that requires grad is refused while grad mode is on: the ops have no backward, so
    letting it through would silently give the MoE a zero gradient.
    """
    if isinstance(x, torch.Tensor):
        if x.requires_grad and torch.is_grad_enabled():
            raise _invalid(f"{name} requires grad, but mxmoe ops are inference only (no "
                           f"backward): call under torch.no_grad() or torch.inference_mode(), "
                           f"or pass {name}.detach()")
        t = x.detach() if x.requires_grad else x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    elif hasattr(x, "__dlpack__"):
        try:
            t = torch.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise _invalid(f"{name} ({type(x).__name__}) could not be read through DLPack: "
                           f"{exc}") from None
    else:
        raise _invalid(f"{name} must be a torch.Tensor, numpy.ndarray or an object with "
                       f"__dlpack__, got {type(x).__name__}")
    return t


def _optional_tensor(x, name: str) -> torch.Tensor | None:
    return None if x is None else _tensor(x, name)


def _check(t: torch.Tensor, name: str, layout: str, shape: Sequence[int | None],
           dtypes: Sequence[torch.dtype]) -> None:
    """Rank, shape (None = any extent), dtype and contiguity, in that order."""
    if t.dim() != len(shape):
        raise _invalid(f"{name} must be {len(shape)}-D {layout}, got shape "
                       f"{_shape_str(t.shape)}")
    for want, got in zip(shape, t.shape, strict=True):
        if want is not None and want != got:
            raise _invalid(f"{name} must have shape {_shape_str(shape)} {layout}, got "
                           f"{_shape_str(t.shape)}")
    if t.dtype not in dtypes:
        raise _invalid(f"{name} must have dtype {_dtype_names(dtypes)}, got "
                       f"{str(t.dtype).replace('torch.', '')}")
    if not t.is_contiguous():
        raise _invalid(f"{name} must be contiguous (row-major), got shape {_shape_str(t.shape)} "
                       f"strides {_shape_str(t.stride())}")


def _check_served(t: torch.Tensor, name: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise _error(UnsupportedError, "UNSUPPORTED",
                     f"{name} is on {t.device}; mxmoe serves cpu and cuda tensors")


def _check_same_device(t: torch.Tensor | None, name: str, reference: torch.Tensor,
                       reference_name: str) -> None:
    if t is not None and t.device != reference.device:
        raise _invalid(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def _check_k(k: int, name: str, symbol: str, shape, note: str = "") -> None:
    """K-like dimensions must be whole MXFP4 blocks: "x must have K % 32 == 0, got K=48"."""
    if k % BLOCK_SIZE:
        raise _invalid(f"{name} must have {symbol} % 32 == 0{note}, got {symbol}={k} (shape "
                       f"{_shape_str(shape)})")


def _library(t: torch.Tensor):
    """The op namespace for a call whose first tensor is ``t``: ``torch.ops.mxmoe`` wherever the
    call could be recorded (torch.compile, torch.export, torch.jit.trace, make_fx or any other
    dispatch mode, tensor subclasses), else the same implementations called directly, which
    saves the dispatcher's per-call cost (bench/bench_op_overhead.py)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or type(t) is not torch.Tensor
            or _current_dispatch_mode() is not None):
        return torch.ops.mxmoe
    return _registered_ops.DIRECT


def _scale_layout(scale_layout: str) -> int:
    if scale_layout not in _SCALE_LAYOUTS:
        raise _invalid(f"scale_layout must be 'linear' or 'swizzled', got {scale_layout!r}")
    return _SCALE_LAYOUTS[scale_layout]


def _stream(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


# ---- Workspaces ------------------------------------------------------------------------------

_workspace_lock = threading.Lock()
_workspaces: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor | None:
    """A uint8 buffer of at least nbytes on device.

    CUDA: one cached buffer per device, grown on demand, so steady-state calls (and CUDA-graph
    captures after a warm-up, whatever stream they capture on) allocate nothing. Kernels on one
    device are assumed to run on one stream at a time, as in inference; a buffer replaced by a
    larger one is released stream-ordered by torch's allocator. CPU: a fresh buffer per call
    (cheap, and safe when several Python threads run the CPU backend at once).
    """
    if nbytes == 0:
        return None
    if device.type != "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    with _workspace_lock:
        buffer = _workspaces.get(device)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            _workspaces[device] = buffer
        return buffer


# Workspace sizes depend only on dims, dtypes, formats and the serving backend, never on data:
# remember them per argument signature so steady-state calls make one C API call, not two.
_workspace_sizes: dict[tuple, int] = {}


def _signature(*args) -> tuple:
    parts = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            parts.append((tuple(arg.shape), arg.dtype, arg.device))
        elif isinstance(arg, _mxmoe.MoeOptions):  # sizes depend on its scalars only
            parts.append((arg.activation, arg.routing, arg.num_expert_groups, arg.topk_groups,
                          arg.num_shared_experts, arg.w13_bias is not None,
                          arg.w2_bias is not None))
        else:
            parts.append(arg)
    return tuple(parts)


def _workspace_size(query, *args) -> int:
    key = (query.__name__, _signature(*args))
    size = _workspace_sizes.get(key)
    if size is None:
        size = query(*args)
        if len(_workspace_sizes) > 4096:  # unbounded shapes (e.g. varying T): stay small
            _workspace_sizes.clear()
        _workspace_sizes[key] = size
    return size


def clear_workspace_cache() -> None:
    """Frees the cached workspaces and forgets their sizes (for example after changing
    MXMOE_BACKEND, or before measuring memory)."""
    with _workspace_lock:
        _workspaces.clear()
        _workspace_sizes.clear()


# ---- Backends --------------------------------------------------------------------------------


def backend_for(tensor) -> str:
    """The backend that serves ``tensor``'s device: "cpu", "sm90" or "sm100".

    Raises UnsupportedError when none can (a CUDA device of another architecture, or
    MXMOE_BACKEND naming a backend that cannot serve the device).
    """
    t = _tensor(tensor, "tensor")
    _check_served(t, "tensor")
    if t.device.type == "cpu":
        return _backend_for_device(_mxmoe.DEVICE_CPU, 0)
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _backend_for_device(_mxmoe.DEVICE_CUDA, index)


@torch.compiler.assume_constant_result
def _backend_for_device(device_type: int, index: int) -> str:
    # A property of the machine and MXMOE_BACKEND, constant for a compiled graph's lifetime.
    return _mxmoe.backend_for_device(device_type, index)


# ---- Quantize / dequantize -----------------------------------------------------------------------


def quantize(x, scale_layout: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes rows to MXFP4 (E2M1 codes, one E8M0 scale per 32 elements along the last dim).

    Parameters
    ----------
    x : torch.Tensor
        [..., K] bfloat16 or float16, contiguous, K % 32 == 0. "swizzled" needs [rows, K].
    scale_layout : str
        "linear": scales [..., K/32]; "swizzled": [round_up(rows,128), round_up(K/32,4)]
        (the 128x4 tensor-core layout, padding 0).

    Returns
    -------
    packed : torch.Tensor
        [..., K/2] uint8, element 2i in the low nibble.
    scales : torch.Tensor
        uint8 E8M0 scales in ``scale_layout``.
    """
    layout = _scale_layout(scale_layout)
    x = _tensor(x, "x")
    if layout == _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4:
        _check(x, "x", "[rows, K]", (None, None), _ACTIVATION_DTYPES)
    elif x.dim() == 0:
        raise _invalid("x must be at least 1-D [..., K], got a scalar")
    else:
        _check(x, "x", "[..., K]", (None,) * x.dim(), _ACTIVATION_DTYPES)
    _check_served(x, "x")
    k = x.shape[-1]
    _check_k(k, "x", "K", x.shape)
    lead = x.shape[:-1]
    rows = math.prod(lead)  # not reshape(-1, k): with K = 0 the -1 is ambiguous
    packed, scales = _library(x).quantize(x.reshape(rows, k), layout)
    if layout == _mxmoe.SCALE_LAYOUT_LINEAR:
        return packed.reshape(*lead, k // 2), scales.reshape(*lead, k // 32)
    return packed, scales


def dequantize(packed, scales, scale_layout: str = "linear",
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 -> values: code value * 2^(scale-127) in float32, rounded to ``dtype``.

    Parameters
    ----------
    packed : torch.Tensor
        [..., K/2] uint8 ("swizzled" needs [rows, K/2]).
    scales : torch.Tensor
        "linear": [..., K/32]; "swizzled": [round_up(rows,128), round_up(K/32,4)] uint8.
    dtype : torch.dtype
        bfloat16, float16 or float32.

    Returns
    -------
    torch.Tensor
        [..., K] in ``dtype``. Scale 0xFF gives NaN.
    """
    layout = _scale_layout(scale_layout)
    packed = _tensor(packed, "packed")
    scales = _tensor(scales, "scales")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise _invalid(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if layout == _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4:
        _check(packed, "packed", "[rows, K/2]", (None, None), (torch.uint8,))
    elif packed.dim() == 0:
        raise _invalid("packed must be at least 1-D [..., K/2], got a scalar")
    else:
        _check(packed, "packed", "[..., K/2]", (None,) * packed.dim(), (torch.uint8,))
    _check_served(packed, "packed")
    k = packed.shape[-1] * 2
    _check_k(k, "packed", "K", packed.shape, " (K = 2 * last dim)")
    lead = packed.shape[:-1]
    rows = math.prod(lead)  # Python ints: np.prod would wrap past int64
    if layout == _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4:
        _check(scales, "scales", "[round_up(rows,128), round_up(K/32,4)]",
               (_round_up(rows, 128), _round_up(k // 32, 4)), (torch.uint8,))
    else:
        _check(scales, "scales", "[..., K/32]", (*lead, k // 32), (torch.uint8,))
    _check_same_device(scales, "scales", packed, "packed")
    scales2 = scales if layout == _mxmoe.SCALE_LAYOUT_SWIZZLED_128X4 else scales.reshape(
        rows, k // 32)
    out = _library(packed).dequantize(packed.reshape(rows, k // 2), scales2, layout, dtype)
    return out.reshape(*lead, k)


# ---- Grouped (per-expert) activations ----------------------------------------------------------


def expert_offsets_from_counts(counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert row counts -> grouped-layout offsets.

    Parameters
    ----------
    counts : torch.Tensor or sequence of int
        [E] non-negative row counts.

    Returns
    -------
    expert_offsets : torch.Tensor
        [E+1] int32 cumulative counts (first 0), on ``counts``' device.
    blockscale_offsets : torch.Tensor
        [E+1] int32 cumulative round_up(count, 128).

    Raises InvalidArgumentError for a negative count or offsets beyond int32 (checked for CPU
    tensors and sequences in eager mode; CUDA counts are not read back, which would
    synchronise, nor are counts under torch.compile).
    """
    if isinstance(counts, (torch.Tensor, np.ndarray)):
        counts = _tensor(counts, "counts")
    else:
        counts = torch.as_tensor(list(counts), dtype=torch.int64)
    if counts.dim() != 1:
        raise _invalid(f"counts must be 1-D [E], got shape {_shape_str(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise _invalid(f"counts must have an integer dtype, got {counts.dtype}")
    c = counts.to(torch.int64)
    zero = torch.zeros(1, dtype=torch.int64, device=c.device)
    expert_offsets = torch.cat([zero, torch.cumsum(c, 0)])
    blockscale_offsets = torch.cat([zero, torch.cumsum((c + 127) // 128 * 128, 0)])
    if c.device.type == "cpu" and c.numel() and not torch.compiler.is_compiling():
        # Checked before the int32 cast, which would wrap 2**32 to 0 silently (not under
        # torch.compile, where the values are symbolic; the C API checks the offsets then).
        low = int(c.min())
        if low < 0:
            e = int((c < 0).nonzero()[0])
            raise _invalid(f"counts must be >= 0, got counts[{e}] = {int(c[e])}")
        if int(blockscale_offsets[-1]) > _INT32_MAX:
            raise _invalid(f"counts sum to {int(expert_offsets[-1])} rows "
                           f"({int(blockscale_offsets[-1])} padded scale rows), beyond the int32 "
                           f"offsets of the grouped layout (at most {_INT32_MAX})")
    return expert_offsets.to(torch.int32), blockscale_offsets.to(torch.int32)


def _check_offsets(x: torch.Tensor, expert_offsets, blockscale_offsets):
    expert_offsets = _tensor(expert_offsets, "expert_offsets")
    blockscale_offsets = _tensor(blockscale_offsets, "blockscale_offsets")
    _check(expert_offsets, "expert_offsets", "[E+1]", (None,), (torch.int32,))
    if expert_offsets.shape[0] < 1:
        raise _invalid("expert_offsets must have E+1 >= 1 entries, got shape [0]")
    _check(blockscale_offsets, "blockscale_offsets", "[E+1] (same length as expert_offsets)",
           (expert_offsets.shape[0],), (torch.int32,))
    _check_same_device(expert_offsets, "expert_offsets", x, "x")
    _check_same_device(blockscale_offsets, "blockscale_offsets", x, "x")
    return expert_offsets, blockscale_offsets


def default_scale_rows(rows: int, num_experts: int) -> int:
    """Scale rows the per-expert quantizers allocate by default:
    round_down(rows + 127 * min(rows, E), 128) (format::MaxScaleRows in format.h, the same rule).

    The bound sum(round_up(m_e, 128)) <= rows + 127 * min(rows, E) (at most min(rows, E) experts
    own rows; the sum is a multiple of 128), the same on every device, eager or compiled:
    reading the exact count (blockscale_offsets[E]) would synchronise a GPU and make the output
    shape depend on data, which torch.compile cannot trace. Rows past blockscale_offsets[E] are
    zero. Pass scale_rows=int(blockscale_offsets[-1]) for the exact count.
    """
    return (rows + 127 * min(rows, num_experts)) // 128 * 128


def _scale_rows(scale_rows, rows: int, num_experts: int) -> int:
    """Rows of the scale output, checked before anything is allocated from them: an explicit
    count must not exceed the bound no valid layout exceeds; the default is that bound."""
    bound = default_scale_rows(rows, num_experts)
    if scale_rows is None:
        return bound
    scale_rows = _int_arg(scale_rows, "scale_rows")
    if not 0 <= scale_rows <= bound:
        raise _invalid(f"scale_rows must be in [0, {bound}] (the most scale rows {rows} rows "
                       f"in {num_experts} experts can use), got {scale_rows}")
    return scale_rows


def _experts_quantize(x, expert_offsets, blockscale_offsets, scale_rows, silu_mul: bool):
    x = _tensor(x, "x")
    layout = "[rows, 2*N] (gate | up)" if silu_mul else "[rows, K]"
    _check(x, "x", layout, (None, None), _ACTIVATION_DTYPES)
    _check_served(x, "x")
    rows, cols = x.shape
    if silu_mul:
        if cols % 2:
            raise _invalid(f"x must have an even number of columns {layout}, got shape "
                           f"{_shape_str(x.shape)}")
        width = cols // 2
        _check_k(width, "x", "N", x.shape, " (N = half the columns)")
    else:
        width = cols
        _check_k(width, "x", "K", x.shape)
    expert_offsets, blockscale_offsets = _check_offsets(x, expert_offsets, blockscale_offsets)
    num_experts = expert_offsets.shape[0] - 1
    scale_rows = _scale_rows(scale_rows, rows, num_experts)
    lib = _library(x)
    op = lib.silu_mul_experts_quantize if silu_mul else lib.experts_quantize
    return op(x, expert_offsets, blockscale_offsets, scale_rows)


def experts_quantize(x, expert_offsets, blockscale_offsets,
                     scale_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes rows grouped by expert (vLLM ``mxfp4_experts_quant`` semantics).

    Parameters
    ----------
    x : torch.Tensor
        [rows, K] bfloat16/float16; expert e owns rows [expert_offsets[e], expert_offsets[e+1]).
    expert_offsets : torch.Tensor
        [E+1] int32, 0 first, monotone, last <= rows.
    blockscale_offsets : torch.Tensor
        [E+1] int32, cumulative round_up(m_e, 128) (see ``expert_offsets_from_counts``).
    scale_rows : int, optional
        Rows of the scale output, at most the bound B = ``default_scale_rows(rows, E)`` =
        round_down(rows + 127*min(rows, E), 128) that no valid layout exceeds; default B, which
        needs no data (so no GPU synchronisation, and a shape torch.compile can trace).

    Returns
    -------
    packed : torch.Tensor
        [rows, K/2] uint8 (rows past expert_offsets[E] are uninitialised).
    scales : torch.Tensor
        [scale_rows, round_up(K/32, 4)] uint8; expert e's scales swizzled 128x4 from row
        blockscale_offsets[e]; every other byte 0.
    """
    return _experts_quantize(x, expert_offsets, blockscale_offsets, scale_rows, silu_mul=False)


def silu_mul_experts_quantize(x, expert_offsets, blockscale_offsets,
                              scale_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU-and-mul then per-expert quantization (vLLM ``silu_and_mul_mxfp4_experts_quant``).

    x [rows, 2N] is gate | up; y = silu(gate) * up in float32, rounded to x's dtype, then
    quantized as ``experts_quantize`` does: packed [rows, N/2], scales
    [scale_rows, round_up(N/32, 4)]. N % 32 == 0.
    """
    return _experts_quantize(x, expert_offsets, blockscale_offsets, scale_rows, silu_mul=True)


# ---- Scale layouts -------------------------------------------------------------------------------


def swizzle_scales(s) -> torch.Tensor:
    """LINEAR scales -> SWIZZLED_128X4.

    Parameters
    ----------
    s : torch.Tensor
        [rows, cols] or [batch, rows, cols] uint8 (cols = K/32).

    Returns
    -------
    torch.Tensor
        [round_up(rows,128), round_up(cols,4)] (or batched) uint8, padding 0.
    """
    s = _tensor(s, "s")
    if s.dim() not in (2, 3):
        raise _invalid(f"s must be 2-D [rows, cols] or 3-D [batch, rows, cols], got shape "
                       f"{_shape_str(s.shape)}")
    _check(s, "s", "[batch, rows, cols]" if s.dim() == 3 else "[rows, cols]", (None,) * s.dim(),
           (torch.uint8,))
    _check_served(s, "s")
    s3 = s if s.dim() == 3 else s.unsqueeze(0)
    out = _library(s3).swizzle_scales(s3)
    return out if s.dim() == 3 else out[0]


def unswizzle_scales(s, rows: int, cols: int) -> torch.Tensor:
    """SWIZZLED_128X4 scales -> LINEAR.

    Parameters
    ----------
    s : torch.Tensor
        [round_up(rows,128), round_up(cols,4)] or [batch, ...] uint8.
    rows, cols : int
        The logical scale matrix (cols = K/32).

    Returns
    -------
    torch.Tensor
        [rows, cols] (or [batch, rows, cols]) uint8.
    """
    s = _tensor(s, "s")
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise _invalid(f"rows and cols must be >= 0, got rows={rows} cols={cols}")
    padded = (_round_up(rows, 128), _round_up(cols, 4))
    if s.dim() == 3:
        _check(s, "s", "[batch, round_up(rows,128), round_up(cols,4)]", (None, *padded),
               (torch.uint8,))
    else:
        _check(s, "s", "[round_up(rows,128), round_up(cols,4)]", padded, (torch.uint8,))
    _check_served(s, "s")
    s3 = s if s.dim() == 3 else s.unsqueeze(0)
    out = _library(s3).unswizzle_scales(s3, rows, cols)
    return out if s.dim() == 3 else out[0]


# ---- Expert weights ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """Expert weights in the layout one backend reads fastest (``prepare_weights``).

    ``buffer`` is opaque (uint8 [bytes]); only ``backend`` reads it. Pass it where packed weights
    go, with scales None. Its length travels with it to the C API, which rejects a buffer
    shorter than ``mxmoe_prepare_weights_size`` for (num_experts, n, k, backend).
    """

    buffer: torch.Tensor
    num_experts: int
    n: int
    k: int
    backend: str

    def __post_init__(self):
        if self.backend not in _BACKENDS or self.backend == "auto":
            raise _invalid(f"PreparedWeights.backend must be 'cpu', 'sm90' or 'sm100', got "
                           f"{self.backend!r}")
        for name in ("num_experts", "n", "k"):
            object.__setattr__(self, name, _int_arg(getattr(self, name),
                                                    f"PreparedWeights.{name}"))
        if not isinstance(self.buffer, torch.Tensor):
            raise _invalid(f"PreparedWeights.buffer must be a torch.Tensor, got "
                           f"{type(self.buffer).__name__}")
        _check(self.buffer, "PreparedWeights.buffer", "[bytes]", (None,), (torch.uint8,))

    @property
    def device(self) -> torch.device:
        return self.buffer.device


def quantize_weights(w, scale_layout: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes expert weights along K.

    Parameters
    ----------
    w : torch.Tensor
        [E, N, K] bfloat16/float16, K % 32 == 0.
    scale_layout : str
        "linear": scales [E, N, K/32]; "swizzled": [E, round_up(N,128), round_up(K/32,4)].

    Returns
    -------
    packed : torch.Tensor
        [E, N, K/2] uint8.
    scales : torch.Tensor
        uint8 E8M0 scales in ``scale_layout``.
    """
    layout = _scale_layout(scale_layout)
    w = _tensor(w, "w")
    _check(w, "w", "[E, N, K]", (None, None, None), _ACTIVATION_DTYPES)
    _check_served(w, "w")
    _check_k(w.shape[2], "w", "K", w.shape)
    return _library(w).quantize_weights(w, layout)


def _check_linear_weights(packed, scales, name: str, scales_name: str):
    """Shape, dtype and contiguity of LINEAR weights (the caller checks their device)."""
    packed = _tensor(packed, name)
    _check(packed, name, "[E, N, K/2]", (None, None, None), (torch.uint8,))
    e, n, half_k = packed.shape
    _check_k(half_k * 2, name, "K", packed.shape, " (K = 2 * last dim)")
    if scales is None:
        raise _invalid(f"{scales_name} must not be None for packed (non-prepared) weights")
    scales = _tensor(scales, scales_name)
    _check(scales, scales_name, "[E, N, K/32]", (e, n, half_k * 2 // 32), (torch.uint8,))
    _check_same_device(scales, scales_name, packed, name)
    return packed, scales


def prepare_weights(packed, scales, backend: str | None = None) -> PreparedWeights:
    """Converts LINEAR expert weights into the layout ``backend`` reads fastest, once.

    Parameters
    ----------
    packed : torch.Tensor
        [E, N, K/2] uint8.
    scales : torch.Tensor
        [E, N, K/32] uint8 (LINEAR).
    backend : str, optional
        "cpu", "sm90" or "sm100"; default: the backend serving ``packed``'s device.

    Returns
    -------
    PreparedWeights
    """
    packed, scales = _check_linear_weights(packed, scales, "packed", "scales")
    _check_served(packed, "packed")
    if backend is None or backend == "auto":
        backend = backend_for(packed)
    if backend not in _BACKENDS:
        raise _invalid(f"backend must be one of 'cpu', 'sm90', 'sm100' or None, got {backend!r}")
    e, n, half_k = packed.shape
    buffer = _library(packed).prepare_weights(packed, scales, _BACKENDS[backend])
    return PreparedWeights(buffer, e, n, half_k * 2, backend)


def _weights(packed, scales, name: str, scales_name: str, b_format: str):
    """-> (packed or buffer, scales or None, format code, backend code, E, N, K)."""
    if isinstance(packed, PreparedWeights):
        if scales is not None:
            raise _invalid(f"{scales_name} must be None when {name} is PreparedWeights")
        return (packed.buffer, None, _mxmoe.WEIGHT_FORMAT_PREPARED, _BACKENDS[packed.backend],
                packed.num_experts, packed.n, packed.k)
    if b_format not in _WEIGHT_FORMATS:
        raise _invalid(f"b_format must be 'linear' or 'swizzled', got {b_format!r}")
    if b_format == "linear":
        packed, scales = _check_linear_weights(packed, scales, name, scales_name)
    else:
        packed = _tensor(packed, name)
        _check(packed, name, "[E, N, K/2]", (None, None, None), (torch.uint8,))
        e, n, half_k = packed.shape
        _check_k(half_k * 2, name, "K", packed.shape, " (K = 2 * last dim)")
        if scales is None:
            raise _invalid(f"{scales_name} must not be None for packed weights")
        scales = _tensor(scales, scales_name)
        _check(scales, scales_name, "[E, round_up(N,128), round_up(K/32,4)]",
               (e, _round_up(n, 128), _round_up(half_k * 2 // 32, 4)), (torch.uint8,))
        _check_same_device(scales, scales_name, packed, name)
    e, n, half_k = packed.shape
    return packed, scales, _WEIGHT_FORMATS[b_format], _mxmoe.BACKEND_AUTO, e, n, half_k * 2


# ---- Grouped GEMM --------------------------------------------------------------------------------


def grouped_gemm(a, a_scales, b_packed, b_scales, expert_offsets, blockscale_offsets,
                 problem_sizes=None, out_dtype: torch.dtype = torch.bfloat16,
                 b_format: str = "linear") -> torch.Tensor:
    """Per-expert C = A x B^T on MXFP4 operands (vLLM ``cutlass_mxfp4_moe_mm`` semantics).

    Parameters
    ----------
    a : torch.Tensor
        [rows, K/2] uint8, rows grouped by expert (``experts_quantize`` output).
    a_scales : torch.Tensor
        [a_scale_rows, round_up(K/32, 4)] uint8, expert e's swizzled from blockscale_offsets[e].
    b_packed : torch.Tensor or PreparedWeights
        [E, N, K/2] uint8, or the result of ``prepare_weights`` (then b_scales is None).
    b_scales : torch.Tensor or None
        "linear": [E, N, K/32]; "swizzled": [E, round_up(N,128), round_up(K/32,4)].
    expert_offsets, blockscale_offsets : torch.Tensor
        [E+1] int32 each (see ``experts_quantize``).
    problem_sizes : torch.Tensor, optional
        [E, 3] int32 (m_e, N, K); derived from expert_offsets when None.
    out_dtype : torch.dtype
        bfloat16 or float16.
    b_format : str
        "linear" or "swizzled" (ignored for PreparedWeights).

    Returns
    -------
    torch.Tensor
        [rows, N] ``out_dtype``; rows past expert_offsets[E] are uninitialised.
    """
    a = _tensor(a, "a")
    _check(a, "a", "[rows, K/2]", (None, None), (torch.uint8,))
    _check_served(a, "a")
    if out_dtype not in _ACTIVATION_DTYPES:
        raise _invalid(f"out_dtype must be bfloat16 or float16, got {out_dtype}")
    b, b_s, fmt, backend, e, n, k = _weights(b_packed, b_scales, "b_packed", "b_scales",
                                             b_format)
    _check(a, "a", f"[rows, K/2] (K = {k} from b_packed)", (None, k // 2), (torch.uint8,))
    a_scales = _tensor(a_scales, "a_scales")
    _check(a_scales, "a_scales", "[a_scale_rows, round_up(K/32,4)]",
           (None, _round_up(k // 32, 4)), (torch.uint8,))
    _check_same_device(b, "b_packed", a, "a")
    _check_same_device(a_scales, "a_scales", a, "a")
    expert_offsets = _tensor(expert_offsets, "expert_offsets")
    blockscale_offsets = _tensor(blockscale_offsets, "blockscale_offsets")
    _check(expert_offsets, "expert_offsets", f"[E+1] (E = {e} experts in b_packed)", (e + 1,),
           (torch.int32,))
    _check(blockscale_offsets, "blockscale_offsets", f"[E+1] (E = {e} experts in b_packed)",
           (e + 1,), (torch.int32,))
    _check_same_device(expert_offsets, "expert_offsets", a, "a")
    _check_same_device(blockscale_offsets, "blockscale_offsets", a, "a")
    problem_sizes = _optional_tensor(problem_sizes, "problem_sizes")
    if problem_sizes is not None:
        _check(problem_sizes, "problem_sizes", "[E, 3] (m_e, N, K)", (e, 3), (torch.int32,))
        _check_same_device(problem_sizes, "problem_sizes", a, "a")
    return _library(a).grouped_gemm(a, a_scales, b, b_s, fmt, backend, e, n, k,
                                    expert_offsets, blockscale_offsets, problem_sizes,
                                    out_dtype)


# ---- MoE forward ---------------------------------------------------------------------------------


ACTIVATIONS = {"silu": _mxmoe.ACTIVATION_SILU_AND_MUL,
               "swiglu_oai": _mxmoe.ACTIVATION_SWIGLU_OAI}
ROUTINGS = {"softmax_topk": _mxmoe.ROUTING_SOFTMAX_TOPK,
            "topk_softmax": _mxmoe.ROUTING_TOPK_SOFTMAX,
            "sigmoid_grouped_topk": _mxmoe.ROUTING_SIGMOID_GROUPED_TOPK}
_BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _choice(value: str, name: str, table: dict) -> int:
    if value not in table:
        raise _invalid(f"{name} must be one of {', '.join(repr(k) for k in table)}, got "
                       f"{value!r}")
    return table[value]


def _moe_options(hidden, e: int, i: int, global_experts: int, activation: str,
                 swiglu_alpha: float, swiglu_limit: float, w13_bias, w2_bias, routing: str,
                 num_expert_groups: int, topk_groups: int, routed_scaling_factor: float,
                 e_score_correction_bias, num_shared_experts: int) -> tuple:
    """The model options in the order of the ``moe_forward`` op's trailing arguments (enum codes,
    floats, ints and the bias tensors; the C layer checks their values)."""
    h = hidden.shape[1]
    biases = []
    for name, bias, shape, desc in (("w13_bias", w13_bias, (e, 2 * i), "[E_local, 2I]"),
                                    ("w2_bias", w2_bias, (e, h), "[E_local, H]"),
                                    ("e_score_correction_bias", e_score_correction_bias,
                                     (global_experts,), "[E_global]")):
        bias = _optional_tensor(bias, name)
        if bias is not None:
            _check(bias, name, desc, shape, _BIAS_DTYPES)
            _check_same_device(bias, name, hidden, "hidden")
        biases.append(bias)
    return (_choice(activation, "activation", ACTIVATIONS), float(swiglu_alpha),
            float(swiglu_limit), biases[0], biases[1], _choice(routing, "routing", ROUTINGS),
            _int_arg(num_expert_groups, "num_expert_groups"), _int_arg(topk_groups, "topk_groups"),
            float(routed_scaling_factor), biases[2],
            _int_arg(num_shared_experts, "num_shared_experts"))


def _make_moe_options(activation: int, swiglu_alpha: float, swiglu_limit: float, w13_bias,
                      w2_bias, routing: int, num_expert_groups: int, topk_groups: int,
                      routed_scaling_factor: float, e_score_correction_bias,
                      num_shared_experts: int):
    """The extension's MoeOptions from the op's trailing arguments."""
    options = _mxmoe.MoeOptions()
    options.activation = activation
    options.swiglu_alpha = swiglu_alpha
    options.swiglu_limit = swiglu_limit
    options.routing = routing
    options.num_expert_groups = num_expert_groups
    options.topk_groups = topk_groups
    options.routed_scaling_factor = routed_scaling_factor
    options.num_shared_experts = num_shared_experts
    for name, bias in (("w13_bias", w13_bias), ("w2_bias", w2_bias),
                       ("e_score_correction_bias", e_score_correction_bias)):
        if bias is not None:
            setattr(options, name, bias)
    return options


def moe_forward(hidden, w13_packed, w13_scales, w2_packed, w2_scales, router_logits=None,
                top_k: int | None = None, renormalize: bool = True, topk_ids=None,
                topk_weights=None, expert_map=None, *, activation: str = "silu",
                swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, w13_bias=None,
                w2_bias=None, routing: str = "softmax_topk", num_expert_groups: int = 0,
                topk_groups: int = 0, routed_scaling_factor: float = 1.0,
                e_score_correction_bias=None, num_shared_experts: int = 0) -> torch.Tensor:
    """The whole MoE layer: route, quantize, GEMM1, activation, GEMM2, weighted sum.

    The exact arithmetic (rounding points, summation orders) is docs/format.md's "MoE forward";
    ``mxmoe.reference.moe_forward`` is the same computation in torch.

    Parameters
    ----------
    hidden : torch.Tensor
        [T, H] bfloat16/float16, H % 32 == 0.
    w13_packed, w13_scales : torch.Tensor
        [E, 2I, H/2] uint8 and [E, 2I, H/32] uint8 (rows [0, I) gate, [I, 2I) up), or
        PreparedWeights and None.
    w2_packed, w2_scales : torch.Tensor
        [E, H, I/2] and [E, H, I/32] uint8, or PreparedWeights and None. I % 32 == 0.
    router_logits : torch.Tensor, optional
        [T, E_global] float32/bfloat16/float16: softmax, top-k (ties to the lower id),
        optional renormalisation. Exclusive with topk_ids/topk_weights.
    top_k : int, optional
        Experts per token (router_logits path).
    renormalize : bool
        Renormalise the top-k weights to sum 1 (router_logits path).
    topk_ids, topk_weights : torch.Tensor, optional
        [T, top_k] int32 or int64 global expert ids and [T, top_k] float32, bfloat16 or float16
        weights (int64 and 16-bit weights cost one conversion of T*top_k elements).
    expert_map : torch.Tensor, optional
        [E_global] int32, global -> local routed expert id, -1 = not on this device
        (contributes 0).
    activation : str
        "silu" (silu(gate) * up) or "swiglu_oai" (GPT-OSS: clamped at ``swiglu_limit``,
        sigmoid(``swiglu_alpha`` * gate), times up + 1).
    w13_bias, w2_bias : torch.Tensor, optional
        [E, 2I] (gate | up) and [E, H], bfloat16/float16/float32: added in float32 to the
        rounded GEMM outputs and rounded to the activation dtype again.
    routing : str
        "softmax_topk", "topk_softmax" (GPT-OSS) or "sigmoid_grouped_topk" (DeepSeek-V3, with
        ``num_expert_groups``, ``topk_groups`` and ``e_score_correction_bias`` [E_global]).
    routed_scaling_factor : float
        Multiplies the routed weights (router_logits path only).
    num_shared_experts : int
        The last ``num_shared_experts`` of the E weight experts are used by every token with
        weight 1 (E_global = E - num_shared_experts without expert_map).

    Returns
    -------
    torch.Tensor
        [T, H] in hidden's dtype.
    """
    hidden = _tensor(hidden, "hidden")
    _check(hidden, "hidden", "[T, H]", (None, None), _ACTIVATION_DTYPES)
    _check_served(hidden, "hidden")
    t, h = hidden.shape
    _check_k(h, "hidden", "H", hidden.shape)
    prepared = isinstance(w13_packed, PreparedWeights)
    if prepared != isinstance(w2_packed, PreparedWeights):
        raise _invalid("w13_packed and w2_packed must both be PreparedWeights or both tensors")
    w13, w13_s, fmt, backend, e, two_i, h13 = _weights(w13_packed, w13_scales, "w13_packed",
                                                       "w13_scales", "linear")
    w2, w2_s, _, backend2, e2, h2, i = _weights(w2_packed, w2_scales, "w2_packed", "w2_scales",
                                                "linear")
    if prepared and backend != backend2:
        raise _invalid(f"w13_packed and w2_packed were prepared for different backends "
                       f"({w13_packed.backend} vs {w2_packed.backend})")
    if h13 != h:
        raise _invalid(f"w13_packed must have K = H = {h} (hidden [T, H]); got K={h13} "
                       f"(w13 [E, 2I, H/2])")
    if two_i != 2 * i:
        raise _invalid(f"w13_packed must have 2*I = {2 * i} rows (I = {i} from w2_packed "
                       f"[E, H, I/2]), got {two_i}")
    if e2 != e or h2 != h:
        raise _invalid(f"w2_packed must be [E, H, I/2] with E = {e} (from w13_packed) and "
                       f"H = {h}, got E={e2} H={h2}")
    _check_same_device(w13, "w13_packed", hidden, "hidden")
    _check_same_device(w2, "w2_packed", hidden, "hidden")

    router_logits = _optional_tensor(router_logits, "router_logits")
    topk_ids = _optional_tensor(topk_ids, "topk_ids")
    topk_weights = _optional_tensor(topk_weights, "topk_weights")
    expert_map = _optional_tensor(expert_map, "expert_map")
    if expert_map is not None:
        _check(expert_map, "expert_map", "[E_global]", (None,), (torch.int32,))
        _check_same_device(expert_map, "expert_map", hidden, "hidden")
    if router_logits is not None:
        if topk_ids is not None or topk_weights is not None:
            raise _invalid("pass either router_logits or topk_ids/topk_weights, not both")
        global_experts = (expert_map.shape[0] if expert_map is not None
                          else e - int(num_shared_experts))
        _check(router_logits, "router_logits",
               "[T, E_global]" + (" (E_global = len(expert_map))" if expert_map is not None
                                  else " (E_global = E of w13_packed without expert_map)"),
               (t, global_experts), (torch.float32, torch.bfloat16, torch.float16))
        _check_same_device(router_logits, "router_logits", hidden, "hidden")
        if top_k is None:
            raise _invalid("top_k must be given with router_logits")
        top_k = _int_arg(top_k, "top_k")
        if not 1 <= top_k <= global_experts:
            raise _invalid(f"top_k must be in [1, {global_experts}] (E_global), got {top_k}")
    else:
        if topk_ids is None or topk_weights is None:
            raise _invalid("pass router_logits (with top_k) or both topk_ids and topk_weights")
        _check(topk_ids, "topk_ids", "[T, top_k]", (t, None), (torch.int32, torch.int64))
        if top_k is not None and _int_arg(top_k, "top_k") != topk_ids.shape[1]:
            raise _invalid(f"top_k={top_k} disagrees with topk_ids [T, top_k] of shape "
                           f"{_shape_str(topk_ids.shape)}")
        top_k = topk_ids.shape[1]
        _check(topk_weights, "topk_weights", "[T, top_k]", (t, top_k),
               (torch.float32, torch.bfloat16, torch.float16))
        _check_same_device(topk_ids, "topk_ids", hidden, "hidden")
        _check_same_device(topk_weights, "topk_weights", hidden, "hidden")
        # torch.topk's int64 ids and bf16/fp16 weights: one small conversion each (T*top_k
        # elements), exact for weights; an id outside int32 is out of range anyway and wraps
        # (then the C API's id check applies to the wrapped value).
        topk_ids = topk_ids.to(torch.int32)
        topk_weights = topk_weights.to(torch.float32)
        global_experts = (expert_map.shape[0] if expert_map is not None
                          else e - int(num_shared_experts))
    if expert_map is None and global_experts != e - int(num_shared_experts):
        raise _invalid(f"router width E_global = {global_experts} differs from the {e} local "
                       f"experts; pass expert_map [E_global]")
    if global_experts < 1:
        raise _invalid(f"num_shared_experts must be in [0, {e - 1}] (E = {e} weight experts), "
                       f"got {num_shared_experts}")
    options = _moe_options(hidden, e, i, global_experts, activation, swiglu_alpha, swiglu_limit,
                           w13_bias, w2_bias, routing, num_expert_groups, topk_groups,
                           routed_scaling_factor, e_score_correction_bias, num_shared_experts)

    return _library(hidden).moe_forward(hidden, w13, w13_s, w2, w2_s, fmt, backend, e, i,
                                        global_experts, top_k, bool(renormalize),
                                        router_logits, topk_ids, topk_weights, expert_map,
                                        *options)


# ---- Stages of the MoE forward, for callers that split it (expert parallelism) -------------------
#
# moe_forward == route -> (per expert) experts_quantize -> grouped_gemm -> moe_activation_quantize
# -> grouped_gemm -> moe_add_expert_bias -> moe_weighted_sum, bit for bit on the CPU backend
# (tests/python/test_moe_models.py checks it). route, the activation with biases and the reduce
# are written in torch from the contract (mxmoe.reference), so they give the same bits on every
# device; the GEMMs and quantizers are the C entry points.


def route(router_logits, top_k: int, renormalize: bool = True, routing: str = "softmax_topk",
          num_expert_groups: int = 0, topk_groups: int = 0, routed_scaling_factor: float = 1.0,
          e_score_correction_bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of ``moe_forward`` on its own: the same ids and weights, bit for bit.

    router_logits [T, E] float32/bfloat16/float16; the other arguments as in ``moe_forward``.
    Returns (topk_ids int32 [T, top_k], topk_weights float32 [T, top_k]) on the logits' device.
    """
    from mxmoe import reference  # pure torch; no import cycle at module load

    router_logits = _tensor(router_logits, "router_logits")
    _check(router_logits, "router_logits", "[T, E]", (None, None),
           (torch.float32, torch.bfloat16, torch.float16))
    e = router_logits.shape[1]
    _choice(routing, "routing", ROUTINGS)
    top_k = int(top_k)
    groups = int(num_expert_groups) or 1
    kept = int(topk_groups) or groups
    if routing != "sigmoid_grouped_topk" and (groups != 1 or kept != 1):
        raise _invalid(f"num_expert_groups/topk_groups apply to routing='sigmoid_grouped_topk' "
                       f"only, got {num_expert_groups}/{topk_groups} with {routing!r}")
    if groups < 1 or e % groups:
        raise _invalid(f"num_expert_groups must be 0 or a divisor of E = {e}, got "
                       f"{num_expert_groups}")
    if not 1 <= kept <= groups:
        raise _invalid(f"topk_groups must be in [0, num_expert_groups = {groups}], got "
                       f"{topk_groups}")
    if not 1 <= top_k <= kept * (e // groups):
        raise _invalid(f"top_k must be in [1, {kept * (e // groups)}] (the experts of the kept "
                       f"groups), got {top_k}")
    factor = float(routed_scaling_factor)
    if not (factor == 0.0 or (factor > 0.0 and np.isfinite(factor))):
        raise _invalid(f"routed_scaling_factor must be > 0 and finite, or 0 (= 1), got {factor}")
    bias = _optional_tensor(e_score_correction_bias, "e_score_correction_bias")
    if bias is not None:
        if routing != "sigmoid_grouped_topk":
            raise _invalid("e_score_correction_bias applies to routing='sigmoid_grouped_topk' "
                           "only")
        _check(bias, "e_score_correction_bias", "[E]", (e,), _BIAS_DTYPES)
        _check_same_device(bias, "e_score_correction_bias", router_logits, "router_logits")
    return reference.route(router_logits, top_k, bool(renormalize), routing, groups, kept,
                           factor, bias)


def _rows_expert_bias(bias: torch.Tensor, expert_offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """bias [E, N] -> [rows, N]: each row gets its expert's bias (rows past the last offset 0)."""
    counts = (expert_offsets[1:] - expert_offsets[:-1]).to(torch.int64)
    expanded = torch.repeat_interleave(bias, counts, dim=0)
    if expanded.shape[0] < rows:
        pad = torch.zeros(rows - expanded.shape[0], bias.shape[1], dtype=bias.dtype,
                          device=bias.device)
        expanded = torch.cat([expanded, pad])
    return expanded


def moe_activation_quantize(x, expert_offsets, blockscale_offsets, activation: str = "silu",
                            swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                            w13_bias=None,
                            scale_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 6 of ``moe_forward``: (+ w13_bias) -> activation -> per-expert quantization.

    x [rows, 2I] bfloat16/float16 (GEMM1 output, gate | up, rows grouped by expert);
    w13_bias [E, 2I] (optional, any float dtype); returns what ``experts_quantize`` returns for
    the [rows, I] activation. Without a bias, "silu" runs the C ``silu_mul_experts_quantize``;
    otherwise the activation is computed in torch exactly as the contract says (the bits of the
    C backends) and quantized by the C ``experts_quantize``.
    """
    from mxmoe import reference

    _choice(activation, "activation", ACTIVATIONS)
    if activation == "swiglu_oai" and not (float(swiglu_limit) > 0):
        raise _invalid(f"swiglu_limit must be > 0, got {swiglu_limit}")
    if activation == "swiglu_oai" and not np.isfinite(float(swiglu_alpha)):
        raise _invalid(f"swiglu_alpha must be finite, got {swiglu_alpha}")
    bias = _optional_tensor(w13_bias, "w13_bias")
    if activation == "silu" and bias is None:
        return silu_mul_experts_quantize(x, expert_offsets, blockscale_offsets, scale_rows)
    x = _tensor(x, "x")
    _check(x, "x", "[rows, 2I] (gate | up)", (None, None), _ACTIVATION_DTYPES)
    expert_offsets, blockscale_offsets = _check_offsets(x, expert_offsets, blockscale_offsets)
    rows_bias = None
    if bias is not None:
        _check(bias, "w13_bias", "[E, 2I]", (expert_offsets.shape[0] - 1, x.shape[1]),
               _BIAS_DTYPES)
        _check_same_device(bias, "w13_bias", x, "x")
        rows_bias = _rows_expert_bias(bias, expert_offsets, x.shape[0])
    y = reference.activation(x, activation, float(swiglu_alpha), float(swiglu_limit), rows_bias)
    return experts_quantize(y, expert_offsets, blockscale_offsets, scale_rows)


def moe_add_expert_bias(y, expert_offsets, bias) -> torch.Tensor:
    """y [rows, H] bfloat16/float16 (GEMM2 output, rows grouped by expert) + bias [E, H]:
    added in float32 and rounded to y's dtype, as ``moe_forward`` does before its reduce."""
    y = _tensor(y, "y")
    _check(y, "y", "[rows, H]", (None, None), _ACTIVATION_DTYPES)
    expert_offsets = _tensor(expert_offsets, "expert_offsets")
    bias = _tensor(bias, "bias")
    _check(bias, "bias", "[E, H]", (expert_offsets.shape[0] - 1, y.shape[1]), _BIAS_DTYPES)
    rows_bias = _rows_expert_bias(bias, expert_offsets, y.shape[0])
    return (y.to(torch.float32) + rows_bias.to(torch.float32)).to(y.dtype)


def moe_weighted_sum(expert_outputs, weights, valid=None) -> torch.Tensor:
    """The reduce of ``moe_forward``: expert_outputs [T, P, H] bfloat16/float16 (slot s of
    token t; routed slots in top-k order, then shared experts with weight 1, biases added),
    weights [T, P] float32, valid [T, P] bool (False = the slot contributes nothing) ->
    [T, H]: acc = +0; acc = acc + w_s * y_s for s in order, every product and sum rounded to
    float32; rounded once to the outputs' dtype."""
    from mxmoe import reference

    expert_outputs = _tensor(expert_outputs, "expert_outputs")
    _check(expert_outputs, "expert_outputs", "[T, P, H]", (None, None, None), _ACTIVATION_DTYPES)
    t, p, _ = expert_outputs.shape
    weights = _tensor(weights, "weights")
    _check(weights, "weights", "[T, P]", (t, p), (torch.float32,))
    valid = _optional_tensor(valid, "valid")
    if valid is not None:
        _check(valid, "valid", "[T, P]", (t, p), (torch.bool,))
    return reference.weighted_sum(expert_outputs, weights, valid).to(expert_outputs.dtype)


# The custom ops' implementations use this module's workspace cache and stream helpers.
from mxmoe import library as _registered_ops  # noqa: E402, F401
