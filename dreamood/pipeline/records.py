"""What a run folder knows of each stage: the fingerprint of what made it, its state, the digests of its files.

Every stage of a run writes ``stages/<name>.json`` in the run folder: the *fingerprint* (a SHA-256 of the
configuration keys the stage depends on, the components it was made with, and the fingerprints of the stages it
read), whether it is still running or done, and, once done, the SHA-256 of each file it wrote. A rerun compares
fingerprints: a stage whose settings or inputs changed is redone, and since every fingerprint contains those of
its inputs, so is everything downstream of it. This is how make, DVC or Snakemake keep results true.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreamood.errors import ArtifactError
from dreamood.io import atomic_write

__all__ = [
    "NEUTRAL_KEYS",
    "RECORDS_DIR",
    "StageRecord",
    "StageStatus",
    "changed_settings",
    "file_digest",
    "fingerprint_of",
    "flatten",
    "settings_of",
]

#: Folder of the stage records inside a run folder.
RECORDS_DIR = "stages"

#: Configuration keys that change no result: where things are read from and written to, how fast and how
#: visibly they run. A change of them redoes nothing. (Batch sizes of inference, thread and worker counts and the
#: compile switches change results at most within floating-point rounding.)
NEUTRAL_KEYS = frozenset(
    {
        "output_dir",
        "device",
        "progress",
        "data.root",
        "data.ood_root",
        "data.ood_paths",
        "data.download",
        "data.num_workers",
        "data.imagenet_a",
        "data.imagenet_v2",
        "anchors.local_files_only",
        "bank.batch_size",
        "generation.local_files_only",
        "generation.batch_size",
        "generation.channels_last",
        "generation.fuse_qkv_projections",
        "generation.compile",
        "generation.compile_vae",
        "generation.compile_mode",
        "generation.writer_threads",
        "training.channels_last",
        "training.compile",
        "training.compile_mode",
        "training.cudnn_benchmark",
        "training.sync_every",
        "evaluation.batch_size",
    }
)

# Version of the record layout; a record of another version is treated as missing.
_RECORD_FORMAT = 1


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a nested configuration dict.

    Args:
        values: Nested dicts, e.g. :meth:`~dreamood.config.PipelineConfig.to_dict`.
        prefix: Prefix of the keys (used by the recursion).

    Yields:
        ``("sampler.sigma", 0.07)``-style pairs.
    """
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def settings_of(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` in a configuration dict, flattened to dotted keys, without :data:`NEUTRAL_KEYS`.

    Args:
        config: The configuration as nested dicts (:meth:`~dreamood.config.PipelineConfig.to_dict`).
        keys: Dotted keys; a section name (``"sampler"``) stands for every key of the section.

    Returns:
        Dotted key -> value, sorted by key.
    """
    flat = dict(flatten(config))
    chosen = {
        dotted: value
        for dotted, value in flat.items()
        if any(dotted == key or dotted.startswith(f"{key}.") for key in keys) and dotted not in NEUTRAL_KEYS
    }
    return dict(sorted(chosen.items()))


def fingerprint_of(
    stage: str, settings: Mapping[str, Any], components: Mapping[str, str], inputs: Mapping[str, str]
) -> str:
    """The SHA-256 that identifies a stage's result: its settings, components and input fingerprints."""
    text = json.dumps(
        {"stage": stage, "settings": settings, "components": components, "inputs": inputs, "format": _RECORD_FORMAT},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks.

    Args:
        path: The file.

    Returns:
        The hexadecimal digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StageRecord:
    """The content of ``stages/<name>.json``.

    Attributes:
        stage: The stage's name.
        fingerprint: SHA-256 of the settings, components and input fingerprints that made it.
        status: ``"running"`` (started, not finished: its checkpoints belong to this fingerprint) or ``"done"``.
        settings: The configuration keys it depends on, with their values.
        components: The components it was made with (their class names).
        inputs: The fingerprint of each stage it read.
        files: Once done, the SHA-256 of each file it wrote, by path relative to the run folder.
    """

    stage: str
    fingerprint: str
    status: str
    settings: dict[str, Any]
    components: dict[str, str]
    inputs: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)

    def write(self, folder: Path) -> Path:
        """Write the record to ``folder/stages/<stage>.json`` atomically.

        Args:
            folder: The run folder.

        Returns:
            The path written.
        """
        path = folder / RECORDS_DIR / f"{self.stage}.json"
        with atomic_write(path, "w") as handle:
            json.dump({"format": _RECORD_FORMAT, **asdict(self)}, handle, indent=2, sort_keys=True, default=str)
        return path

    @classmethod
    def read(cls, folder: Path, stage: str) -> StageRecord | None:
        """The record of ``stage`` in the run folder ``folder``, or ``None`` when there is none.

        Raises:
            ArtifactError: The record exists but is not a readable record (the message names the file).
        """
        path = folder / RECORDS_DIR / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArtifactError(
                f"stage record {path} is not valid JSON ({error}); delete it to redo the {stage} stage"
            ) from None
        names = {"stage", "fingerprint", "status", "settings", "components", "inputs", "files"}
        if not isinstance(data, dict) or data.get("format") != _RECORD_FORMAT or not names <= set(data):
            raise ArtifactError(f"{path} is not a stage record of this dreamood version; delete it to redo {stage}")
        record = cls(**{name: data[name] for name in names})
        if record.stage != stage or record.status not in ("running", "done"):
            raise ArtifactError(f"{path} describes stage {record.stage!r} ({record.status}), expected {stage!r}")
        return record


@dataclass(frozen=True)
class StageStatus:
    """What a run will do with a stage, and why.

    Attributes:
        stage: The stage's name.
        state: ``"done"`` (reused), ``"to do"`` (never finished), ``"resume"`` (interrupted, continues from its
            checkpoints), ``"redo"`` (finished, but from other settings or inputs) or ``"forced"``.
        reason: Why, in a few words.
    """

    stage: str
    state: str
    reason: str

    @property
    def fresh(self) -> bool:
        """Whether the stage starts from nothing: forced, or redone because what made it changed."""
        return self.state in ("forced", "redo")

    @property
    def runs(self) -> bool:
        """Whether the stage runs (anything but reused)."""
        return self.state != "done"


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two settings dicts (a key on one side only included)."""
    return sorted(key for key in set(old) | set(new) if old.get(key, object()) != new.get(key, object()))
