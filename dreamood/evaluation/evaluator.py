"""Evaluate an OOD detector on an ID test set against named OOD test sets.

The evaluator combines two plain callables: an optional ``model`` (images -> logits or features) and a
``scorer`` (the model's outputs -> one score per sample, higher = more in-distribution). A scorer can be a
function such as :func:`~dreamood.evaluation.scores.energy_score` or any object with a ``.score`` method (a
fitted detector). Without a model the scorer receives the loader's batches directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike, make_generator, progress, resolve_device
from dreamood._validation import as_tensor, check_choice, check_positive_int
from dreamood.detectors.base import eval_mode
from dreamood.evaluation.metrics import (
    METRIC_NAMES,
    OPTIONAL_METRIC_NAMES,
    FprRule,
    _as_scores,
    _check_fpr_rule,
    _check_same_dtype,
    _check_tpr,
    _compute,
)
from dreamood.evaluation.report import OODReport, OODReportRow
from dreamood.protocols import Scorer

__all__ = ["PROTOCOLS", "OODEvaluator", "SupportsScore"]

PROTOCOLS: tuple[str, ...] = ("full", "paper")
"""Evaluation protocols: every OOD sample, or the paper's subsampling to 1/5 of the ID test size."""


@runtime_checkable
class SupportsScore(Protocol):
    """An object with a ``score`` method mapping a batch to scores of shape ``(N,)`` (higher = more ID)."""

    def score(self, inputs: Tensor, /) -> Tensor:
        """Score a batch.

        Args:
            inputs: A batch of images, logits or features.

        Returns:
            Scores of shape ``(N,)``.
        """
        ...


def _split_batch(batch: Any) -> tuple[Tensor, Any]:
    """Return ``(inputs, labels)`` of a loader batch: ``images`` or ``(images, labels, ...)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(
        f"a loader batch must be a tensor of images or a (images, labels) tuple, got {type(batch).__name__}"
    )


def _module_device(module: Any) -> torch.device | None:
    if isinstance(module, nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return None


def _accuracy(logits: Tensor, labels: Any, name: str) -> tuple[int, int]:
    """Return ``(correct, total)`` of top-1 predictions of ``logits`` against integer ``labels``."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"{name} must be class logits of shape (N, C) with C >= 2 to measure ID accuracy, got shape "
            f"{tuple(logits.shape)}; pass accuracy=False when the model returns features"
        )
    target = as_tensor(labels, "labels").to(logits.device)
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match {name}, got shape {tuple(target.shape)}"
        )
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {target.dtype}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} classes, got values in "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    return int((logits.argmax(dim=1) == target).sum()), int(target.numel())


class OODEvaluator:
    """Evaluate OOD scores of an ID test set against named OOD sets: FPR95 (both conventions), AUROC, AUPR.

    Metrics follow :func:`~dreamood.evaluation.ood_metrics`; DREAM-OOD (Du et al., NeurIPS 2023) reports FPR95
    with ID as the positive class, AUROC and ID accuracy per OOD set and their mean.

    Two protocols:

    * ``"full"``: every OOD sample is scored once.
    * ``"paper"``: as in the DREAM-OOD / VOS / NPOS evaluation code, each OOD set is subsampled (without
      replacement) to ``m = n_id // 5`` scores (all of them when the set is smaller), ``repeats`` times, and the
      report holds the mean and the population std over the repeats (``sample_size`` sets another ``m``). For
      each OOD set a fresh ``torch.Generator`` seeded with ``seed`` draws ``torch.randperm(n_ood,
      generator=g)[:m]`` once per repeat, so a set's subsamples do not depend on the other sets. Scoring the
      whole set once and subsampling the scores is equivalent to subsampling the images, since the scorer is
      deterministic.

    Example:
        >>> evaluator = OODEvaluator(energy_score, model=classifier, device="cuda")  # doctest: +SKIP
        >>> report = evaluator.evaluate(id_test_loader, {"SVHN": svhn_loader, "Textures": dtd_loader})  # doctest: +SKIP
        >>> print(report.to_markdown())  # doctest: +SKIP

    Args:
        scorer: Maps a batch (the model's outputs, or the loader's images without a model) to scores of shape
            ``(N,)``, higher = more in-distribution: an object with a ``.score`` method (used when present) or a
            callable. Scorers that need input gradients (ODIN) must enable them themselves with
            ``torch.enable_grad()``; the evaluator runs under ``torch.no_grad()``.
        model: Optional callable mapping images to logits (or features). Modules are put in ``eval()`` mode
            during :meth:`evaluate` and restored afterwards; the evaluator does not move them.
        accuracy: Measure top-1 ID accuracy from the model's outputs when the ID loader yields labels. Set it to
            ``False`` when ``model`` returns features rather than logits.
        protocol: ``"full"`` or ``"paper"`` (see above).
        repeats: Number of subsamples per OOD set for the ``"paper"`` protocol.
        seed: Seed of the ``"paper"`` protocol's subsampling.
        tpr: TPR level of the FPR metrics, in ``(0, 1]``.
        fpr_rule: Threshold rule of the FPR metrics: ``"exact"`` (default; the first ROC point whose TPR reaches
            ``tpr``) or ``"nearest"`` (the ROC point whose TPR is nearest to ``tpr``, as the DREAM-OOD reference
            code computes it); see :func:`~dreamood.evaluation.ood_metrics`.
        aupr_trapezoid: Also report the AUPRs by the trapezoid rule (``aupr_in_trapezoid``,
            ``aupr_out_trapezoid``, the AUPR of pytorch-ood and OpenOOD) beside the step-wise ones.
        device: Where batches are sent. ``None`` uses the device of the model's (or a module scorer's) first
            parameter, else CUDA when available; ``"auto"`` means CUDA when available.
        progress: Show a progress bar per loader.
        sample_size: Size ``m`` of each OOD subsample of the ``"paper"`` protocol; ``None`` takes ``n_id // 5``.
            The authors' ImageNet-100 code cuts a fifth of its 5,000 ID test images to whole batches of 160: 960.

    Raises:
        TypeError: ``scorer`` or ``model`` is not callable, or ``repeats``/``seed``/``sample_size`` is not an int.
        ValueError: ``protocol`` or ``fpr_rule`` is unknown, ``repeats`` or ``sample_size`` < 1, or ``tpr`` is outside
            ``(0, 1]``.
    """

    def __init__(
        self,
        scorer: Scorer | SupportsScore,
        *,
        model: Callable[[Tensor], Tensor] | None = None,
        accuracy: bool = True,
        protocol: str = "full",
        repeats: int = 5,
        seed: int = 0,
        tpr: float = 0.95,
        device: DeviceLike = None,
        progress: bool = True,
        sample_size: int | None = None,
        fpr_rule: FprRule = "exact",
        aupr_trapezoid: bool = False,
    ) -> None:
        if not isinstance(scorer, SupportsScore) and not callable(scorer):
            raise TypeError(f"scorer must be callable or have a .score method, got {type(scorer).__name__}")
        if model is not None and not callable(model):
            raise TypeError(f"model must be callable (images -> logits), got {type(model).__name__}")
        check_choice(protocol, PROTOCOLS, "protocol")
        check_positive_int(repeats, "repeats")
        check_positive_int(seed, "seed", allow_zero=True)
        _check_tpr(tpr)
        _check_fpr_rule(fpr_rule)
        self.scorer = scorer
        self.model = model
        self.accuracy = accuracy
        self.protocol = protocol
        self.repeats = repeats
        self.seed = seed
        self.tpr = tpr
        self.device = device
        self.progress = progress
        if sample_size is not None:
            check_positive_int(sample_size, "sample_size")
        self.sample_size = sample_size
        self.fpr_rule: FprRule = fpr_rule
        self.aupr_trapezoid = aupr_trapezoid

    # ---- scoring ------------------------------------------------------------------------------------------

    def _score_fn(self) -> Callable[[Tensor], Tensor]:
        if isinstance(self.scorer, SupportsScore):
            return self.scorer.score
        return self.scorer

    def _resolve_device(self) -> torch.device:
        if self.device is not None:
            return resolve_device(self.device)
        for obj in (self.model, self.scorer):
            inferred = _module_device(obj)
            if inferred is not None:
                return inferred
        return resolve_device(None)

    def _run(self, loader: Iterable[Any], desc: str, with_accuracy: bool) -> tuple[Tensor, tuple[int, int] | None]:
        """Score every batch of ``loader``; return the scores (CPU) and ``(correct, total)`` when measured."""
        device = self._resolve_device()
        score_fn = self._score_fn()
        total = len(loader) if isinstance(loader, Sized) else None
        chunks: list[Tensor] = []
        correct = seen = 0
        measured = False
        for batch in progress(loader, enabled=self.progress, desc=desc, total=total):
            inputs, labels = _split_batch(batch)
            inputs = inputs.to(device)
            outputs = self.model(inputs) if self.model is not None else inputs
            scores = as_tensor(score_fn(outputs), "scorer output")
            if scores.dim() != 1 or scores.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"the scorer must return one score per sample, shape ({inputs.shape[0]},), got shape "
                    f"{tuple(scores.shape)}"
                )
            chunks.append(scores.detach().cpu())
            if with_accuracy and labels is not None:
                batch_correct, batch_total = _accuracy(outputs, labels, "model outputs")
                correct, seen, measured = correct + batch_correct, seen + batch_total, True
        if not chunks:
            raise ValueError(f"the loader for {desc!r} yielded no batches")
        return torch.cat(chunks), ((correct, seen) if measured else None)

    def compute_scores(self, loader: Iterable[Any], *, desc: str = "scoring") -> Tensor:
        """Score every sample of ``loader`` (batched, under ``torch.no_grad()``, on the chosen device).

        Args:
            loader: Iterable of batches: image tensors or ``(images, labels)`` tuples (labels are ignored).
            desc: Label of the progress bar.

        Returns:
            Scores of shape ``(N,)`` on the CPU, in loader order.

        Raises:
            TypeError: A batch is neither a tensor nor a tuple starting with one.
            ValueError: The loader is empty or the scorer does not return one score per sample.
        """
        with torch.no_grad(), eval_mode(self.model, self.scorer):
            scores, _ = self._run(loader, desc, with_accuracy=False)
        return scores

    # ---- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, id_loader: Iterable[Any], ood_loaders: Mapping[str, Iterable[Any]]) -> OODReport:
        """Score the ID test loader and every OOD loader, then compute the report.

        Args:
            id_loader: ID test batches: images or ``(images, labels)``; labels give the ID accuracy when a model
                is set and ``accuracy`` is true.
            ood_loaders: OOD test loaders by name, for example ``{"SVHN": svhn_loader}``; labels are ignored.

        Returns:
            The report, with ``id_accuracy`` set when it could be measured.

        Raises:
            TypeError: ``ood_loaders`` is not a mapping or a batch has an unexpected form.
            ValueError: A loader is empty, the scorer's output has the wrong shape, or the model's outputs
                cannot be read as logits for the accuracy.
            NonFiniteError: The scorer produced NaN or infinite scores (the message names the set).
        """
        _check_names(ood_loaders, "ood_loaders")
        with_accuracy = self.accuracy and self.model is not None
        with torch.no_grad(), eval_mode(self.model, self.scorer):
            id_scores, counts = self._run(id_loader, "scoring ID", with_accuracy)
            ood_scores = {name: self._run(loader, f"scoring {name}", False)[0] for name, loader in ood_loaders.items()}
        id_accuracy = None if counts is None or counts[1] == 0 else counts[0] / counts[1]
        return self._report(_as_scores(id_scores, "id_scores"), ood_scores, id_accuracy)

    def evaluate_scores(
        self,
        id_scores: Any,
        ood_scores: Mapping[str, Any],
        *,
        id_logits: Any = None,
        id_labels: Any = None,
    ) -> OODReport:
        """Compute the report from precomputed scores (and optionally ID logits and labels for the accuracy).

        Args:
            id_scores: Scores of the ID test set, shape ``(N_id,)`` (tensor, NumPy array or sequence).
            ood_scores: Scores of each OOD set by name, each of shape ``(N_ood,)`` and the dtype of ``id_scores``.
            id_logits: ID test logits of shape ``(N_id, C)``; give them together with ``id_labels``.
            id_labels: ID test labels of shape ``(N_id,)``, integers in ``[0, C)``.

        Returns:
            The report, with ``id_accuracy`` set when logits and labels are given.

        Raises:
            TypeError: ``ood_scores`` is not a mapping, or an array has the wrong type.
            ValueError: An array is empty, has the wrong shape or dtype, only one of ``id_logits`` and
                ``id_labels`` is given, or a label is out of range.
            NonFiniteError: A score array holds NaN or infinite values (the message names the set).
        """
        _check_names(ood_scores, "ood_scores")
        if (id_logits is None) != (id_labels is None):
            raise ValueError("give id_logits and id_labels together to measure ID accuracy, or neither")
        id_tensor = _as_scores(id_scores, "id_scores")
        id_accuracy = None
        if id_logits is not None:
            logits = as_tensor(id_logits, "id_logits").detach().cpu()
            if logits.dim() >= 1 and logits.shape[0] != id_tensor.shape[0]:
                raise ValueError(f"id_logits has {logits.shape[0]} rows but id_scores has {id_tensor.shape[0]} scores")
            correct, total = _accuracy(logits, id_labels, "id_logits")
            id_accuracy = correct / total
        return self._report(id_tensor, ood_scores, id_accuracy)

    def _report(self, id_tensor: Tensor, ood_scores: Mapping[str, Any], id_accuracy: float | None) -> OODReport:
        """Metrics of every OOD set against the validated ID scores ``id_tensor``, per the protocol."""
        n_id = id_tensor.shape[0]
        repeats = self.repeats if self.protocol == "paper" else 1
        sample_size = n_id // 5 if self.sample_size is None else self.sample_size
        if self.protocol == "paper" and sample_size == 0:
            raise ValueError(
                f"the paper protocol subsamples OOD sets to n_id // 5 scores; it needs n_id >= 5, got {n_id}"
            )

        names = self.metric_names
        rows: list[OODReportRow] = []
        values = np.empty((len(ood_scores), repeats, len(names)), dtype=np.float64)
        for set_index, (name, scores) in enumerate(ood_scores.items()):
            label = f"ood_scores[{name!r}]"
            ood_tensor = _as_scores(scores, label)
            _check_same_dtype(id_tensor, ood_tensor, "id_scores", label)
            subsets = self._subsets(ood_tensor, sample_size) if self.protocol == "paper" else [ood_tensor]
            for repeat, subset in enumerate(subsets):
                metrics = _compute(id_tensor, subset, self.tpr, self.fpr_rule)
                values[set_index, repeat] = [getattr(metrics, metric) for metric in names]
            rows.append(self._row(name, values[set_index], n_ood=subsets[0].shape[0]))
        mean = self._row("Mean", values.mean(axis=0), n_ood=None)
        return OODReport(
            rows=tuple(rows),
            mean=mean,
            n_id=n_id,
            tpr=float(self.tpr),
            protocol=self.protocol,
            repeats=repeats,
            seed=self.seed if self.protocol == "paper" else None,
            id_accuracy=id_accuracy,
            fpr_rule=self.fpr_rule,
        )

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics of the reports: :data:`~dreamood.evaluation.metrics.METRIC_NAMES`, then the trapezoid
        AUPRs when ``aupr_trapezoid`` is true."""
        return METRIC_NAMES + (OPTIONAL_METRIC_NAMES if self.aupr_trapezoid else ())

    def _subsets(self, ood_scores: Tensor, sample_size: int) -> list[Tensor]:
        """The ``repeats`` random subsets of one OOD set for the paper protocol."""
        n_ood = ood_scores.shape[0]
        if n_ood <= sample_size:
            return [ood_scores] * self.repeats
        generator = make_generator(self.seed, "cpu")
        return [ood_scores[torch.randperm(n_ood, generator=generator)[:sample_size]] for _ in range(self.repeats)]

    def _row(self, name: str, values: np.ndarray[Any, Any], n_ood: int | None) -> OODReportRow:
        """A report row from per-repeat metric values of shape ``(repeats, n_metrics)``."""
        names = self.metric_names
        metrics = {metric: float(values[:, i].mean()) for i, metric in enumerate(names)}
        std = None
        if self.protocol == "paper":
            std = {metric: float(values[:, i].std()) for i, metric in enumerate(names)}
        return OODReportRow(name=name, metrics=metrics, std=std, n_ood=n_ood)


def _check_names(mapping: Any, name: str) -> None:
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{name} must be a mapping from OOD set name to data, e.g. {{'SVHN': ...}}, got {type(mapping).__name__}"
        )
    if not mapping:
        raise ValueError(f"{name} is empty: give at least one OOD set")
    for key in mapping:
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{name} keys must be non-empty strings naming the OOD sets, got {key!r}")
