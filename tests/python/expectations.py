"""Shared helpers of the mxmoe pytest suites: error expectations, poisoned outputs, metrics."""

from __future__ import annotations

import pytest
import torch

import mxmoe
from mxmoe.measure import rel_l2  # noqa: F401  (the one error measure, re-exported for tests)

POISON = 0xAB  # a byte no correct output is expected to be everywhere


def expect_error(fn, *fragments: str, error=mxmoe.InvalidArgumentError) -> str:
    """Runs fn, expects ``error``, and checks that every fragment is in its message."""
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in the message {message!r}"
    return message


def poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose every byte is POISON (for outputs that must stay untouched)."""
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(POISON) if t.numel() else None
    return t


def assert_untouched(t: torch.Tensor, name: str) -> None:
    assert bool((t.view(torch.uint8) == POISON).all()), f"{name} was written by a failed call"


def random_activations(shape, seed: int, dtype: torch.dtype = torch.bfloat16,
                       scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def random_expert_counts(num_experts: int, total: int, seed: int,
                         zero_experts=(), one_row_experts=()) -> list[int]:
    """Row counts per expert summing to about ``total``, with chosen empty and 1-row experts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(num_experts), total, replacement=True,
                               generator=g).bincount(minlength=num_experts).tolist()
    for e in zero_experts:
        counts[e] = 0
    for e in one_row_experts:
        counts[e] = 1
    return counts
