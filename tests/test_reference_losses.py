"""Both energy temperature forms, outlier exposure and K+1 classes, against float64 formulas written here."""

from __future__ import annotations

import math

import pytest
import torch

from dreamood.evaluation import TEMPERATURE_FORMS, energy_score, outlier_class_score
from dreamood.training import EnergyOODRegularizer, OutlierClassLoss, OutlierExposureLoss


def _logits(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 3


def _lse(row: list[float]) -> float:
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row))


def _score(row: list[float], t: float, form: str) -> float:
    if form == "free-energy":
        return t * _lse([v / t for v in row])
    return _lse(row) / t


@pytest.mark.parametrize("form", TEMPERATURE_FORMS)
@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_energy_score_forms(form: str, t: float) -> None:
    logits = _logits(6, 5, 0).double()
    got = energy_score(logits, t, form)
    expected = torch.tensor([_score(row, t, form) for row in logits.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    if t == 1.0:
        assert torch.equal(energy_score(logits, t, "free-energy"), energy_score(logits, t, "scaled-logsumexp"))
    assert torch.equal(energy_score(logits, t), energy_score(logits, t, "free-energy"))
    with pytest.raises(ValueError, match="form must be one of"):
        energy_score(logits, t, "energy")


@pytest.mark.parametrize("form", TEMPERATURE_FORMS)
@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_regulariser_temperature_forms(form: str, t: float, weighted: bool) -> None:
    logits_id, logits_ood = _logits(5, 4, 1).double(), _logits(3, 4, 2).double() - 2
    regulariser = EnergyOODRegularizer("linear", temperature=t, temperature_form=form, weighted=weighted, num_classes=4)
    regulariser = regulariser.double()
    with torch.no_grad():
        regulariser.head.weight.copy_(torch.tensor([[-0.7], [0.9]], dtype=torch.float64))
        regulariser.head.bias.copy_(torch.tensor([0.2, -0.1], dtype=torch.float64))
        if weighted:
            regulariser.class_weights.copy_(torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64))
    weights = [1.0, 0.5, 2.0, 0.0] if weighted else [1.0] * 4
    total = 0.0
    rows = [(row, 1) for row in logits_id.tolist()] + [(row, 0) for row in logits_ood.tolist()]
    for row, label in rows:
        # Weighted log-sum-exp: log sum_c w_c exp(x_c), on f / T (free energy) or on f (scaled form).
        inner = [v / t for v in row] if form == "free-energy" else row
        log_sum = math.log(sum(w * math.exp(v) for w, v in zip(weights, inner)))
        score = t * log_sum if form == "free-energy" else log_sum / t
        head = [-0.7 * score + 0.2, 0.9 * score - 0.1]
        total += _lse(head) - head[label]
    expected = total / len(rows)
    assert abs(regulariser(logits_id, logits_ood).item() - expected) < 1e-12
    assert "scaled-logsumexp" in repr(EnergyOODRegularizer(temperature_form="scaled-logsumexp"))
    with pytest.raises(ValueError, match="temperature_form must be one of"):
        EnergyOODRegularizer(temperature_form="vos")


def test_the_two_forms_give_different_losses_at_t2() -> None:
    logits_id, logits_ood = _logits(64, 10, 3), _logits(64, 10, 4)
    torch.manual_seed(0)
    free = EnergyOODRegularizer("mlp", temperature=2.0)
    scaled = EnergyOODRegularizer("mlp", temperature=2.0, temperature_form="scaled-logsumexp")
    scaled.load_state_dict(free.state_dict())
    assert abs(free(logits_id, logits_ood).item() - scaled(logits_id, logits_ood).item()) > 1e-3


def test_outlier_exposure_loss() -> None:
    logits_id, logits_ood = _logits(3, 5, 5).double(), _logits(4, 5, 6).double()
    expected = sum(_lse(row) - sum(row) / len(row) for row in logits_ood.tolist()) / 4
    assert abs(OutlierExposureLoss()(logits_id, logits_ood).item() - expected) < 1e-12
    # Cross-entropy to the uniform distribution over the classes.
    uniform = torch.full((4, 5), 0.2, dtype=torch.float64)
    by_torch = -(uniform * torch.log_softmax(logits_ood, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(OutlierExposureLoss()(logits_id, logits_ood), by_torch)
    assert not list(OutlierExposureLoss().parameters())
    with pytest.raises(ValueError, match="same number of columns"):
        OutlierExposureLoss()(logits_id, logits_ood[:, :3])
    with pytest.raises(ValueError, match="empty batch"):
        OutlierExposureLoss()(logits_id, logits_ood[:0])


def test_outlier_class_loss_and_score() -> None:
    logits_id, logits_ood = _logits(3, 6, 7).double(), _logits(4, 6, 8).double()
    expected = sum(_lse(row) - row[5] for row in logits_ood.tolist()) / 4
    assert abs(OutlierClassLoss(6)(logits_id, logits_ood).item() - expected) < 1e-12
    # The authors' single cross-entropy over the concatenated batch, outliers labelled K.
    labels = torch.tensor([0, 3, 4])
    joint = torch.nn.functional.cross_entropy(
        torch.cat([logits_id, logits_ood]), torch.cat([labels, torch.full((4,), 5)])
    )
    ours = torch.nn.functional.cross_entropy(logits_id, labels) + (4 / 3) * OutlierClassLoss(6)(logits_id, logits_ood)
    torch.testing.assert_close(joint, ours * 3 / 7)
    score = outlier_class_score(logits_ood)
    probabilities = torch.softmax(logits_ood, dim=1)
    torch.testing.assert_close(score, torch.log((1 - probabilities[:, 5]) / probabilities[:, 5]))
    with pytest.raises(ValueError, match="num_classes=6"):
        OutlierClassLoss(6)(logits_id[:, :5], logits_ood[:, :5])
    with pytest.raises(ValueError, match="at least 2"):
        OutlierClassLoss(1)
    with pytest.raises(ValueError, match="at least 2 columns"):
        outlier_class_score(logits_ood[:, :1])


def test_paper_protocol_with_a_given_subsample_size() -> None:
    import numpy as np

    from dreamood.evaluation import OODEvaluator, ood_metrics

    id_scores = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1
    ood = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    evaluator = OODEvaluator(energy_score, protocol="paper", repeats=1, seed=3, progress=False, sample_size=96)
    report = evaluator.evaluate_scores(id_scores, {"ood": ood})
    assert report["ood"].n_ood == 96
    subset = ood[torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:96]]
    expected = ood_metrics(id_scores, subset)
    assert np.isclose(report["ood"].metrics["auroc"], expected.auroc, rtol=0, atol=1e-15)
    default = OODEvaluator(energy_score, protocol="paper", repeats=1, seed=3, progress=False)
    assert default.evaluate_scores(id_scores, {"ood": ood})["ood"].n_ood == 40
    with pytest.raises(ValueError, match="sample_size"):
        OODEvaluator(energy_score, sample_size=0)
