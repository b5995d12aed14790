"""Argument checks shared by the public API (private module).

Each helper raises ``ValueError``/``TypeError`` (or :class:`~dreamood.errors.NonFiniteError`) with a
message that names the argument, so errors surface at the boundary instead of deep inside torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dreamood.errors import NonFiniteError


def as_tensor(value: Any, name: str, *, dtype: torch.dtype | None = None) -> Tensor:
    """Convert a tensor, NumPy array or nested sequence to a tensor; raise ``TypeError`` otherwise."""
    if isinstance(value, Tensor):
        return value if dtype is None else value.to(dtype)
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"{name} must be a numeric array, got a NumPy array of dtype object")
            array = value if value.flags.c_contiguous else np.ascontiguousarray(value)
            tensor = torch.from_numpy(array.copy() if not array.flags.writeable else array)
        else:
            tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a tensor or an array, got {type(value).__name__}") from error
    return tensor if dtype is None else tensor.to(dtype)


def check_rank(tensor: Tensor, rank: int, name: str, shape_hint: str = "") -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``rank`` dimensions."""
    if tensor.dim() != rank:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must be a {rank}-D tensor{hint}, got shape {tuple(tensor.shape)}")


def check_floating(tensor: Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``tensor`` has a floating-point dtype."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {tensor.dtype}")


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` naming how many NaN and infinite entries ``tensor`` holds."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise NonFiniteError(f"{name} contains {n_nan} NaN and {n_inf} infinite value(s) out of {tensor.numel()}")


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (or >= 0 with ``allow_zero``).

    A value that is not a real number (a string, ``None``, a bool) raises ``TypeError`` naming ``name``.
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    ok = number >= 0 if allow_zero else number > 0
    if not ok or not math.isfinite(number):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_positive_int(value: int, name: str, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_choice(value: str, choices: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_class_names(class_names: Sequence[str], name: str = "class_names") -> list[str]:
    """Return ``class_names`` as a list; reject an empty list, non-strings, empty strings and duplicates."""
    if isinstance(class_names, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError(f"{name} is empty: at least one class name is needed")
    seen: dict[str, int] = {}
    for index, class_name in enumerate(names):
        if not isinstance(class_name, str):
            raise TypeError(f"{name}[{index}] must be a string, got {type(class_name).__name__}")
        if not class_name.strip():
            raise ValueError(f"{name}[{index}] is an empty string")
        if class_name in seen:
            raise ValueError(f"{name} has a duplicate: {class_name!r} at positions {seen[class_name]} and {index}")
        seen[class_name] = index
    return names


def check_size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Return an image size given as an int or a ``(height, width)`` pair as a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    for side in pair:
        check_positive_int(side, name)
    return int(pair[0]), int(pair[1])
