"""Small helpers shared across dreamood (private module): devices, progress bars, seeds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")

DeviceLike = str | torch.device | None


def resolve_device(device: DeviceLike = None) -> torch.device:
    """Turn ``None``/``"auto"`` into CUDA when available (else CPU) and check any other device exists.

    Raises:
        ValueError: ``device`` is not a device name torch knows, or names a CUDA device this machine lacks.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    return resolved


def progress(
    iterable: Iterable[T],
    *,
    enabled: bool = True,
    desc: str | None = None,
    total: int | None = None,
    leave: bool = False,
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar unless ``enabled`` is false."""
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True)


def make_generator(seed: int | None, device: DeviceLike = "cpu") -> torch.Generator | None:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``, or ``None`` when ``seed`` is ``None``."""
    if seed is None:
        return None
    generator = torch.Generator(device=resolve_device(device))
    generator.manual_seed(int(seed))
    return generator
