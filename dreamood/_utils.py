"""Small helpers shared across dreamood (private module): devices, progress bars, seeds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")

DeviceLike = str | torch.device | None


def resolve_device(device: DeviceLike = None) -> torch.device:
    """Turn ``None``/``"auto"`` into CUDA when available (else CPU); pass anything else to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
