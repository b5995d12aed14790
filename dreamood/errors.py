"""Exceptions raised by dreamood.

Every error a user can cause is raised at the boundary of the public API with a message that names the
offending argument and its value. Library-specific failures derive from :class:`DreamoodError`; invalid
arguments are plain :class:`ValueError` (or :class:`TypeError` for a wrong type), so callers can catch
them the usual way.
"""

from __future__ import annotations


class DreamoodError(Exception):
    """Base class of every exception defined by dreamood."""


class ModelNotFoundError(DreamoodError, FileNotFoundError):
    """A pretrained model (Stable Diffusion, CLIP, a trained decoder) is missing or incomplete on disk."""


class ArtifactError(DreamoodError, ValueError):
    """An artefact or checkpoint on disk is corrupt, truncated, or does not match what was expected."""


class NonFiniteError(DreamoodError, ValueError):
    """A tensor that must be finite (features, scores, a loss) contains NaN or infinity."""


class NotFittedError(DreamoodError, ValueError, AttributeError):
    """A detector or index was used before ``fit`` (or after a hyperparameter change discarded its fit)."""


class RunFolderLockedError(DreamoodError, RuntimeError):
    """Another process writes into the run folder (it holds the folder's lock)."""


class StaleArtifactError(DreamoodError, RuntimeError):
    """A finished stage's artefact was made from other settings or inputs, and the run was asked not to redo it."""
