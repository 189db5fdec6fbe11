"""mxmoe: MXFP4 (W4A4) Mixture-of-Experts kernels for CPU, Hopper (sm90) and Blackwell (sm100).

    import mxmoe
    layer = mxmoe.MoELayer.from_float(w13, w2)          # [E, 2I, H], [E, H, I] bf16
    out = layer(hidden_states, router_logits, top_k=4)   # [T, H] bf16
    mxmoe.backend_for(hidden_states)                     # "cpu" | "sm90" | "sm100"

``mxmoe.ops`` has a torch function per C API entry point; ``mxmoe.reference`` a pure-torch
reference of the data contract.
"""

from mxmoe import checkpoint, ops, reference
from mxmoe._mxmoe import (
    CudaError,
    Error,
    InternalError,
    InvalidArgumentError,
    MisalignedError,
    UnsupportedError,
    WorkspaceTooSmallError,
)
from mxmoe.moe import MoELayer
from mxmoe.ops import PreparedWeights, backend_for, prepare_weights, quantize_weights

__version__ = "0.1.0"


def version() -> str:
    """Version of the loaded C library ("MAJOR.MINOR.PATCH")."""
    from mxmoe import _mxmoe

    return _mxmoe.version()


def cuda_device_count() -> int:
    """CUDA devices visible to the C library (0 without a GPU or driver)."""
    from mxmoe import _mxmoe

    return _mxmoe.cuda_device_count()


__all__ = [
    "CudaError",
    "Error",
    "InternalError",
    "InvalidArgumentError",
    "MisalignedError",
    "MoELayer",
    "PreparedWeights",
    "UnsupportedError",
    "WorkspaceTooSmallError",
    "backend_for",
    "checkpoint",
    "cuda_device_count",
    "ops",
    "prepare_weights",
    "quantize_weights",
    "reference",
    "version",
]
