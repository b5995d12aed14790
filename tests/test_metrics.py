"""OOD metrics against hand-computed cases, brute-force definitions and scikit-learn; logit scores."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from dreamood.errors import NonFiniteError
from dreamood.evaluation import (
    METRIC_NAMES,
    OODMetricAccumulator,
    energy_score,
    max_logit_score,
    msp_score,
    ood_metrics,
)

# Integer-valued scores in a small range, so that ties between and within the two sides are common.
tied_scores = st.lists(st.integers(-6, 6), min_size=1, max_size=40).map(lambda v: np.asarray(v, dtype=np.float64))


def _values(metrics: object) -> tuple[float, ...]:
    return tuple(getattr(metrics, name) for name in METRIC_NAMES)


def _sklearn_reference(id_scores: np.ndarray, ood_scores: np.ndarray, level: float) -> tuple[float, ...]:
    """Every metric from scikit-learn, ID positive with the scores and OOD positive with negated scores."""
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr_in, tpr_in, _ = roc_curve(y, s, drop_intermediate=False)
    fpr_out, tpr_out, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    return (
        float(fpr_in[np.argmax(tpr_in >= level)]),
        float(fpr_out[np.argmax(tpr_out >= level)]),
        float(roc_auc_score(y, s)),
        float(average_precision_score(y, s)),
        float(average_precision_score(1 - y, -s)),
    )


def _brute_force_fpr(positives: np.ndarray, negatives: np.ndarray, level: float) -> float:
    """Lowest FPR over every threshold t (accept when score >= t) whose TPR reaches ``level``, counted exactly."""
    best = 1.0
    for t in np.r_[positives, negatives]:
        kept = int((positives >= t).sum())
        if Fraction(kept, len(positives)) >= Fraction(str(level)):
            best = min(best, float((negatives >= t).mean()))
    return best


# ---- hand-computed cases ----------------------------------------------------------------------------------


def test_hand_computed_distinct_scores() -> None:
    id_scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    ood_scores = [0.75, 0.55, 0.1, 0.0]
    m = ood_metrics(id_scores, ood_scores, tpr=0.8)
    # ID+: keep 4 of 5 ID -> threshold 0.6; OOD >= 0.6 is {0.75}.
    assert m.fpr95 == 1 / 4
    # OOD+: catch ceil(3.2) = 4 of 4 OOD -> threshold 0.75; ID <= 0.75 is {0.7, 0.6, 0.5}.
    assert m.fpr95_ood_positive == 3 / 5
    # Pairs with ID > OOD: 2 + 4 + 5 + 5 of 20.
    assert m.auroc == 16 / 20
    # Precision at each ID sample in descending order: 1/1, 2/2, 3/4, 4/5, 5/7.
    assert m.aupr_in == pytest.approx((1 + 1 + 3 / 4 + 4 / 5 + 5 / 7) / 5, abs=1e-15)
    # Precision at each OOD sample in ascending order: 1/1, 2/2, 3/4, 4/7.
    assert m.aupr_out == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4, abs=1e-15)
    assert (m.tpr, m.n_id, m.n_ood) == (0.8, 5, 4)


def test_hand_computed_ties() -> None:
    id_scores = torch.tensor([1.0, 1.0, 0.0])
    ood_scores = torch.tensor([1.0, 0.0])
    # Ties count 1/2: ID 1 vs OOD (1, 0) -> 1.5 each; ID 0 vs OOD (1, 0) -> 0.5; total 3.5 of 6.
    assert ood_metrics(id_scores, ood_scores).auroc == 3.5 / 6
    # Threshold at a tied value: samples equal to it are on the positive side.
    assert ood_metrics(id_scores, ood_scores, tpr=0.6).fpr95 == 1 / 2  # keep 2 ID -> t = 1, OOD 1 accepted
    assert ood_metrics(id_scores, ood_scores, tpr=0.95).fpr95 == 1.0  # keep 3 ID -> t = 0, all OOD accepted
    assert ood_metrics(id_scores, ood_scores, tpr=0.5).fpr95_ood_positive == 1 / 3  # catch 1 OOD -> t = 0
    assert ood_metrics(id_scores, ood_scores, tpr=0.95).fpr95_ood_positive == 1.0  # catch 2 OOD -> t = 1
    m = ood_metrics(id_scores, ood_scores)
    # ID positive: threshold 1 -> precision 2/3 for recall 2/3; threshold 0 -> precision 3/5 for recall 1/3.
    assert m.aupr_in == pytest.approx(2 / 3 * 2 / 3 + 1 / 3 * 3 / 5, abs=1e-15)
    # OOD positive: threshold 0 -> precision 1/2 for recall 1/2; threshold 1 -> precision 2/5 for recall 1/2.
    assert m.aupr_out == pytest.approx(1 / 2 * 1 / 2 + 1 / 2 * 2 / 5, abs=1e-15)


def test_tpr_level_is_read_as_a_decimal() -> None:
    # 0.9 * 10 in exact binary is slightly above 9; the rule must still need 9 of 10, not 10.
    for level, n in ((0.95, 20), (0.9, 10), (0.95, 100), (0.7, 10)):
        id_scores = np.arange(n, dtype=np.float64)
        kept = round(level * n)
        ood = np.asarray([n - kept - 0.5])  # just below the kept ID scores
        assert ood_metrics(id_scores, ood, tpr=level).fpr95 == 0.0
        assert ood_metrics(id_scores, ood + 1.0, tpr=level).fpr95 == 1.0


def test_perfect_separation() -> None:
    m = ood_metrics(np.linspace(1.0, 2.0, 50), np.linspace(-1.0, 0.5, 30))
    assert _values(m) == (0.0, 0.0, 1.0, 1.0, 1.0)
    # Reversed: every OOD scores above every ID.
    r = ood_metrics(np.linspace(-1.0, 0.5, 50), np.linspace(1.0, 2.0, 30))
    assert (r.fpr95, r.fpr95_ood_positive, r.auroc) == (1.0, 1.0, 0.0)


def test_all_tied_scores() -> None:
    m = ood_metrics(torch.full((6,), 0.3), torch.full((4,), 0.3))
    assert (m.fpr95, m.fpr95_ood_positive, m.auroc) == (1.0, 1.0, 0.5)
    assert m.aupr_in == pytest.approx(6 / 10, abs=1e-15)
    assert m.aupr_out == pytest.approx(4 / 10, abs=1e-15)


def test_single_sample_per_side() -> None:
    assert _values(ood_metrics([2.0], [1.0])) == (0.0, 0.0, 1.0, 1.0, 1.0)


def test_accepts_tensors_on_any_form() -> None:
    id_scores = torch.tensor([3.0, 2.0, 1.0], requires_grad=True)
    ood_scores = torch.tensor([2.5, 0.0])
    expected = ood_metrics(id_scores.detach().numpy(), ood_scores.numpy())
    assert ood_metrics(id_scores, ood_scores) == expected
    assert ood_metrics(torch.tensor([3, 2, 1]), torch.tensor([2, 0])).auroc == ood_metrics([3, 2, 1], [2, 0]).auroc


# ---- agreement with scikit-learn and brute force ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(1.0, 1.0, size=300)
    ood_scores = rng.normal(0.0, 1.5, size=200)
    got = _values(ood_metrics(id_scores, ood_scores))
    np.testing.assert_allclose(got, _sklearn_reference(id_scores, ood_scores, 0.95), rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(tied_scores, tied_scores, st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]))
def test_matches_sklearn_and_brute_force_with_ties(id_scores: np.ndarray, ood_scores: np.ndarray, level: float) -> None:
    m = ood_metrics(id_scores, ood_scores, tpr=level)
    np.testing.assert_allclose(_values(m), _sklearn_reference(id_scores, ood_scores, level), rtol=0, atol=1e-12)
    assert m.fpr95 == _brute_force_fpr(id_scores, ood_scores, level)
    assert m.fpr95_ood_positive == _brute_force_fpr(-ood_scores, -id_scores, level)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in _values(m))


# ---- properties -------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(tied_scores, tied_scores, st.sampled_from(["exp", "cube", "affine", "arctan"]))
def test_invariant_to_strictly_increasing_transforms(id_scores: np.ndarray, ood_scores: np.ndarray, kind: str) -> None:
    transforms = {
        "exp": lambda x: np.exp(x / 3.0),
        "cube": lambda x: x**3 - 10.0,
        "affine": lambda x: 4.0 * x + 2.0,
        "arctan": np.arctan,
    }
    f = transforms[kind]
    assert ood_metrics(f(id_scores), f(ood_scores)) == ood_metrics(id_scores, ood_scores)


@settings(max_examples=100, deadline=None)
@given(tied_scores, tied_scores)
def test_swapping_id_and_ood(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    m = ood_metrics(id_scores, ood_scores)
    swapped = ood_metrics(ood_scores, id_scores)
    assert swapped.auroc == pytest.approx(1.0 - m.auroc, abs=1e-12)
    # Swapping the sides and negating the scores exchanges the two conventions exactly.
    mirrored = ood_metrics(-ood_scores, -id_scores)
    assert mirrored.auroc == m.auroc
    assert (mirrored.fpr95, mirrored.fpr95_ood_positive) == (m.fpr95_ood_positive, m.fpr95)
    assert (mirrored.aupr_in, mirrored.aupr_out) == (m.aupr_out, m.aupr_in)


@settings(max_examples=50, deadline=None)
@given(tied_scores, tied_scores)
def test_order_of_samples_does_not_matter(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    assert ood_metrics(id_scores[::-1].copy(), np.sort(ood_scores)) == ood_metrics(id_scores, ood_scores)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_empty_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="id_scores is empty"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="ood_scores is empty"):
        ood_metrics(torch.ones(3), torch.ones(0))


def test_non_finite_scores_are_counted_and_located() -> None:
    with pytest.raises(NonFiniteError, match=r"id_scores contains 2 NaN and 0 infinite value\(s\) out of 4"):
        ood_metrics([1.0, float("nan"), float("nan"), 0.0], [0.5])
    with pytest.raises(ValueError, match=r"ood_scores contains 0 NaN and 1 infinite value\(s\) out of 2"):
        ood_metrics([1.0], torch.tensor([0.0, -float("inf")]))


def test_shape_and_dtype_errors() -> None:
    with pytest.raises(ValueError, match=r"id_scores must be a 1-D .* got shape \(3, 2\)"):
        ood_metrics(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match=r"ood_scores must be a 1-D .* got shape \(\)"):
        ood_metrics(np.zeros(3), np.float64(1.0))
    with pytest.raises(ValueError, match="same dtype.*torch.float32 and torch.float64"):
        ood_metrics(torch.zeros(3), np.zeros(3))
    with pytest.raises(TypeError, match="real-valued scores, got dtype torch.bool"):
        ood_metrics(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="id_scores"):
        ood_metrics(["a", "b"], [1.0])


@pytest.mark.parametrize("level", [0.0, -0.1, 1.5, float("nan"), "0.95", True])
def test_bad_tpr_level(level: object) -> None:
    with pytest.raises(ValueError, match="tpr must be a number in"):
        ood_metrics([1.0], [0.0], tpr=level)  # type: ignore[arg-type]


# ---- accumulator -------------------------------------------------------------------------------------------


def test_accumulator_matches_one_shot_and_resets() -> None:
    gen = torch.Generator().manual_seed(3)
    id_scores = torch.randn(100, generator=gen) + 1.0
    ood_scores = torch.randn(70, generator=gen)
    acc = OODMetricAccumulator(tpr=0.9)
    for id_batch in id_scores.split(32):
        acc.update(id_scores=id_batch)
    for ood_batch in ood_scores.split(32):
        acc.update(ood_scores=ood_batch)
    acc.update()  # nothing to add
    assert acc.compute() == ood_metrics(id_scores, ood_scores, tpr=0.9)
    acc.reset()
    with pytest.raises(ValueError, match="no ID scores were added"):
        acc.compute()
    acc.update(id_scores=id_scores)
    with pytest.raises(ValueError, match="no OOD scores were added"):
        acc.compute()
    with pytest.raises(ValueError, match="earlier batches have torch.float32"):
        acc.update(ood_scores=ood_scores.double())
    with pytest.raises(NonFiniteError, match="ood_scores contains 1 NaN"):
        acc.update(ood_scores=torch.tensor([float("nan")]))


# ---- logit scores ------------------------------------------------------------------------------------------


def _reference_logits() -> torch.Tensor:
    return torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 4.0, 1.0], [50.0, 49.0, -20.0]])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_logit_scores_match_float64_formulas(temperature: float) -> None:
    logits = _reference_logits()
    rows = logits.double().tolist()
    energy = [temperature * math.log(sum(math.exp(v / temperature) for v in row)) for row in rows]
    msp = [max(math.exp(v / temperature) for v in row) / sum(math.exp(v / temperature) for v in row) for row in rows]
    torch.testing.assert_close(energy_score(logits, temperature), torch.tensor(energy, dtype=torch.float32))
    torch.testing.assert_close(msp_score(logits, temperature), torch.tensor(msp, dtype=torch.float32))
    torch.testing.assert_close(max_logit_score(logits), torch.tensor([2.0, 0.0, 4.0, 50.0]))


def test_logit_scores_keep_dtype_and_gradient() -> None:
    logits = _reference_logits().double().requires_grad_()
    score = energy_score(logits)
    assert score.dtype == torch.float64 and score.shape == (4,)
    score.sum().backward()
    assert logits.grad is not None
    # d/dlogits of logsumexp is the softmax.
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), dim=1))


def test_logit_score_errors() -> None:
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor of shape \(N, C\), got shape \(3,\)"):
        energy_score(torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point dtype"):
        msp_score(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one class"):
        max_logit_score(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        energy_score(torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        energy_score(np.zeros((2, 3)))  # type: ignore[arg-type]


# ---- AUPR by the trapezoid rule, FPR by the nearest-TPR rule ------------------------------------------------


def _trapezoid_reference(positives: np.ndarray, negatives: np.ndarray) -> float:
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    precision, recall, _ = precision_recall_curve(y, np.r_[positives, negatives])
    return float(auc(recall, precision))


def _nearest_reference(positives: np.ndarray, negatives: np.ndarray, level: float) -> float:
    """A transcription of ``fpr_and_fdr_at_recall`` of the DREAM-OOD / outlier-exposure evaluation code."""
    y_true = np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(bool)
    y_score = np.r_[positives, negatives]
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    threshold_idxs = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - level))
    return float(fps[cutoff] / np.sum(np.logical_not(y_true)))


@settings(max_examples=150, deadline=None)
@given(id_scores=tied_scores, ood_scores=tied_scores)
def test_trapezoid_aupr_matches_sklearn_auc_of_the_pr_curve(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    metrics = ood_metrics(id_scores, ood_scores)
    assert metrics.aupr_in_trapezoid == pytest.approx(_trapezoid_reference(id_scores, ood_scores), abs=1e-12)
    assert metrics.aupr_out_trapezoid == pytest.approx(_trapezoid_reference(-ood_scores, -id_scores), abs=1e-12)


def test_trapezoid_and_step_aupr_differ_and_are_named_apart() -> None:
    # ID positive, thresholds 3, 2, 1: (recall, precision) = (1/3, 1), (2/3, 2/4), (1, 3/6) after (0, 1).
    metrics = ood_metrics([3.0, 2.0, 1.0], [2.0, 2.0, 1.0])
    assert metrics.aupr_in == pytest.approx(1 / 3 * 1 + 1 / 3 * 1 / 2 + 1 / 3 * 1 / 2)  # 2/3
    assert metrics.aupr_in_trapezoid == pytest.approx(1 / 3 * 1 + 1 / 3 * 3 / 4 + 1 / 3 * 1 / 2)  # 3/4
    assert metrics.aupr_in != metrics.aupr_in_trapezoid


def test_nearest_fpr_rule_on_a_hand_checked_tied_case() -> None:
    # ID positive, distinct thresholds 5, 4, 3, 2, 1, 0 give (TP, FP) = (3, 0), (6, 1), (8, 2), (9, 4), (10, 6),
    # (10, 10). The exact rule needs TP >= 9.5, so TP = 10 at threshold 1: FPR = 6/10. The nearest rule compares
    # |0.9 - 0.95| = 0.04999999999999993 with |1.0 - 0.95| = 0.050000000000000044 and takes TP = 9: FPR = 4/10.
    id_scores = [5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 2.0, 1.0]
    ood_scores = [4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    exact = ood_metrics(id_scores, ood_scores)
    nearest = ood_metrics(id_scores, ood_scores, fpr_rule="nearest")
    assert (exact.fpr95, nearest.fpr95) == (0.6, 0.4)
    assert (exact.fpr_rule, nearest.fpr_rule) == ("exact", "nearest")
    # Everything but the FPRs is the same under both rules.
    assert exact.auroc == nearest.auroc and exact.aupr_in == nearest.aupr_in
    assert nearest.fpr95 == _nearest_reference(np.asarray(id_scores), np.asarray(ood_scores), 0.95)


def test_nearest_rule_breaks_equal_distances_towards_the_lower_threshold() -> None:
    # ID positive: thresholds 2, 1, 0 give TPR 0.5, 0.5, 1.0 and FPR 0, 1, 1. At level 0.5 two points are exactly
    # nearest; the reference walks from full TPR upwards and keeps the first, the lower threshold 1.
    assert ood_metrics([2.0, 0.0], [1.0], fpr_rule="nearest", tpr=0.5).fpr95 == 1.0
    assert ood_metrics([2.0, 0.0], [1.0], fpr_rule="exact", tpr=0.5).fpr95 == 0.0


@settings(max_examples=200, deadline=None)
@given(id_scores=tied_scores, ood_scores=tied_scores, level=st.sampled_from([0.95, 0.9, 0.5, 0.8]))
def test_nearest_rule_matches_the_reference_code(id_scores: np.ndarray, ood_scores: np.ndarray, level: float) -> None:
    metrics = ood_metrics(id_scores, ood_scores, tpr=level, fpr_rule="nearest")
    assert metrics.fpr95 == _nearest_reference(id_scores, ood_scores, level)
    assert metrics.fpr95_ood_positive == _nearest_reference(-ood_scores, -id_scores, level)


def test_unknown_fpr_rule() -> None:
    with pytest.raises(ValueError, match="fpr_rule must be one of 'exact', 'nearest', got 'closest'"):
        ood_metrics([1.0], [0.0], fpr_rule="closest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fpr_rule must be one of"):
        OODMetricAccumulator(fpr_rule="closest")  # type: ignore[arg-type]


def test_accumulator_passes_the_fpr_rule_and_does_not_sync_without_a_process_group() -> None:
    id_scores = [5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 2.0, 1.0]
    ood_scores = [4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    accumulator = OODMetricAccumulator(fpr_rule="nearest")
    accumulator.update(id_scores=id_scores[:4], ood_scores=ood_scores)
    accumulator.update(id_scores=id_scores[4:])
    assert accumulator.compute() == ood_metrics(id_scores, ood_scores, fpr_rule="nearest")
