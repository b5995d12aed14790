"""The per-epoch checkpoint of every training loop of dreamood: one layout, written atomically, verified on resume.

:func:`~dreamood.encoder.fit_encoder`, :func:`~dreamood.training.train_classifier` (and the baselines trained with
it, the GAN's joint training included) and :meth:`~dreamood.decoding.InDomainDiffusionDecoder.fit` keep their
training state in a :class:`TrainingCheckpoint`. After every epoch it writes one ``torch.save`` file holding what
an uninterrupted run would still have in memory: the ``state_dict()`` of every named training object (model,
optimiser, scheduler, loss scaler, ...), every random state the run draws from (one per process), the history and
the completed epochs. The file is renamed into place only once complete (:func:`dreamood.io.save_checkpoint`) and
read back with ``weights_only=True`` (:func:`dreamood.io.load_checkpoint`), so it never runs pickled code.

Resuming refuses a file that is not a checkpoint of the same loop, that an older or newer layout wrote, or that
belongs to another run (the ``run`` entries, such as the number of steps per epoch, must be equal), with a
message naming the file and the difference, rather than continuing a different run silently.

Layout (format ``"dreamood.training"``, version 2)::

    format, format_version, kind, epoch     # kind: the loop that wrote it, e.g. "fit_encoder"
    <run entries>                           # e.g. steps_per_epoch, checked on resume
    <one entry per training object>         # e.g. model, optimizer, scheduler, scaler: their state_dict()
    rng                                     # a list: the random states of each process, by rank
    history                                 # the loop's per-epoch record
    <the loop's own entries>                # e.g. train_classifier's config, feature_sampler, extra_state

Version 1 is the same layout without ``kind``, written by ``train_classifier`` only, and is read as such.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from dreamood.errors import ArtifactError
from dreamood.io import load_checkpoint, remove_temporaries, save_checkpoint
from dreamood.training.rng import capture_rng_state, restore_rng_state

__all__ = ["CHECKPOINT_FORMAT", "FORMAT_VERSION", "Stateful", "TrainingCheckpoint"]

CHECKPOINT_FORMAT = "dreamood.training"
"""Value of the ``"format"`` entry of every training checkpoint."""

FORMAT_VERSION = 2
"""Version of the layout written now."""

# Entries every checkpoint holds besides the run entries and the training objects.
_HEADER = ("format", "format_version", "kind", "epoch", "rng", "history")
# Layouts before the "kind" entry: version -> the only loop that wrote them.
_KIND_OF_VERSION = {1: "train_classifier"}


@runtime_checkable
class Stateful(Protocol):
    """An object whose state a checkpoint saves and restores: a module, an optimiser, a scheduler, a scaler, ..."""

    def state_dict(self) -> Any:
        """The object's state (tensors and plain Python values)."""
        ...

    def load_state_dict(self, state_dict: Any, /) -> Any:
        """Replace the object's state with ``state_dict``."""
        ...


class TrainingCheckpoint:
    """The checkpoint file of one training run: saving, verifying and restoring its complete state.

    Args:
        path: The checkpoint file, or ``None`` for a run that keeps none (:meth:`save` then writes nothing and
            :meth:`exists` is false).
        kind: The loop that writes it, e.g. ``"fit_encoder"``; a checkpoint of another loop is refused.
        objects: Named training objects (``state_dict()`` / ``load_state_dict(state)``) saved and restored
            under their names, e.g. ``{"model": model, "optimizer": optimizer, "scheduler": scheduler}``. Their
            states must hold only tensors and plain Python values.
        run: What identifies the run; each entry is saved and, on resume, must equal the saved value, e.g.
            ``{"steps_per_epoch": 391}``.
        generators: Named groups of the explicit ``torch.Generator`` objects the run draws from (a loader's, the
            loop's own); their states are saved and restored.
        global_rng: Also save and restore the global generators (torch's CPU and CUDA, Python's, NumPy's):
            ``False`` for a run that draws only from ``generators`` and must leave the global ones alone.
        rank: This process's rank under ``torchrun`` (0 in a single process): the random state it restores.

    Raises:
        ValueError: A name is used twice, or a name of ``objects`` or ``run`` is one of the checkpoint's own
            entries.
        TypeError: An object of ``objects`` lacks ``state_dict`` or ``load_state_dict``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        kind: str,
        *,
        objects: Mapping[str, Stateful],
        run: Mapping[str, Any] | None = None,
        generators: Mapping[str, list[torch.Generator]] | None = None,
        global_rng: bool = True,
        rank: int = 0,
    ) -> None:
        run = dict(run or {})
        for name, value in objects.items():
            if not isinstance(value, Stateful):
                raise TypeError(f"objects[{name!r}] must have state_dict() and load_state_dict(state)")
        clashes = sorted((set(objects) & set(run)) | ((set(objects) | set(run)) & set(_HEADER)))
        if clashes:
            raise ValueError(f"names {clashes} are used twice or are entries of the checkpoint itself")
        self.path = None if path is None else Path(path)
        self.kind = kind
        self.objects = dict(objects)
        self.run = run
        self.generators = dict(generators or {})
        self.global_rng = global_rng
        self.rank = rank

    def exists(self) -> bool:
        """Whether there is a checkpoint file to resume from."""
        return self.path is not None and self.path.is_file()

    def remove_temporaries(self) -> None:
        """Delete the temporary files of a write that a killed process left beside the checkpoint.

        Call it before training, in the only process that writes the checkpoint.
        """
        if self.path is not None:
            remove_temporaries(self.path)

    # ---- saving --------------------------------------------------------------------------------------------

    def capture_rng(self) -> dict[str, Any]:
        """This process's random states (under ``torchrun`` gather them from every process for :meth:`save`)."""
        return capture_rng_state(self.generators, global_state=self.global_rng)

    def save(
        self,
        epoch: int,
        history: Any,
        *,
        rng: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the checkpoint of a run that has completed ``epoch`` epochs, atomically.

        Args:
            epoch: Number of completed epochs.
            history: The loop's record of the completed epochs (tensors and plain Python values).
            rng: The random states of every process, by rank; ``None`` captures this process's only.
            extra: The loop's own entries (tensors and plain Python values), returned as they are on resume.

        Raises:
            ValueError: An entry of ``extra`` has the name of another entry.
            OSError: The file cannot be written; the previous checkpoint is left as it was.
        """
        if self.path is None:
            return
        extra = dict(extra or {})
        clashes = sorted(set(extra) & (set(_HEADER) | set(self.run) | set(self.objects)))
        if clashes:
            raise ValueError(f"extra entries {clashes} have the names of other entries of the checkpoint")
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "epoch": epoch,
            **self.run,
            **{name: value.state_dict() for name, value in self.objects.items()},
            "rng": list(rng) if rng is not None else [self.capture_rng()],
            "history": history,
            **extra,
        }
        save_checkpoint(self.path, state)

    # ---- resuming ------------------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Read and verify the checkpoint and load the training objects' states from it.

        The random states are not restored here: call :meth:`restore_rng` with the result once nothing else
        will draw from them before training continues.

        Returns:
            Everything the file holds: ``epoch``, ``history``, ``rng`` and the loop's own entries.

        Raises:
            FileNotFoundError: There is no checkpoint file.
            ArtifactError: The file cannot be read safely, is not a checkpoint of this loop, has another layout
                version, lacks entries, or its states do not fit the training objects.
            ValueError: It belongs to another run: a ``run`` entry differs.
        """
        if self.path is None:
            raise FileNotFoundError(f"the {self.kind} run keeps no checkpoint (its path is None)")
        path = self.path
        state = load_checkpoint(path, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(
                f"{path} is not a checkpoint of {self.kind} (format {state.get('format')!r}, expected "
                f"{CHECKPOINT_FORMAT!r}); it may come from an older dreamood: start afresh with resume=False"
            )
        version = state.get("format_version")
        if version == FORMAT_VERSION:
            kind = state.get("kind")
        elif version in _KIND_OF_VERSION:
            kind = _KIND_OF_VERSION[version]
        else:
            raise ArtifactError(
                f"{path} has checkpoint layout version {version!r}, this dreamood reads version {FORMAT_VERSION}; "
                "resume with the dreamood version that wrote it, or start afresh with resume=False"
            )
        if kind != self.kind:
            raise ArtifactError(f"{path} is not a checkpoint of {self.kind} but of {kind}")
        for key, value in self.run.items():
            if key not in state:
                raise ValueError(
                    f"cannot resume from {path}: it records no {key!r} to check against this run (an older dreamood "
                    "wrote it); start afresh with resume=False"
                )
            saved = state[key]
            if saved == value:
                continue
            if isinstance(saved, Mapping) and isinstance(value, Mapping):
                keys = sorted(name for name in set(saved) | set(value) if saved.get(name) != value.get(name))
                written = ", ".join(f"{key}.{name}={saved.get(name)!r}" for name in keys)
                current = ", ".join(f"{key}.{name}={value.get(name)!r}" for name in keys)
            else:
                written, current = f"{key}={saved!r}", f"{key}={value!r}"
            raise ValueError(
                f"cannot resume from {path}: it was written with {written}, this run has {current}; use "
                "another folder or start afresh with resume=False"
            )
        missing = [name for name in ("epoch", "rng", "history", *self.objects) if name not in state]
        if missing:
            raise ArtifactError(f"{path} lacks the entries {missing} of a {self.kind} checkpoint")
        for name, value in self.objects.items():
            try:
                value.load_state_dict(state[name])
            except (KeyError, RuntimeError, ValueError, TypeError) as error:
                raise ArtifactError(
                    f"checkpoint {path} does not match this {self.kind} run: its {name!r} state does not fit "
                    f"({type(error).__name__}: {error})"
                ) from error
        return state

    def restore_rng(self, state: Mapping[str, Any]) -> None:
        """Put back this process's random states from a loaded checkpoint, warning about any that cannot be.

        Args:
            state: What :meth:`load` returned.

        Raises:
            ArtifactError: The checkpoint holds no random state for this process or not the expected ones.
        """
        states = state["rng"]
        if not isinstance(states, list) or self.rank >= len(states):
            raise ArtifactError(f"{self.path} holds no random state of process {self.rank}")
        try:
            problems = restore_rng_state(states[self.rank], self.generators, global_state=self.global_rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ArtifactError(
                f"the random states in {self.path} do not fit this {self.kind} run ({type(error).__name__}: {error})"
            ) from error
        if problems:
            warnings.warn(
                f"could not restore these random states, the resumed run may differ: {', '.join(problems)}",
                stacklevel=3,
            )
