"""swizzle_scales / unswizzle_scales (CPU backend) against the contract's offset formula."""

import pytest
import torch

from mxmoe import ops, reference


def random_scales(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 90), (128, 4), (129, 5), (300, 90), (0, 3),
                                       (255, 7)])
def test_swizzle_2d(rows, cols):
    s = random_scales((rows, cols), seed=rows * 97 + cols)
    out = ops.swizzle_scales(s)
    want = reference.swizzle_scales(s)
    assert out.shape == want.shape, f"{rows=} {cols=}"
    assert torch.equal(out, want), f"{rows=} {cols=}"
    assert torch.equal(ops.unswizzle_scales(out, rows, cols), s), f"{rows=} {cols=}"


@pytest.mark.parametrize("batch,rows,cols", [(1, 5, 3), (3, 129, 90), (256, 2, 1), (0, 4, 4)])
def test_swizzle_batched(batch, rows, cols):
    s = random_scales((batch, rows, cols), seed=batch + rows + cols)
    out = ops.swizzle_scales(s)
    assert out.shape == (batch, reference._round_up(rows, 128), reference._round_up(cols, 4))
    assert torch.equal(out, reference.swizzle_scales(s)), f"{batch=} {rows=} {cols=}"
    assert torch.equal(ops.unswizzle_scales(out, rows, cols), s)


def test_padding_is_zero_and_unswizzle_ignores_it():
    s = torch.full((3, 5), 0x7F, dtype=torch.uint8)
    out = ops.swizzle_scales(s)
    offsets = reference.swizzled_offsets(3, 5).reshape(-1)
    mask = torch.zeros(out.numel(), dtype=torch.bool)
    mask[offsets] = True
    assert bool((out.reshape(-1)[~mask] == 0).all())
    noisy = out.clone().reshape(-1)
    noisy[~mask] = 0xEE
    assert torch.equal(ops.unswizzle_scales(noisy.reshape(out.shape), 3, 5), s)


def test_offset_formula_spot_values():
    # Hand-evaluated: (m/128 * numKTiles + k/4) * 512 + (m%32)*16 + ((m/32)%4)*4 + k%4.
    off = reference.swizzled_offsets(300, 90)  # numKTiles = 23
    assert off[0, 0] == 0
    assert off[1, 0] == 16
    assert off[32, 0] == 4
    assert off[0, 5] == 512 + 1
    assert off[129, 6] == (1 * 23 + 1) * 512 + 1 * 16 + 0 + 2
    assert off[299, 89] == (2 * 23 + 22) * 512 + (299 % 32) * 16 + ((299 // 32) % 4) * 4 + 1
