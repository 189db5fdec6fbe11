"""mxmoe.ops's tensor checks and the C layer's (cc/include/mxmoe/dlpack.h) say the same thing.

Why Python checks at all: under torch.compile / torch.export the wrappers run on FakeTensors,
which never reach the C layer (no data, no DLPack export), and the wrappers reshape their
arguments before the call (a reshape would silently copy a non-contiguous tensor the C layer
then accepts). So ``ops._check`` restates ``dlpack::CheckTensor``'s rules; this file keeps the
two from drifting apart. For each bad tensor, the message mxmoe.ops raises equals the
extension's message on the same tensor, up to two naming differences: the extension names a
quantizer's input "input" where mxmoe.ops uses its signature's name, and it describes a row
layout as [rows, k/32] where mxmoe.ops, which takes leading dimensions, says [..., K/32].
"""

import pytest
import torch
from expectations import expect_error

from mxmoe import _mxmoe, ops


def c_message(fn, name: str | None = None) -> str:
    """The extension's message, in mxmoe.ops's words (see the module doc)."""
    with pytest.raises(Exception) as info:
        fn()
    message = f"{type(info.value).__name__}: {info.value}"
    if name is not None:
        message = message.replace("input ", f"{name} ")
    return message.replace("[rows, k/32]", "[..., K/32]")


def py_message(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    return f"{type(info.value).__name__}: {info.value}"


BF16 = torch.bfloat16
BAD_X = {
    "dtype": torch.randn(4, 64),
    "contiguity": torch.randn(4, 128).to(BF16)[:, ::2],
}


@pytest.mark.parametrize("case", sorted(BAD_X))
def test_quantize_input(case):
    x = BAD_X[case]
    packed = torch.empty(4, 32, dtype=torch.uint8)
    scales = torch.empty(4, 2, dtype=torch.uint8)
    want = c_message(lambda: _mxmoe.quantize(x, packed, scales, 0, 0), "x")
    assert py_message(lambda: ops.quantize(x)) == want


@pytest.mark.parametrize("case", sorted(BAD_X))
def test_experts_quantize_input(case):
    x = BAD_X[case]
    eo, bso = ops.expert_offsets_from_counts([4])
    packed = torch.empty(4, 32, dtype=torch.uint8)
    scales = torch.zeros(128, 4, dtype=torch.uint8)
    want = c_message(lambda: _mxmoe.experts_quantize(x, eo, bso, packed, scales, 0), "x")
    assert py_message(lambda: ops.experts_quantize(x, eo, bso)) == want


def test_dequantize_packed_dtype_and_scales_shape():
    out = torch.empty(4, 64, dtype=BF16)
    scales = torch.zeros(4, 2, dtype=torch.uint8)
    packed = torch.zeros(4, 32, dtype=torch.int8)
    want = c_message(lambda: _mxmoe.dequantize(packed, scales, 0, out, 0))
    assert py_message(lambda: ops.dequantize(packed, scales)) == want
    packed = torch.zeros(4, 32, dtype=torch.uint8)
    scales = torch.zeros(4, 3, dtype=torch.uint8)
    want = c_message(lambda: _mxmoe.dequantize(packed, scales, 0, out, 0))
    assert py_message(lambda: ops.dequantize(packed, scales)) == want


def test_the_messages_name_the_argument():
    # The agreement above is not vacuous: both name the argument and the value.
    expect_error(lambda: ops.quantize(BAD_X["dtype"]), "x must have dtype", "got float32")
