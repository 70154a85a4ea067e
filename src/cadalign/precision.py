"""Precision of the forward passes, decided in one place for training and realignment.

Mixed precision (autocast) runs on CUDA only: bfloat16 by default, float16 for GPUs without
bfloat16 (training adds a GradScaler then). On the CPU everything runs in float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

AmpDtype = Literal["bfloat16", "float16"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(device: torch.device | str, amp: bool, amp_dtype: AmpDtype = "bfloat16") -> torch.dtype | None:
    """The autocast dtype of forward passes on ``device``.

    Args:
        device: where the model runs.
        amp: mixed precision wanted (``train.optim.amp``, ``realign.window.amp``).
        amp_dtype: "bfloat16" or "float16".

    Returns:
        The dtype on CUDA with ``amp``; None (plain float32) otherwise.

    Raises:
        ValueError: for another ``amp_dtype``.
    """
    if amp_dtype not in _DTYPES:
        raise ValueError(f"amp_dtype={amp_dtype!r} must be one of {sorted(_DTYPES)}")
    if not amp or torch.device(device).type != "cuda":
        return None
    return _DTYPES[amp_dtype]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for forward passes on ``device``; a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
