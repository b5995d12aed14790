"""GODIN: decomposed confidence ``h(x) / g(x)`` and input pre-processing tuned on ID data alone.

Hsu, Shen, Jin, Kira. "Generalized ODIN: Detecting Out-of-distribution Image without Learning from
Out-of-distribution Data", CVPR 2020. The classifier's logits are the quotient of a class similarity ``h_i(x)``
and a data-dependent scalar ``g(x) = sigmoid(BN(w_g^T f(x) + b_g))`` of the penultimate features ``f(x)``;
training is plain cross-entropy on the quotient (with no weight decay on ``h``'s weights). At test time the
score is ``max_i h_i(x')`` of an input moved by ``epsilon`` along the sign of the score's gradient, with
``epsilon`` chosen on ID validation data as the grid value that maximises the mean score.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import as_tensor, check_choice, check_finite, check_floating, check_positive_int
from dreamood.detectors.base import Detector, finish_scores
from dreamood.models._seed import seeded
from dreamood.models.classifier import backbone_features, resolve_feature_dim
from dreamood.training.config import TrainingConfig, TrainingResult
from dreamood.training.loop import train_classifier

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_EPSILONS", "GODIN", "SIMILARITIES", "GodinClassifier", "GodinHead", "train_godin"]

#: The similarity functions ``h`` of the paper: cosine (its best, the default), inner product, Euclidean.
SIMILARITIES: tuple[str, ...] = ("cosine", "inner", "euclidean")

#: Perturbation magnitudes searched by :class:`GODIN`: the paper's grid, plus 0 (no perturbation).
DEFAULT_EPSILONS: tuple[float, ...] = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)

_REFERENCE = (
    "Hsu, Shen, Jin, Kira. Generalized ODIN: Detecting Out-of-distribution Image without Learning from "
    "Out-of-distribution Data. CVPR 2020."
)


class GodinHead(nn.Module):
    """The decomposed-confidence head: features ``(N, D)`` -> quotient logits ``h(x) / g(x)`` ``(N, C)``.

    Hsu et al., CVPR 2020 (Eqs. 7-9). With class weights ``w_i`` and features ``f``:

    * ``"cosine"``: ``h_i = w_i^T f / (||w_i|| ||f||)``;
    * ``"inner"``: ``h_i = w_i^T f``;
    * ``"euclidean"``: ``h_i = -||f - w_i||^2``;

    and ``g = sigmoid(BN(w_g^T f + b_g))`` (a ``Linear(D, 1)``, a ``BatchNorm1d(1)`` and a sigmoid).

    Args:
        feature_dim: Width ``D`` of the features.
        num_classes: Number of classes ``C``.
        similarity: ``"cosine"``, ``"inner"`` or ``"euclidean"``.
        seed: Seed of the weight initialisation (``None``: the global torch RNG). ``w_i`` are drawn from
            Kaiming-normal (as the public re-implementation), ``g``'s layer as ``nn.Linear`` does.

    Attributes:
        weight: The class weights ``w_i`` of ``h``, shape ``(C, D)``; train them without weight decay.
        g_linear: ``Linear(D, 1)`` of ``g``.
        g_norm: ``BatchNorm1d(1)`` of ``g``.

    Raises:
        ValueError: ``similarity`` is unknown or a size is not positive.
    """

    def __init__(self, feature_dim: int, num_classes: int, similarity: str = "cosine", *, seed: int | None = None):
        super().__init__()
        check_positive_int(feature_dim, "feature_dim")
        check_positive_int(num_classes, "num_classes")
        check_choice(similarity, SIMILARITIES, "similarity")
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.similarity = similarity
        with seeded(seed):
            self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
            nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
            self.g_linear = nn.Linear(feature_dim, 1)
        self.g_norm = nn.BatchNorm1d(1)

    def extra_repr(self) -> str:
        """Return the configuration shown by ``repr``."""
        return f"feature_dim={self.feature_dim}, num_classes={self.num_classes}, similarity={self.similarity!r}"

    def h_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``h`` (the class weights), which the paper trains without weight decay."""
        return [self.weight]

    def similarities(self, features: Tensor) -> Tensor:
        """The class similarities ``h(x)``, shape ``(N, C)``; ``max_i h_i`` is GODIN's OOD score.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            ``h`` of every class.
        """
        if self.similarity == "cosine":
            return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        if self.similarity == "inner":
            return features @ self.weight.T
        return -(features.unsqueeze(1) - self.weight.unsqueeze(0)).pow(2).sum(dim=2)

    def denominator(self, features: Tensor) -> Tensor:
        """The data-dependent scale ``g(x) = sigmoid(BN(w_g^T f + b_g))`` in ``(0, 1)``, shape ``(N,)``.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            ``g`` of every sample.
        """
        return torch.sigmoid(self.g_norm(self.g_linear(features))).squeeze(1)

    def decompose(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Both factors of the logits: ``(h (N, C), g (N,))``.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            The similarities and the scale.
        """
        return self.similarities(features), self.denominator(features)

    def forward(self, features: Tensor) -> Tensor:
        """Quotient logits ``h(x) / g(x)`` ``(N, C)``, trained with cross-entropy.

        Args:
            features: Penultimate features ``(N, D)``.

        Returns:
            The logits.
        """
        h, g = self.decompose(features)
        return h / g.unsqueeze(1)


class GodinClassifier(nn.Module):
    """A backbone with a :class:`GodinHead`: ``forward`` gives the quotient logits ``h / g`` for training.

    The predicted class is ``argmax_i h_i`` (``g > 0`` scales a row without changing its order), so accuracy
    can be read from either output. :meth:`similarity_model` is a module mapping images to ``h`` for
    :class:`~dreamood.evaluation.OODEvaluator` (with :func:`~dreamood.evaluation.max_logit_score` it scores
    ``max_i h_i`` without input pre-processing; :class:`GODIN` adds the pre-processing).

    Args:
        backbone: Module mapping images to features ``(N, feature_dim)``.
        num_classes: Number of classes.
        feature_dim: Width of the backbone's features; defaults to ``backbone.feature_dim``.
        similarity: ``"cosine"`` (default), ``"inner"`` or ``"euclidean"``.
        seed: Seed of the head's initialisation.

    Attributes:
        backbone: The feature extractor.
        head: The :class:`GodinHead`.

    Raises:
        ValueError: ``feature_dim`` is missing and the backbone has no integer ``feature_dim``, or a setting is
            invalid.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        similarity: str = "cosine",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        feature_dim = resolve_feature_dim(backbone, feature_dim)
        self.backbone = backbone
        self.head = GodinHead(feature_dim, num_classes, similarity, seed=seed)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``(N, feature_dim)`` of ``images``.

        Raises:
            ValueError: The backbone's output does not have shape ``(N, feature_dim)``.
        """
        return backbone_features(self.backbone, images, self.feature_dim)

    def similarities(self, images: Tensor) -> Tensor:
        """The class similarities ``h`` ``(N, C)`` of ``images``."""
        return self.head.similarities(self.features(images))

    def decompose(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(h (N, C), g (N,))`` of ``images``."""
        return self.head.decompose(self.features(images))

    def forward(self, images: Tensor) -> Tensor:
        """Quotient logits ``h / g`` ``(N, C)`` of ``images``."""
        logits: Tensor = self.head(self.features(images))
        return logits

    def similarity_model(self) -> nn.Module:
        """A module sharing this classifier's weights that maps images to the similarities ``h`` ``(N, C)``.

        Returns:
            The module; putting it in ``eval()`` mode puts this classifier in ``eval()`` mode too.
        """
        return _Similarities(self)


class _Similarities(nn.Module):
    def __init__(self, classifier: GodinClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.similarities(images)


def train_godin(
    model: GodinClassifier,
    id_loader: Iterable[Any],
    config: TrainingConfig,
    *,
    device: str | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    init_checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fingerprint: str | None = None,
) -> TrainingResult:
    """Train a :class:`GodinClassifier` with cross-entropy on its quotient logits, without weight decay on ``h``.

    Hsu et al., CVPR 2020 (Sec. 3.1 and 4): the class weights of ``h`` get no weight decay; every other
    parameter gets ``config.weight_decay``. This is :func:`~dreamood.training.train_classifier` with
    ``no_weight_decay=model.head.h_parameters()``, so its optimiser, schedule and options (AMP, checkpoints,
    ``resume``, ``torchrun``) apply.

    Args:
        model: The classifier.
        id_loader: ``(images, labels)`` batches of the ID training set.
        config: The hyper-parameters (:class:`~dreamood.training.TrainingConfig`).
        device: Device to train on; ``None``/``"auto"`` picks CUDA when available.
        seed: Seed of the training loop's own randomness.
        output_dir: Folder for ``checkpoint.pt`` and ``metrics.json``; ``None`` writes nothing.
        resume: Continue from ``output_dir/checkpoint.pt`` when it exists.
        init_checkpoint: Weights to start from when not resuming.
        progress: Show a progress bar.
        fingerprint: What identifies the training's data and settings; a checkpoint written with another one
            is not resumed (see :func:`~dreamood.training.train_classifier`).

    Returns:
        The per-epoch history.

    Raises:
        TypeError: ``model`` is not a :class:`GodinClassifier` or ``config`` not a
            :class:`~dreamood.training.TrainingConfig`.
        ValueError: See :func:`~dreamood.training.train_classifier`.
    """
    if not isinstance(model, GodinClassifier):
        raise TypeError(f"model must be a GodinClassifier, got {type(model).__name__}")
    return train_classifier(
        model,
        id_loader,
        config,
        no_weight_decay=model.head.h_parameters(),
        device=device,
        seed=seed,
        output_dir=output_dir,
        resume=resume,
        init_checkpoint=init_checkpoint,
        progress=progress,
        fingerprint=fingerprint,
    )


class GODIN(Detector):
    """GODIN's score ``max_i h_i(x')`` of the pre-processed input ``x'``; higher = more ID.

    Hsu et al., CVPR 2020 (Sec. 3.2): ``x' = x + epsilon * sign(grad_x max_i h_i(x))`` (the paper writes it as
    ``x - epsilon * sign(-grad_x S(x))``), and :meth:`fit` chooses ``epsilon`` from ``epsilons`` as the value
    whose mean score over ID validation images is largest (no OOD data is used). As with
    :class:`~dreamood.detectors.ODIN`, the perturbation lives in the space of the model's inputs (normalised
    units when the model takes normalised images); input components whose gradient is exactly zero stay put.

    The model runs in eval mode while scoring and every module's mode is restored afterwards; gradients are
    taken with respect to the inputs only, so no ``.grad`` is left on the model.

    Example:
        >>> detector = GODIN(model).fit(validation_images)  # doctest: +SKIP
        >>> report = OODEvaluator(detector).evaluate(id_test_loader, ood_loaders)  # doctest: +SKIP

    Args:
        model: A :class:`GodinClassifier` (its similarities ``h`` are used) or any callable mapping inputs to
            the similarities ``h`` ``(N, C)``.
        epsilons: Candidate perturbation magnitudes (each ``>= 0``).
        batch_size: Images per forward pass in :meth:`fit` when it gets a tensor.
        device: Where the model runs (``None``: the device of its first parameter, else of the batch).

    Attributes:
        epsilon_: The chosen magnitude (after :meth:`fit`).
        validation_scores_: Mean ID validation score of each candidate, ``{epsilon: score}``.

    Raises:
        TypeError: ``model`` is not callable.
        ValueError: ``epsilons`` is empty or holds a negative or non-finite value.
    """

    inputs = "images"
    reference = _REFERENCE

    epsilon_: float
    validation_scores_: dict[float, float]

    def __init__(
        self,
        model: GodinClassifier | Callable[[Tensor], Tensor],
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        *,
        batch_size: int = 256,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(device)
        if not callable(model):
            raise TypeError(f"model must be a GodinClassifier or a callable, got {type(model).__name__}")
        values = [float(e) for e in epsilons]
        if not values:
            raise ValueError("epsilons is empty: give at least one perturbation magnitude")
        for value in values:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"epsilons must be finite numbers >= 0, got {value!r}")
        check_positive_int(batch_size, "batch_size")
        self.model = model
        self.epsilons = tuple(values)
        self.batch_size = batch_size

    def _params(self) -> dict[str, object]:
        return {"epsilons": self.epsilons, "batch_size": self.batch_size, **super()._params()}

    def fit(self, x: Tensor | Iterable[Any], labels: Tensor | None = None) -> Self:
        """Choose ``epsilon_``: the candidate with the largest mean score on ID validation images.

        Args:
            x: ID validation images ``(N, ...)``, or an iterable of batches (images or ``(images, labels)``).
            labels: Ignored (the selection uses no labels).

        Returns:
            ``self``.

        Raises:
            ValueError: ``x`` holds no image, or the model's outputs are malformed.
            NonFiniteError: An image or a score is NaN or infinite.
        """
        self._reset()
        batches = _batches(x, self.batch_size)
        totals = dict.fromkeys(self.epsilons, 0.0)
        count = 0
        for batch in batches:
            for epsilon in self.epsilons:
                totals[epsilon] += float(self._scores(batch, epsilon).double().sum())
            count += batch.shape[0]
        if count == 0:
            raise ValueError("x holds no validation image")
        means = {epsilon: total / count for epsilon, total in totals.items()}
        self.validation_scores_ = means
        # The first maximum wins, so ties go to the smaller magnitude (the grid is given in increasing order).
        self.epsilon_ = max(self.epsilons, key=lambda e: means[e])
        return self

    def score(self, x: Tensor) -> Tensor:
        """Score a batch of model inputs with the chosen ``epsilon_``.

        Args:
            x: Inputs ``(N, ...)`` as the model takes them.

        Returns:
            Scores ``(N,)`` on the device of ``x``.

        Raises:
            NotFittedError: :meth:`fit` was not called.
            TypeError: ``x`` is not floating point.
            ValueError: The model does not return ``(N, C)`` similarities.
            NonFiniteError: ``x`` or the scores hold NaN or infinity.
        """
        self._check_fitted("epsilon_")
        x = _check_images(x, "x")
        return finish_scores(self._scores(x, self.epsilon_), x, "GODIN")

    def _similarity_fn(self) -> Callable[[Tensor], Tensor]:
        if isinstance(self.model, GodinClassifier):
            return self.model.similarities
        return self.model

    def _model_device(self, x: Tensor) -> torch.device:
        if self.device is not None:
            return self._compute_device(x)
        if isinstance(self.model, nn.Module):
            for parameter in self.model.parameters():
                return parameter.device
        return x.device

    def _scores(self, x: Tensor, epsilon: float) -> Tensor:
        """``max_i h_i`` of ``x`` moved by ``epsilon`` along the sign of the score's input gradient."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
        similarity = self._similarity_fn()
        x = x.detach().to(self._model_device(x))
        try:
            if isinstance(model, nn.Module):
                model.eval()
            if epsilon > 0:
                with torch.enable_grad():
                    x_grad = x.clone().requires_grad_(True)
                    # Samples are independent in eval mode, so the gradient of the sum is per sample.
                    total = _max_similarity(similarity(x_grad), x.shape[0]).sum()
                    (gradient,) = torch.autograd.grad(total, x_grad)
                x = x + epsilon * gradient.sign()
            with torch.no_grad():
                return _max_similarity(similarity(x), x.shape[0])
        finally:
            for module, training in modes:
                module.training = training


def _max_similarity(h: Tensor, rows: int) -> Tensor:
    if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[0] != rows:
        shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"model must return similarities of shape (N, C) with N = {rows}, got {shape}")
    check_finite(h, "model output")
    return h.amax(dim=1)


def _check_images(x: Any, name: str) -> Tensor:
    images = as_tensor(x, name)
    check_floating(images, name)
    if images.dim() < 2:
        raise ValueError(f"{name} must be a batch (N, ...), got shape {tuple(images.shape)}")
    check_finite(images, name)
    return images


def _batches(x: Tensor | Iterable[Any], batch_size: int) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        images = _check_images(x, "x")
        return list(torch.split(images, batch_size))
    if not isinstance(x, Iterable):
        raise TypeError(f"x must be a tensor of images or an iterable of batches, got {type(x).__name__}")
    return (_check_images(b[0] if isinstance(b, (tuple, list)) else b, "x batch") for b in x)
