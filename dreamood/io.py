"""Saving and loading artefacts and checkpoints, safely and atomically.

Tensors that are artefacts (anchors, feature banks, sampled embeddings) are stored as a ``.safetensors``
file with a JSON sidecar of metadata next to it (``name.safetensors`` + ``name.json``). Checkpoints are
``torch.save`` files loaded with ``weights_only=True``. Nothing here unpickles arbitrary objects, and every
file is written to a temporary name in the same folder and then renamed, so a crash never leaves a
half-written artefact under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
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
    "remove_temporaries",
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
    with _naming_path(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates the file readable by its owner only; give it the usual permissions (0666 - umask).
        os.fchmod(fd, 0o666 & ~_current_umask())
        with _naming_path(target):
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def _naming_path(target: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` that does not name a file (a full disk, say) with ``target`` as its file."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        # OSError(errno, ...) builds the matching subclass (PermissionError for EACCES, ...).
        raise OSError(error.errno, f"{error.strerror} (while writing)", str(target)) from error


def _write_together(files: list[tuple[Path, bytes]]) -> None:
    """Write every file to a temporary name and rename them all only once all were written and synced.

    A full disk or a permission error while writing leaves every target as it was. Only a crash between the
    renames (microseconds) can leave some targets new and others old, which :func:`load_artifact` detects.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for target, data in files:
            with _naming_path(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                staged.append((tmp_name, target))
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
        for tmp_name, target in staged:
            with _naming_path(target):
                os.replace(tmp_name, target)
    except BaseException:
        for tmp_name, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        raise


def remove_temporaries(path: str | os.PathLike[str]) -> int:
    """Delete the temporary files that writes of ``path`` killed mid-way (``SIGKILL``, power loss) left behind.

    Call it only when no other process is writing ``path``, for example when a run resumes.

    Args:
        path: The final path of a file written with :func:`atomic_write` or :func:`save_artifact`.

    Returns:
        The number of files removed.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return 0
    removed = 0
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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

    Raises:
        OSError: A file cannot be written (disk full, permissions); the message names it, and the artefact
            previously at ``path``, if any, is left as it was.
    """
    from safetensors.torch import save as save_bytes

    target = _artifact_path(path)
    cpu_tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    sidecar: dict[str, Any] = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "tensors": sorted(tensors),
        "metadata": dict(metadata),
    }
    # A digest of the content, stored in both files, pairs them: a tensor file and a sidecar written by two
    # different saves are refused on load. It is deterministic, so equal artefacts are equal files.
    sidecar["artifact_id"] = _content_digest(cpu_tensors, json.dumps(sidecar, sort_keys=True))
    payload = save_bytes(cpu_tensors, metadata={"artifact_id": sidecar["artifact_id"]})
    text = json.dumps(sidecar, indent=2, sort_keys=True)
    _write_together([(target, payload), (sidecar_path(target), text.encode())])
    return target


def _content_digest(tensors: Mapping[str, Tensor], text: str) -> str:
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def load_artifact(path: str | os.PathLike[str], *, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load an artefact written by :func:`save_artifact` and check that it is of type ``kind``.

    The content digest that :func:`save_artifact` stored in both files is recomputed from the tensors and the
    sidecar, so a tensor or a metadata value changed after saving, or two files of different saves, are refused.

    Raises:
        FileNotFoundError: The tensor file or its sidecar is missing.
        ArtifactError: Either file is corrupt or truncated, the two files come from different saves, the content
            differs from what was saved, or the artefact is of another kind.
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
    data = target.read_bytes()
    try:
        tensors = load_bytes(data)
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{target} is not a readable safetensors file ({error})") from error
    expected_id = info.get("artifact_id")
    if not isinstance(expected_id, str):
        raise ArtifactError(f"sidecar {sidecar} has no 'artifact_id', so {target} cannot be verified; save it again")
    if _header_metadata(data).get("artifact_id") != expected_id:
        raise ArtifactError(
            f"{target} and its sidecar {sidecar} come from two different saves (an interrupted or partial copy); "
            "save the artefact again"
        )
    expected = info.get("tensors")
    if isinstance(expected, list) and sorted(tensors) != sorted(expected):
        raise ArtifactError(f"{target} holds tensors {sorted(tensors)}, its sidecar lists {sorted(expected)}")
    described = {key: value for key, value in info.items() if key != "artifact_id"}
    if _content_digest(tensors, json.dumps(described, sort_keys=True)) != expected_id:
        raise ArtifactError(
            f"{target} or its sidecar {sidecar} was changed after it was saved (its content digest no longer "
            f"matches {expected_id[:12]}...): a value was edited or the file is damaged; remake the artefact"
        )
    return tensors, info["metadata"]


def _header_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` table of a safetensors file's JSON header (empty when absent)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint made of tensors, numbers, strings, lists and dicts.

    Raises:
        OSError: The file cannot be written; a full disk is said as such (``errno.ENOSPC``), naming the file and
            the free space, and the checkpoint previously at ``path``, if any, is left as it was.
    """
    target = Path(path)
    try:
        with atomic_write(target) as handle:
            torch.save(dict(state), handle)
    except (OSError, RuntimeError) as error:
        # torch's zip writer reports a failed write as "[enforce fail ...] unexpected pos ..."
        if not (isinstance(error, RuntimeError) and "unexpected pos" in str(error)):
            raise  # an OSError already names the file and its errno
        free = shutil.disk_usage(target.parent).free / 2**20
        raise OSError(
            errno.ENOSPC,
            f"no space left on the device while writing the checkpoint {target} ({free:.0f} MiB free); free some "
            "space and run again (the previous checkpoint, if any, is unchanged)",
        ) from error
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
