"""Saving and loading artefacts and checkpoints, safely and atomically.

Tensors that are artefacts (anchors, feature banks, sampled embeddings) are stored as a ``.safetensors``
file with a JSON sidecar of metadata next to it (``name.safetensors`` + ``name.json``). Checkpoints are
``torch.save`` files loaded with ``weights_only=True``. Nothing here unpickles arbitrary objects, and every
file is written to a temporary name in the same folder and then renamed, so a crash never leaves a
half-written artefact under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from dreamood.errors import ArtifactError

__all__ = [
    "atomic_write",
    "load_artifact",
    "load_checkpoint",
    "save_artifact",
    "save_checkpoint",
    "sidecar_path",
]

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and move it onto ``path`` only when the block succeeds.

    The data is flushed and ``fsync``-ed before the rename, so after a crash ``path`` holds either the old
    content or the complete new one. Errors (disk full, permissions) propagate as ``OSError`` with the
    path in the message, and the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Return the JSON sidecar path of an artefact: ``x.safetensors`` -> ``x.json``."""
    return Path(path).with_suffix(".json")


def _artifact_path(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    return target if target.suffix == ".safetensors" else target.with_name(target.name + ".safetensors")


def save_artifact(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, Any], *, kind: str
) -> Path:
    """Save ``tensors`` as safetensors plus a JSON sidecar holding ``kind`` and ``metadata``.

    Args:
        path: Target file; ``.safetensors`` is appended when missing.
        tensors: Named tensors (moved to CPU and made contiguous before writing).
        metadata: JSON-serialisable metadata stored in the sidecar.
        kind: The artefact type (for example ``"TokenEmbeddings"``), checked again on load.

    Returns:
        The path of the written ``.safetensors`` file.
    """
    from safetensors.torch import save as save_bytes

    target = _artifact_path(path)
    payload = save_bytes({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    sidecar = {"kind": kind, "format_version": FORMAT_VERSION, "tensors": sorted(tensors), "metadata": dict(metadata)}
    text = json.dumps(sidecar, indent=2, sort_keys=True)
    with atomic_write(target) as handle:
        handle.write(payload)
    with atomic_write(sidecar_path(target), "w") as handle:
        handle.write(text)
    return target


def load_artifact(path: str | os.PathLike[str], *, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load an artefact written by :func:`save_artifact` and check that it is of type ``kind``.

    Raises:
        FileNotFoundError: The tensor file or its sidecar is missing.
        ArtifactError: Either file is corrupt or truncated, or the artefact is of another kind.
    """
    from safetensors.torch import load as load_bytes

    target = _artifact_path(path)
    sidecar = sidecar_path(target)
    for required in (target, sidecar):
        if not required.is_file():
            raise FileNotFoundError(f"{kind} artefact file not found: {required}")
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"sidecar {sidecar} is not valid JSON ({error})") from error
    if not isinstance(info, dict) or not isinstance(info.get("metadata"), dict):
        raise ArtifactError(f"sidecar {sidecar} lacks a 'metadata' object; is it a dreamood artefact?")
    if info.get("kind") != kind:
        raise ArtifactError(f"{target} holds a {info.get('kind')!r} artefact, expected {kind!r}")
    try:
        tensors = load_bytes(target.read_bytes())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{target} is not a readable safetensors file ({error})") from error
    expected = info.get("tensors")
    if isinstance(expected, list) and sorted(tensors) != sorted(expected):
        raise ArtifactError(f"{target} holds tensors {sorted(tensors)}, its sidecar lists {sorted(expected)}")
    return tensors, info["metadata"]


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint made of tensors, numbers, strings, lists and dicts."""
    target = Path(path)
    with atomic_write(target) as handle:
        torch.save(dict(state), handle)
    return target


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never pickled code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ArtifactError: The file is truncated, not a checkpoint, or contains objects other than tensors and
            plain containers (for example a malicious pickle).
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint not found: {target}")
    try:
        state = torch.load(target, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ArtifactError(
            f"checkpoint {target} cannot be loaded safely (weights_only=True): {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    if not isinstance(state, dict):
        raise ArtifactError(f"checkpoint {target} holds a {type(state).__name__}, expected a dict")
    return state
