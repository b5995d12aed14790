"""The output folder of a run: its lock, the files its stages leave, and its bookkeeping files.

:class:`RunFolder` knows the folder, not the configuration: the :class:`~dreamood.pipeline.Pipeline` computes what
a stage's record must say (its fingerprint) and asks the folder to keep it, check it and clean up after it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamood.io import atomic_write, remove_temporaries
from dreamood.pipeline.lock import RunFolderLock
from dreamood.pipeline.records import StageRecord, file_digest
from dreamood.pipeline.stages import is_main_process

if TYPE_CHECKING:
    from dreamood.pipeline.stages import Stage

__all__ = ["RunFolder"]

logger = logging.getLogger("dreamood.pipeline")

# Keys that do not change any artefact, so a change of them is not reported.
_NEUTRAL_KEYS = frozenset({"progress", "data.num_workers", "output_dir"})


class RunFolder:
    """The output folder of a run.

    Args:
        path: The folder (``config.output_dir``).

    Attributes:
        path: The folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = RunFolderLock(path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (re-entrant; only rank 0 of a ``torchrun`` run takes it).

        Raises:
            RunFolderLockedError: Another process holds the lock.
        """
        if not is_main_process():
            yield
            return
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def remove_temporaries(self, paths: Sequence[Path]) -> None:
        """Delete the temporary files that a process killed while writing ``paths`` left behind.

        Args:
            paths: The files whose temporaries to delete.
        """
        removed = sum(remove_temporaries(path) for path in paths)
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted write of %s", removed, paths[0].name)

    def delete_state(self, stage: Stage[Any]) -> None:
        """Delete what a previous run of ``stage`` left: its work folders and its files.

        Args:
            stage: The stage about to start afresh.
        """
        for name in (*stage.workdirs, *stage.written_files()):
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def digests(self, stage: Stage[Any]) -> dict[str, str]:
        """The SHA-256 of every file ``stage`` wrote that exists, by path relative to the folder.

        Args:
            stage: A finished stage.

        Returns:
            Relative path -> hexadecimal digest.
        """
        names = dict.fromkeys((*stage.written_files(), stage.artifact))
        return {name: file_digest(self.path / name) for name in names if (self.path / name).is_file()}

    def verify(self, stage: Stage[Any]) -> list[str]:
        """Check a finished stage's files against the digests its record holds.

        Args:
            stage: A stage record.

        Returns:
            One line per problem (a file missing or changed since the stage wrote it); empty when none.

        Raises:
            ArtifactError: The stage's record is unreadable.
        """
        saved = StageRecord.read(self.path, stage.name)
        if saved is None or saved.status != "done":
            return []
        problems = []
        for name, digest in saved.files.items():
            path = self.path / name
            if not path.is_file():
                problems.append(f"{path} is missing (the {stage.name} stage wrote it)")
            elif file_digest(path) != digest:
                problems.append(
                    f"{path} was changed after the {stage.name} stage wrote it (its SHA-256 differs from the "
                    f"recorded {digest[:12]}...)"
                )
        return problems

    def record_time(self, stage: str, seconds: float) -> None:
        """Add a stage's duration to ``timings.json``.

        Args:
            stage: The stage's name.
            seconds: How long it ran.
        """
        path = self.path / "timings.json"
        self.remove_temporaries([path])
        timings = _read_json_object(path, "the stage timings, rewritten")
        timings[stage] = round(seconds, 3)
        with atomic_write(path, "w") as handle:
            handle.write(json.dumps(timings, indent=2))

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write a run's configuration to ``config.json``, warning when it differs from the one there.

        Args:
            config: The configuration as nested dicts.

        Returns:
            The path written (only rank 0 of a ``torchrun`` run writes it).
        """
        path = self.path / "config.json"
        if path.is_file():
            previous = _read_json_object(path, "the previous configuration, replaced by this run's")
            changed = sorted(set(_changed_keys(previous, dict(config))) - _NEUTRAL_KEYS) if previous else []
            if changed:
                logger.warning(
                    "the configuration differs from the one of the artefacts in %s (%s); the stages that depend on "
                    "these keys are redone, with everything after them",
                    self.path,
                    ", ".join(changed),
                )
        if is_main_process():
            self.remove_temporaries([path])
            with atomic_write(path, "w") as handle:
                handle.write(json.dumps(config, indent=2))
        return path


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of the run folder; an unreadable one is reported (naming the file) and read as empty."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("%s is not valid JSON (%s); it held %s", path, error, what)
        return {}
    if not isinstance(value, dict):
        logger.warning("%s holds a JSON %s, not an object; it held %s", path, type(value).__name__, what)
        return {}
    return value


def _changed_keys(old: Any, new: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".")
