"""Mixed precision for the training loops: the autocast dtype of an ``amp`` setting, the context and the scaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["AMP_NAMES", "autocast", "autocast_dtype", "grad_scaler"]

AMP_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""The names an ``amp`` setting may take, and their autocast dtypes."""


def autocast_dtype(amp: torch.dtype | str | None, name: str = "amp") -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting.

    Args:
        amp: ``None`` (full precision), ``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` or ``torch.float16`` /
            ``"fp16"`` / ``"float16"``.
        name: The argument's name in the error message.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None``.

    Raises:
        ValueError: ``amp`` is anything else.
    """
    if amp is None:
        return None
    if isinstance(amp, torch.dtype) and amp in AMP_NAMES.values():
        return amp
    if isinstance(amp, str) and amp in AMP_NAMES:
        return AMP_NAMES[amp]
    raise ValueError(f"{name} must be None, torch.bfloat16, torch.float16, 'bf16' or 'fp16', got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """``torch.autocast`` on ``device`` in ``dtype``, or a context that changes nothing when ``dtype`` is ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler of a run in ``dtype``: active for float16 only (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
