"""OOD detection metrics: FPR at a TPR level (both conventions), AUROC, AUPR-In and AUPR-Out.

Every score is *higher = more in-distribution*. All metrics are computed exactly from integer counts over the
distinct score values (float64 only for the final ratios), so tied scores are handled the way scikit-learn
handles them: a tie between an ID and an OOD sample counts 1/2 towards the AUROC.

Where libraries define a metric differently, both definitions are available under distinct names: the AUPRs as
step-wise average precision (``aupr_in``, ``aupr_out``, the default) and as the trapezoid rule
(``aupr_in_trapezoid``, ``aupr_out_trapezoid``, pytorch-ood and OpenOOD), and the FPR threshold as the exact
first ROC point reaching the TPR level (``fpr_rule="exact"``, the default) or as the point whose TPR is nearest
to it (``fpr_rule="nearest"``, the DREAM-OOD / VOS / NPOS reference code).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from dreamood._validation import as_tensor, check_finite

__all__ = [
    "FPR_RULES",
    "METRIC_NAMES",
    "OPTIONAL_METRIC_NAMES",
    "FprRule",
    "OODMetricAccumulator",
    "OODMetrics",
    "ood_metrics",
]

METRIC_NAMES: tuple[str, ...] = ("fpr95", "fpr95_ood_positive", "auroc", "aupr_in", "aupr_out")
"""Names of the metric fields of :class:`OODMetrics` that every report shows, in report order."""

OPTIONAL_METRIC_NAMES: tuple[str, ...] = ("aupr_in_trapezoid", "aupr_out_trapezoid")
"""Further metric fields of :class:`OODMetrics` that a report shows on request (the AUPRs by the trapezoid rule)."""

FprRule = Literal["exact", "nearest"]
"""How the FPR threshold is chosen: ``"exact"`` (the first ROC point whose TPR reaches the level) or
``"nearest"`` (the ROC point whose TPR is nearest to the level, as the DREAM-OOD reference code does)."""

FPR_RULES: tuple[str, ...] = get_args(FprRule)
"""The accepted values of ``fpr_rule``."""


@dataclass(frozen=True)
class OODMetrics:
    """OOD detection metrics of one ID/OOD score pair, as fractions in ``[0, 1]``.

    Attributes:
        fpr95: ID positive (the DREAM-OOD paper's convention): fraction of OOD samples accepted as ID at the
            threshold that keeps ``tpr`` of the ID samples. Lower is better.
        fpr95_ood_positive: OOD positive (the OpenOOD v1.5 convention): fraction of ID samples rejected as OOD
            at the threshold that catches ``tpr`` of the OOD samples. Lower is better.
        auroc: Area under the ROC curve; ties between an ID and an OOD score count 1/2. Higher is better.
        aupr_in: Average precision with ID as the positive class (scikit-learn's ``average_precision_score``):
            the precision at each threshold weighted by the recall gained there (a step function).
        aupr_out: Average precision with OOD as the positive class and the scores negated.
        aupr_in_trapezoid: Area under the precision-recall curve with ID positive by the trapezoid rule,
            ``sklearn.metrics.auc(recall, precision)`` of ``precision_recall_curve``, the AUPR of pytorch-ood and
            OpenOOD. It interpolates linearly between operating points, which overstates the precision
            between them; it differs from ``aupr_in`` by a few hundredths, more with tied scores.
        aupr_out_trapezoid: The same with OOD positive and the scores negated.
        tpr: The true-positive-rate level used for both FPR fields (0.95 gives FPR95).
        n_id: Number of ID scores.
        n_ood: Number of OOD scores.
        fpr_rule: How the FPR thresholds were chosen, ``"exact"`` or ``"nearest"`` (see :func:`ood_metrics`).
    """

    fpr95: float
    fpr95_ood_positive: float
    auroc: float
    aupr_in: float
    aupr_out: float
    aupr_in_trapezoid: float
    aupr_out_trapezoid: float
    tpr: float
    n_id: int
    n_ood: int
    fpr_rule: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict.

        Returns:
            A dict mapping every field name to its value.
        """
        return asdict(self)


def _as_scores(value: Any, name: str) -> Tensor:
    """Convert ``value`` to a detached 1-D CPU tensor of finite real scores, keeping its dtype."""
    if not isinstance(value, Tensor):
        import numpy as np

        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a tensor or an array of scores, got {type(value).__name__}") from error
    # Check the rank before converting: as_tensor turns a 0-d NumPy array into shape (1,).
    if value.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores with shape (N,), got shape {tuple(value.shape)}")
    tensor = as_tensor(value, name).detach().cpu()
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold real-valued scores, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty: at least one score is needed")
    check_finite(tensor, name)
    return tensor


def _check_tpr(tpr: float) -> None:
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")


def _check_fpr_rule(fpr_rule: str) -> None:
    if fpr_rule not in FPR_RULES:
        raise ValueError(f"fpr_rule must be one of {', '.join(repr(r) for r in FPR_RULES)}, got {fpr_rule!r}")


def _required_count(tpr: float, n: int) -> int:
    """Smallest count ``k`` with ``k / n >= tpr``, exact for decimal ``tpr`` such as 0.95 (no float round-off)."""
    return max(1, math.ceil(Fraction(repr(float(tpr))) * n))


def _curve(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (true, false) positive counts at each distinct threshold, thresholds in decreasing order.

    Entry ``j`` counts the samples with ``score >= t_j``, where ``t_j`` is the ``j``-th largest distinct score.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    tp = torch.cumsum(positive[order].to(torch.int64), dim=0)
    fp = torch.arange(1, scores.numel() + 1, dtype=torch.int64) - tp
    # The last sample of each run of equal scores closes that threshold's group.
    group_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    group_end[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return tp[group_end], fp[group_end]


def _fpr_at_tpr(tp: Tensor, fp: Tensor, n_pos: int, n_neg: int, tpr: float) -> float:
    """FPR at the first (largest) threshold whose TPR reaches ``tpr``."""
    needed = torch.tensor([_required_count(tpr, n_pos)], dtype=torch.int64)
    index = int(torch.searchsorted(tp, needed, side="left"))
    return int(fp[index]) / n_neg


def _fpr_at_nearest_tpr(tp: Tensor, fp: Tensor, n_pos: int, n_neg: int, tpr: float) -> float:
    """FPR at the ROC point whose TPR is nearest to ``tpr``: the rule of ``fpr_and_fdr_at_recall``.

    That function (the evaluation code of Hendrycks et al.'s outlier exposure, reused by DREAM-OOD, VOS and NPOS)
    walks the curve from the first point of full TPR towards higher thresholds and takes the first minimum of
    ``|TPR - tpr|`` in float64, so equal distances go to the lower threshold. (It also appends a point
    (TPR 1, FPR 0) after the walk; that point can never be chosen, since the walk starts at a point of TPR 1.)
    """
    last = int(torch.searchsorted(tp, torch.tensor([n_pos], dtype=torch.int64), side="left"))
    distance = (tp[: last + 1].to(torch.float64) / n_pos - tpr).abs().flip(0)
    return int(fp[last - int(torch.argmin(distance))]) / n_neg


def _trapezoid_aupr(tp: Tensor, fp: Tensor, n_pos: int) -> float:
    """``sklearn.metrics.auc(recall, precision)`` of ``precision_recall_curve``: trapezoids from (0, 1) onwards."""
    tp64 = tp.to(torch.float64)
    recall = torch.cat([tp64.new_zeros(1), tp64 / n_pos])
    precision = torch.cat([tp64.new_ones(1), tp64 / (tp64 + fp.to(torch.float64))])
    return float((torch.diff(recall) * (precision[1:] + precision[:-1]) / 2).sum())


def _average_precision(tp: Tensor, fp: Tensor, n_pos: int) -> float:
    """Sum over thresholds of (recall increase) x (precision), as scikit-learn's ``average_precision_score``."""
    tp64 = tp.to(torch.float64)
    recall_step = torch.diff(tp64, prepend=tp64.new_zeros(1)) / n_pos
    precision = tp64 / (tp64 + fp.to(torch.float64))
    return float((recall_step * precision).sum())


def _compute(id_scores: Tensor, ood_scores: Tensor, tpr: float, fpr_rule: str = "exact") -> OODMetrics:
    n_id, n_ood = id_scores.numel(), ood_scores.numel()
    scores = torch.cat([id_scores, ood_scores]).to(torch.float64)
    is_id = torch.cat([torch.ones(n_id, dtype=torch.bool), torch.zeros(n_ood, dtype=torch.bool)])

    tp, fp = _curve(scores, is_id)  # ID positive, accept as ID when score >= threshold
    tp_out, fp_out = _curve(-scores, ~is_id)  # OOD positive, flag as OOD when score <= threshold

    # Trapezoids under the ROC curve in integer counts: exact, and ties count 1/2.
    tp0 = torch.cat([tp.new_zeros(1), tp])
    fp0 = torch.cat([fp.new_zeros(1), fp])
    twice_area = int(((fp0[1:] - fp0[:-1]) * (tp0[1:] + tp0[:-1])).sum())

    fpr_at = _fpr_at_tpr if fpr_rule == "exact" else _fpr_at_nearest_tpr
    return OODMetrics(
        fpr95=fpr_at(tp, fp, n_id, n_ood, tpr),
        fpr95_ood_positive=fpr_at(tp_out, fp_out, n_ood, n_id, tpr),
        auroc=twice_area / (2 * n_id * n_ood),
        aupr_in=_average_precision(tp, fp, n_id),
        aupr_out=_average_precision(tp_out, fp_out, n_ood),
        aupr_in_trapezoid=_trapezoid_aupr(tp, fp, n_id),
        aupr_out_trapezoid=_trapezoid_aupr(tp_out, fp_out, n_ood),
        tpr=float(tpr),
        n_id=n_id,
        n_ood=n_ood,
        fpr_rule=fpr_rule,
    )


def _check_same_dtype(id_scores: Tensor, ood_scores: Tensor, id_name: str, ood_name: str) -> None:
    if id_scores.dtype != ood_scores.dtype:
        raise ValueError(
            f"{id_name} and {ood_name} must have the same dtype so that equal scores compare equal, got "
            f"{id_scores.dtype} and {ood_scores.dtype}; compute both with the same scorer or cast one of them"
        )


def ood_metrics(id_scores: Any, ood_scores: Any, *, tpr: float = 0.95, fpr_rule: FprRule = "exact") -> OODMetrics:
    """Compute FPR at ``tpr`` (both conventions), AUROC, AUPR-In and AUPR-Out from ID and OOD scores.

    Scores are *higher = more in-distribution*. With ``k_id = ceil(tpr * n_id)`` and
    ``k_ood = ceil(tpr * n_ood)`` (``tpr`` read as the decimal it prints as, so 0.95 * 20 is exactly 19):

    * ``fpr95`` (ID positive, the DREAM-OOD paper): the threshold ``t`` is the ``k_id``-th largest ID score; a
      sample is accepted as ID when ``score >= t``, so at least ``tpr`` of the ID samples are kept.
      ``fpr95`` is the fraction of OOD scores ``>= t``.
    * ``fpr95_ood_positive`` (OpenOOD v1.5): the threshold ``t'`` is the ``k_ood``-th smallest OOD score; a
      sample is flagged as OOD when ``score <= t'``, so at least ``tpr`` of the OOD samples are caught.
      ``fpr95_ood_positive`` is the fraction of ID scores ``<= t'``.

    Ties are deterministic: a sample whose score equals the threshold is on the positive side (kept as ID in
    the first rule, flagged as OOD in the second). Both rules give the operating point of the ROC curve with
    the lowest FPR among those whose TPR reaches ``tpr`` (the first point with ``tpr_curve >= tpr`` of
    scikit-learn's ``roc_curve(..., drop_intermediate=False)``; OpenOOD keeps the default
    ``drop_intermediate=True``, which can drop that point when it is collinear with its neighbours).
    AUROC counts a tie between an ID and an OOD score as 1/2; the AUPRs equal scikit-learn's
    ``average_precision_score`` (ID positive with the scores, OOD positive with the negated scores), and the
    ``*_trapezoid`` AUPRs equal ``sklearn.metrics.auc(recall, precision)`` (pytorch-ood, OpenOOD).

    ``fpr_rule="nearest"`` reproduces the evaluation code of DREAM-OOD (and of VOS, NPOS and outlier exposure,
    ``fpr_and_fdr_at_recall``): among the ROC points up to the first one with full TPR, the one whose TPR is
    nearest to ``tpr`` in float64, the lower threshold on a tie of distances. With tied scores the TPR can jump
    over ``tpr`` and that point may have a TPR *below* it (for example 0.9 instead of 1.0 for 10 ID samples),
    which gives a lower FPR than the exact rule.

    Args:
        id_scores: Scores of the ID test samples, shape ``(N_id,)``; a tensor (any device), a NumPy array or a
            sequence of numbers.
        ood_scores: Scores of the OOD test samples, shape ``(N_ood,)``, with the same dtype as ``id_scores``.
        tpr: True-positive-rate level of the FPR fields, in ``(0, 1]``.
        fpr_rule: ``"exact"`` (default) or ``"nearest"``, the threshold rule of both FPR fields.

    Returns:
        The metrics as fractions in ``[0, 1]``.

    Raises:
        TypeError: A score array is not numeric, or holds booleans or complex numbers.
        ValueError: A score array is empty or not 1-D, the two dtypes differ, ``tpr`` is outside ``(0, 1]`` or
            ``fpr_rule`` is unknown.
        NonFiniteError: A score array holds NaN or infinite values (the message counts them and names the side);
            a subclass of ``ValueError``.
    """
    _check_tpr(tpr)
    _check_fpr_rule(fpr_rule)
    id_tensor = _as_scores(id_scores, "id_scores")
    ood_tensor = _as_scores(ood_scores, "ood_scores")
    _check_same_dtype(id_tensor, ood_tensor, "id_scores", "ood_scores")
    return _compute(id_tensor, ood_tensor, tpr, fpr_rule)


class OODMetricAccumulator:
    """Collect ID and OOD scores batch by batch and compute :func:`ood_metrics` on all of them.

    Follows the torchmetrics pattern: :meth:`update` with each batch, :meth:`compute` at the end,
    :meth:`reset` to start again. Scores are stored detached on the CPU in their own dtype.

    Under ``torchrun`` (a ``torch.distributed`` process group is initialised with more than one process),
    :meth:`compute` gathers the scores of every process first, so each process computes the metrics of the whole
    evaluation set, not of its shard. It is then a collective call: every process must call it. Note that
    ``DistributedSampler`` pads the shards to equal length by repeating a few samples unless the dataset size is
    a multiple of the number of processes; shard the data without padding for exact metrics.

    Args:
        tpr: True-positive-rate level of the FPR fields, in ``(0, 1]``.
        fpr_rule: ``"exact"`` (default) or ``"nearest"``, see :func:`ood_metrics`.
        sync_on_compute: Gather the scores across processes in :meth:`compute` when a process group is
            initialised (no effect in a single process).

    Raises:
        ValueError: ``tpr`` is outside ``(0, 1]`` or ``fpr_rule`` is unknown.
    """

    def __init__(self, tpr: float = 0.95, *, fpr_rule: FprRule = "exact", sync_on_compute: bool = True) -> None:
        _check_tpr(tpr)
        _check_fpr_rule(fpr_rule)
        self.tpr = tpr
        self.fpr_rule = fpr_rule
        self.sync_on_compute = sync_on_compute
        self._id: list[Tensor] = []
        self._ood: list[Tensor] = []

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the scores seen so far, or ``None`` before the first batch."""
        first = self._id[:1] or self._ood[:1]
        return first[0].dtype if first else None

    def _add(self, scores: Any, name: str, store: list[Tensor]) -> None:
        tensor = _as_scores(scores, name)
        seen = self.dtype
        if seen is not None and tensor.dtype != seen:
            raise ValueError(
                f"{name} has dtype {tensor.dtype} but earlier batches have {seen}; give every batch the same dtype"
            )
        store.append(tensor)

    def update(self, *, id_scores: Any = None, ood_scores: Any = None) -> None:
        """Add a batch of ID scores, OOD scores, or both.

        Args:
            id_scores: ID scores of this batch, shape ``(B,)``, or ``None``.
            ood_scores: OOD scores of this batch, shape ``(B,)``, or ``None``.

        Raises:
            TypeError: A batch is not a numeric array.
            ValueError: A batch is empty, not 1-D, holds NaN or infinite values, or its dtype differs from
                the earlier batches.
        """
        if id_scores is not None:
            self._add(id_scores, "id_scores", self._id)
        if ood_scores is not None:
            self._add(ood_scores, "ood_scores", self._ood)

    def compute(self) -> OODMetrics:
        """Compute the metrics over every batch added since the last :meth:`reset` (on every process).

        Returns:
            The metrics of all accumulated scores, gathered across processes when a process group is
            initialised and ``sync_on_compute`` is true.

        Raises:
            ValueError: No ID or no OOD scores were added (on any process), or processes hold scores of
                different dtypes.
        """
        id_scores = torch.cat(self._id) if self._id else None
        ood_scores = torch.cat(self._ood) if self._ood else None
        if self.sync_on_compute:
            id_scores, ood_scores = _gather_scores(id_scores, ood_scores)
        for side, scores in (("ID", id_scores), ("OOD", ood_scores)):
            if scores is None:
                raise ValueError(f"no {side} scores were added; call update({side.lower()}_scores=...) first")
        assert id_scores is not None and ood_scores is not None
        _check_same_dtype(id_scores, ood_scores, "id_scores", "ood_scores")
        return _compute(id_scores, ood_scores, self.tpr, self.fpr_rule)

    def reset(self) -> None:
        """Forget every score added so far."""
        self._id.clear()
        self._ood.clear()


def _gather_scores(id_scores: Tensor | None, ood_scores: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Concatenate every process's scores in rank order when a process group of several processes is running."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return id_scores, ood_scores
    gathered: list[Any] = [None] * dist.get_world_size()
    # Objects, not tensors: the shards differ in length and may be empty, and this works with every backend.
    dist.all_gather_object(gathered, (id_scores, ood_scores))
    result: list[Tensor | None] = []
    for side in (0, 1):
        parts = [part[side] for part in gathered if part[side] is not None]
        dtypes = {part.dtype for part in parts}
        if len(dtypes) > 1:
            raise ValueError(
                f"the processes hold {'ID' if side == 0 else 'OOD'} scores of different dtypes "
                f"{sorted(map(str, dtypes))}; give every process scores of the same dtype"
            )
        result.append(torch.cat(parts) if parts else None)
    return result[0], result[1]
