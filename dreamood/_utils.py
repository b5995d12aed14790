"""Small helpers shared across dreamood (private module): devices, progress bars, seeds."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

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
    """Wrap ``iterable`` in a tqdm progress bar unless ``enabled`` is false or the output is not a terminal."""
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm

    # disable=None: tqdm draws nothing when stderr is not a terminal (a log file gets no carriage returns).
    yield from tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, disable=None)


# The modules whose disable_progress_bar() / enable_progress_bar() switch a library's own tqdm bars.
_PROGRESS_SWITCHES = {"transformers": "transformers.utils.logging", "diffusers": "diffusers.utils.logging"}


@contextmanager
def library_progress_bars(libraries: Iterable[str], *, enabled: bool) -> Iterator[None]:
    """Hide the progress bars that ``libraries`` draw themselves (such as "Loading weights") inside the block.

    With ``enabled`` true nothing is imported or changed. Otherwise each library is imported (the block is
    about to use it anyway), its bars are switched off, and every switch is set back on exit to what it was,
    huggingface_hub's too (transformers' switch also flips huggingface_hub's).

    Args:
        libraries: Names from ``"transformers"`` and ``"diffusers"``.
        enabled: Leave the bars as they are.

    Raises:
        ValueError: A name is not one of the libraries above.
    """
    names = list(libraries)
    unknown = [name for name in names if name not in _PROGRESS_SWITCHES]
    if unknown:
        raise ValueError(f"libraries must be among {', '.join(_PROGRESS_SWITCHES)}, got {unknown}")
    if enabled:
        yield
        return
    switches = [importlib.import_module(_PROGRESS_SWITCHES[name]) for name in names]
    hub_states = _hub_progress_states()
    saved_hub_states = None if hub_states is None else dict(hub_states)
    were_on = [bool(switch.is_progress_bar_enabled()) for switch in switches]
    _flip(switches, were_on, on=False)
    try:
        yield
    finally:
        _flip(switches, were_on, on=True)
        if hub_states is not None and saved_hub_states is not None:
            hub_states.clear()
            hub_states.update(saved_hub_states)


def _flip(switches: list[Any], selected: list[bool], *, on: bool) -> None:
    """Switch the selected libraries' progress bars on or off."""
    with warnings.catch_warnings():
        # huggingface_hub warns when HF_HUB_DISABLE_PROGRESS_BARS overrides transformers' switch; that is fine here.
        warnings.simplefilter("ignore")
        for switch, chosen in zip(switches, selected):
            if chosen and on:
                switch.enable_progress_bar()
            elif chosen:
                switch.disable_progress_bar()


def _hub_progress_states() -> dict[str, Any] | None:
    """huggingface_hub's table of progress-bar switches (global and per group), when it is loaded and has one."""
    module = sys.modules.get("huggingface_hub.utils.tqdm")
    states = getattr(module, "progress_bar_states", None)
    return states if isinstance(states, dict) else None


def make_generator(seed: int | None, device: DeviceLike = "cpu") -> torch.Generator | None:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``, or ``None`` when ``seed`` is ``None``."""
    if seed is None:
        return None
    generator = torch.Generator(device=resolve_device(device))
    generator.manual_seed(int(seed))
    return generator
