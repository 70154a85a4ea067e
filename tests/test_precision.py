"""Tests of cadalign.precision: one rule for the autocast of training and realignment."""

from __future__ import annotations

import pytest
import torch

from cadalign.precision import autocast, autocast_dtype


@pytest.mark.parametrize(
    ("device", "amp", "amp_dtype", "expected"),
    [
        ("cpu", True, "bfloat16", None),  # the CPU always runs float32
        (torch.device("cpu"), True, "float16", None),
        ("cuda", True, "bfloat16", torch.bfloat16),
        (torch.device("cuda", 0), True, "float16", torch.float16),
        ("cuda", False, "bfloat16", None),
    ],
)
def test_autocast_dtype(device: str | torch.device, amp: bool, amp_dtype: str, expected: torch.dtype | None) -> None:
    assert autocast_dtype(device, amp, amp_dtype) is expected


def test_autocast_dtype_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="amp_dtype='float8'.*bfloat16"):
        autocast_dtype("cuda", True, "float8")


def test_autocast_context_sets_the_matmul_dtype() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", None):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", torch.bfloat16):  # CPU autocast exists; the rule above never asks for it
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32
