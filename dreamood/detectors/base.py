"""The common shape of post-hoc OOD detectors, and the checks they share.

A detector is configured in ``__init__``, learns what it needs from in-distribution data in ``fit`` (a no-op
where nothing is learned) and maps a batch to one score per row with ``score``; every score is *higher = more
in-distribution*. The class attribute ``inputs`` says what the detector consumes (``"logits"``, penultimate
``"features"`` or model input ``"images"``) and ``reference`` names its paper. Learned state lives in
attributes ending in ``_``; changing a hyperparameter that the state depends on discards the state, so a stale
fit can never be used silently.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike, resolve_device
from dreamood._validation import as_tensor, check_finite, check_floating, check_rank
from dreamood.errors import NotFittedError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Detector", "InputKind", "NotFittedError"]

InputKind = Literal["logits", "features", "images"]


class Detector(ABC):
    """Base class of post-hoc OOD detectors: ``fit`` on in-distribution data, then ``score`` batches.

    Subclasses set the class attributes ``inputs`` and ``reference`` and implement :meth:`score`.

    Args:
        device: Where the computation runs. ``None`` means the device of the batch passed in; learned state
            is moved there when needed. Scores are always returned on the device of the batch.
    """

    inputs: ClassVar[InputKind]
    reference: ClassVar[str]

    def __init__(self, device: DeviceLike = None) -> None:
        self.device = device

    def fit(self, x: Tensor, labels: Tensor | None = None) -> Self:
        """Learn from in-distribution data; the base implementation learns nothing.

        Args:
            x: In-distribution batch of the kind named by ``inputs``.
            labels: Class labels ``(N,)``, used only by detectors that need them.

        Returns:
            ``self``.
        """
        return self

    @abstractmethod
    def score(self, x: Tensor) -> Tensor:
        """Score a batch; higher = more in-distribution.

        Args:
            x: Batch of the kind named by ``inputs``.

        Returns:
            Scores of shape ``(N,)``.
        """

    def __call__(self, x: Tensor) -> Tensor:
        """Same as :meth:`score`, so a detector can be used wherever a scorer callable is expected."""
        return self.score(x)

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={value!r}" for name, value in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict[str, object]:
        """Hyperparameters shown by ``repr``."""
        return {"device": self.device}

    def _reset(self) -> None:
        """Discard the learned state (every public attribute ending in ``_``)."""
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)

    def _check_fitted(self, *attributes: str) -> None:
        missing = [name for name in attributes if not hasattr(self, name)]
        if missing:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted (missing {', '.join(missing)}): call fit() first, and again "
                "after changing a hyperparameter it depends on"
            )

    def _compute_device(self, batch: Tensor) -> torch.device:
        return batch.device if self.device is None else resolve_device(self.device)

    def _checked(
        self, x: Tensor, name: str, columns: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Check a batch with :func:`check_batch` (and that it has ``columns`` columns).

        Returns:
            ``(batch, moved)``: the checked batch (what :func:`finish_scores` takes as ``like``) and the same
            on the compute device in ``dtype`` (``None``: its own dtype).
        """
        x = check_batch(x, name)
        if columns is not None:
            check_feature_dim(x, columns, name)
        return x, x.to(self._compute_device(x), dtype)

    def _device_for(self, x: Tensor, model: object) -> torch.device:
        """The configured device, else the device of ``model``'s first parameter or buffer, else ``x``'s."""
        return self._compute_device(x) if self.device is not None else module_device(model, x)


class LinearHeadDetector(Detector):
    """A feature detector that recomputes logits from features with a copy of the classifier's last layer.

    Args:
        linear: The classifier's last layer, an ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor (``None``: no bias).
        device: Where the computation runs (``None``: the device of the features).

    Raises:
        TypeError: If ``linear`` is not an ``nn.Linear`` or a floating-point tensor.
        ValueError: If the layer's shapes disagree.
    """

    inputs = "features"

    def __init__(self, linear: nn.Linear | Tensor, bias: Tensor | None, device: DeviceLike) -> None:
        super().__init__(device)
        self._weight, self._bias = linear_parameters(linear, bias)

    @property
    def weight(self) -> Tensor:
        """The last layer's weight ``(C, D)`` (a float64 copy, read-only: build a new detector to change it)."""
        return self._weight

    @property
    def bias(self) -> Tensor:
        """The last layer's bias ``(C,)`` (a float64 copy; zeros when none was given)."""
        return self._bias

    def _features64(self, features: Tensor) -> Tensor:
        return self._checked(features, "features", self._weight.shape[1], torch.float64)[1]

    def _logits(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """The logits ``x W^T + b`` on ``x``'s device; ``weight`` replaces the layer's weight (e.g. a masked one)."""
        weight = self._weight if weight is None else weight
        return torch.addmm(self._bias.to(x.device), x, weight.to(x.device).T)


def check_batch(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as a detached floating-point ``(N, d)`` tensor; raise on a bad shape, dtype or NaN."""
    x = as_tensor(x, name)
    check_rank(x, 2, name, "(N, d)")
    check_floating(x, name)
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x.detach()


def check_labels(labels: Tensor | None, n_rows: int, name: str = "labels") -> Tensor:
    """Return ``labels`` as an int64 ``(N,)`` tensor matching ``n_rows``; raise if missing or malformed."""
    if labels is None:
        raise ValueError(f"{name} are required, got None")
    labels = as_tensor(labels, name)
    check_rank(labels, 1, name, "(N,)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != n_rows:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the data has {n_rows} rows")
    return labels.detach().to(torch.int64)


def check_neighbors(features: Tensor, k: int) -> None:
    """Raise ``ValueError`` unless ``features`` has at least ``k`` rows (a bank to search ``k`` neighbours in)."""
    if features.shape[0] < k:
        raise ValueError(f"features must have at least k={k} rows, got {features.shape[0]}")


def class_means(values: Tensor, index: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Float64 means of the rows of ``values`` grouped by ``index`` in ``[0, n_classes)``, and the group sizes.

    Args:
        values: Rows to average ``(N, D)``, float64.
        index: The group of every row ``(N,)``, int64, on the device of ``values``.
        n_classes: Number of groups.

    Returns:
        ``(means (n_classes, D), counts (n_classes,))``, float64; the rows of empty groups are NaN.
    """
    counts = torch.bincount(index, minlength=n_classes).to(torch.float64)
    sums = torch.zeros(n_classes, values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, index, values)
    return sums / counts.unsqueeze(1), counts


def check_predicted(has: Tensor, predicted: Tensor, why: str) -> None:
    """Raise ``ValueError`` naming the predicted classes whose ``has`` entry is false (``why`` says what they lack)."""
    if not bool(has[predicted].all()):
        missing = sorted(set(predicted[~has[predicted]].tolist()))
        raise ValueError(f"samples are predicted as classes {missing}, which {why}")


def finish_scores(scores: Tensor, like: Tensor, detector: str) -> Tensor:
    """Check ``scores`` are finite and return them on ``like``'s device, float32 (float64 for float64 input)."""
    check_finite(scores, f"{detector} scores")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return scores.to(device=like.device, dtype=dtype)


def linear_parameters(linear: nn.Linear | Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Detached float64 copies ``(weight (C, D), bias (C,))`` of a classifier's last linear layer.

    Args:
        linear: An ``nn.Linear`` or its weight ``(C, D)``.
        bias: The bias ``(C,)`` when ``linear`` is a weight tensor; ``None`` means no bias (zeros). Must be
            ``None`` when ``linear`` is an ``nn.Linear`` (its own bias is used).

    Returns:
        ``(weight, bias)`` in float64, on the device of the given weight.

    Raises:
        TypeError: If ``linear`` is neither an ``nn.Linear`` nor a floating-point tensor.
        ValueError: If shapes disagree or ``bias`` is given together with an ``nn.Linear``.
        NonFiniteError: If the weight or bias contain NaN or infinity.
    """
    if isinstance(linear, nn.Linear):
        if bias is not None:
            raise ValueError("bias must be None when linear is an nn.Linear (its own bias is used)")
        weight, bias = linear.weight, linear.bias
    elif isinstance(linear, Tensor):
        weight = linear
    else:
        raise TypeError(f"linear must be an nn.Linear or a weight tensor (C, D), got {type(linear).__name__}")
    weight = check_batch(weight, "linear weight")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    bias = as_tensor(bias, "bias")
    check_rank(bias, 1, "bias", "(C,)")
    check_floating(bias, "bias")
    check_finite(bias, "bias")
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} entries but the weight has {weight.shape[0]} rows (classes)")
    return weight.detach().to(torch.float64, copy=True), bias.detach().to(weight.device, torch.float64, copy=True)


def check_feature_dim(features: Tensor, expected: int, name: str = "features") -> None:
    """Raise ``ValueError`` unless ``features`` has ``expected`` columns."""
    if features.shape[1] != expected:
        raise ValueError(f"{name} must have {expected} columns (the feature dimension), got {features.shape[1]}")


def percentile_of(values: Tensor, q: float) -> float:
    """The ``q``-th percentile of all entries of ``values``, interpolated linearly like ``numpy.percentile``.

    Uses two exact selections (``kthvalue``) instead of a sort, and no size limit (``torch.quantile`` has one).

    Args:
        values: Any non-empty tensor.
        q: Percentile in ``[0, 100]``.

    Returns:
        The percentile as a Python float.
    """
    flat = values.reshape(-1)
    position = q / 100.0 * (flat.numel() - 1)
    lower = math.floor(position)
    upper = min(lower + 1, flat.numel() - 1)
    low = float(flat.kthvalue(lower + 1).values)
    high = float(flat.kthvalue(upper + 1).values)
    return low + (high - low) * (position - lower)


@contextlib.contextmanager
def eval_mode(*objects: object) -> Iterator[None]:
    """Put every given ``nn.Module`` in eval mode inside the block; restore each submodule's flag afterwards."""
    modules = [obj for obj in objects if isinstance(obj, nn.Module)]
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training


def check_images(x: Tensor, name: str = "x") -> Tensor:
    """Return ``x`` detached, checked to be a finite floating-point batch with a batch dimension."""
    x = as_tensor(x, name)
    check_floating(x, name)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x.detach()


def module_device(model: object, fallback: Tensor) -> torch.device:
    """The device of a module's first parameter or buffer, else ``fallback``'s device."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return fallback.device
