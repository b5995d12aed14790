"""OODEvaluator (precomputed scores, model + DataLoader, paper protocol) and OODReport serialisation."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.evaluation import (
    METRIC_NAMES,
    OODEvaluator,
    OODReport,
    energy_score,
    max_logit_score,
    ood_metrics,
)


def _scores(seed: int, n: int, shift: float) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ---- precomputed scores ----------------------------------------------------------------------------------


def test_precomputed_scores_match_ood_metrics() -> None:
    id_scores = _scores(0, 200, 1.0)
    ood = {"near": _scores(1, 90, 0.5), "far": _scores(2, 60, -1.0).numpy()}
    report = OODEvaluator(energy_score, tpr=0.9, progress=False).evaluate_scores(id_scores, ood)
    assert report.names == ["near", "far"]
    assert (report.n_id, report.protocol, report.repeats, report.seed, report.id_accuracy) == (
        200,
        "full",
        1,
        None,
        None,
    )
    for name, scores in ood.items():
        expected = ood_metrics(id_scores, scores, tpr=0.9)
        row = report[name]
        assert row.metrics == {metric: getattr(expected, metric) for metric in METRIC_NAMES}
        assert row.std is None and row.n_ood == len(scores)
    for metric in METRIC_NAMES:
        assert report.mean.metrics[metric] == pytest.approx(
            (report["near"].metrics[metric] + report["far"].metrics[metric]) / 2, abs=1e-15
        )
    assert report["Mean"] is report.mean and report.mean.n_ood is None


def test_id_accuracy_from_logits_and_labels() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0, 2])  # argmax: 0 1 2 0 1 -> 3 of 5 correct
    evaluator = OODEvaluator(energy_score, progress=False)
    report = evaluator.evaluate_scores(energy_score(logits), {"x": torch.zeros(3)}, id_logits=logits, id_labels=labels)
    assert report.id_accuracy == 3 / 5
    with pytest.raises(ValueError, match="give id_logits and id_labels together"):
        evaluator.evaluate_scores(energy_score(logits), {"x": torch.zeros(3)}, id_logits=logits)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] for 3 classes, got values in \[0, 3\]"):
        evaluator.evaluate_scores(
            energy_score(logits), {"x": torch.zeros(3)}, id_logits=logits, id_labels=torch.tensor([0, 1, 3, 0, 2])
        )
    with pytest.raises(ValueError, match="id_logits has 5 rows but id_scores has 4 scores"):
        evaluator.evaluate_scores(torch.zeros(4), {"x": torch.zeros(3)}, id_logits=logits, id_labels=labels)
    with pytest.raises(TypeError, match="integer class indices"):
        evaluator.evaluate_scores(energy_score(logits), {"x": torch.zeros(3)}, id_logits=logits, id_labels=labels * 1.0)


def test_errors_name_the_ood_set() -> None:
    evaluator = OODEvaluator(energy_score, progress=False)
    bad = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(NonFiniteError, match=r"ood_scores\['SVHN'\] contains 1 NaN"):
        evaluator.evaluate_scores(torch.ones(5), {"Textures": torch.zeros(2), "SVHN": bad})
    with pytest.raises(ValueError, match=r"id_scores and ood_scores\['SVHN'\] must have the same dtype"):
        evaluator.evaluate_scores(torch.ones(5), {"SVHN": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(TypeError, match="ood_scores must be a mapping"):
        evaluator.evaluate_scores(torch.ones(5), torch.zeros(2))
    with pytest.raises(ValueError, match="ood_scores is empty"):
        evaluator.evaluate_scores(torch.ones(5), {})
    with pytest.raises(ValueError, match="protocol must be one of 'full', 'paper', got 'fast'"):
        OODEvaluator(energy_score, protocol="fast")
    with pytest.raises(TypeError, match="scorer must be callable"):
        OODEvaluator(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeats must be > 0, got 0"):
        OODEvaluator(energy_score, protocol="paper", repeats=0)


# ---- paper protocol -----------------------------------------------------------------------------------------


def test_paper_protocol_subsamples_and_averages() -> None:
    id_scores = _scores(0, 103, 1.0)
    big, small = _scores(1, 500, 0.0), _scores(2, 12, 0.0)
    evaluator = OODEvaluator(energy_score, protocol="paper", repeats=4, seed=7, progress=False)
    report = evaluator.evaluate_scores(id_scores, {"big": big, "small": small})
    assert (report.protocol, report.repeats, report.seed) == ("paper", 4, 7)
    assert report["big"].n_ood == 103 // 5
    assert report["small"].n_ood == 12  # smaller than n_id // 5: all of it, every repeat

    # Independent recomputation of the documented sampling rule.
    generator = torch.Generator().manual_seed(7)
    per_repeat = []
    for _ in range(4):
        subset = big[torch.randperm(500, generator=generator)[: 103 // 5]]
        metrics = ood_metrics(id_scores, subset)
        per_repeat.append([getattr(metrics, name) for name in METRIC_NAMES])
    values = np.asarray(per_repeat)
    small_metrics = ood_metrics(id_scores, small)
    small_values = np.asarray([getattr(small_metrics, name) for name in METRIC_NAMES])
    for i, name in enumerate(METRIC_NAMES):
        assert report["big"].metrics[name] == pytest.approx(values[:, i].mean(), abs=1e-15)
        assert report["big"].std is not None
        assert report["big"].std[name] == pytest.approx(values[:, i].std(), abs=1e-15)
        assert report["small"].metrics[name] == pytest.approx(small_values[i], abs=1e-15)
        assert report["small"].std == pytest.approx(dict.fromkeys(METRIC_NAMES, 0.0))
        # Mean row: mean and std over repeats of the per-repeat mean over sets.
        per_repeat_mean = (values[:, i] + small_values[i]) / 2
        assert report.mean.metrics[name] == pytest.approx(per_repeat_mean.mean(), abs=1e-15)
        assert report.mean.std is not None
        assert report.mean.std[name] == pytest.approx(per_repeat_mean.std(), abs=1e-15)
    assert any(report["big"].std[name] > 0 for name in METRIC_NAMES)  # the repeats really differ


def test_paper_protocol_is_reproducible_per_seed() -> None:
    id_scores, ood = _scores(0, 100, 0.5), {"a": _scores(1, 300, 0.0)}

    def run(seed: int) -> OODReport:
        return OODEvaluator(energy_score, protocol="paper", repeats=3, seed=seed, progress=False).evaluate_scores(
            id_scores, ood
        )

    assert run(3) == run(3)
    assert run(3).rows != run(4).rows
    # A set's subsamples do not depend on the other sets.
    both = OODEvaluator(energy_score, protocol="paper", repeats=3, seed=3, progress=False).evaluate_scores(
        id_scores, {"other": _scores(5, 50, 0.0), "a": ood["a"]}
    )
    assert both["a"] == run(3)["a"]
    with pytest.raises(ValueError, match="needs n_id >= 5, got 4"):
        OODEvaluator(energy_score, protocol="paper", progress=False).evaluate_scores(
            torch.ones(4), {"a": torch.ones(3)}
        )


# ---- model + DataLoader -------------------------------------------------------------------------------------


class _ModeRecorder(nn.Module):
    """A linear classifier that records whether it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3, dtype=torch.float64)
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        return self.linear(x)


def test_model_and_dataloaders_match_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    id_x = torch.randn(37, 4, generator=gen, dtype=torch.float64) + 1.0
    id_y = torch.randint(0, 3, (37,), generator=gen)
    ood_x = torch.randn(23, 4, generator=gen, dtype=torch.float64)
    model = _ModeRecorder()
    model.train()

    id_loader = DataLoader(TensorDataset(id_x, id_y), batch_size=8)
    ood_images_only = list(ood_x.split(5))  # batches of images without labels
    ood_with_labels = DataLoader(TensorDataset(ood_x, torch.full((23,), -1)), batch_size=10)
    evaluator = OODEvaluator(energy_score, model=model, device="cpu", progress=False)
    report = evaluator.evaluate(id_loader, {"plain": ood_images_only, "labelled": ood_with_labels})

    with torch.no_grad():
        id_logits, ood_logits = model.linear(id_x), model.linear(ood_x)
    expected = ood_metrics(energy_score(id_logits), energy_score(ood_logits))
    for name in ("plain", "labelled"):
        for metric in METRIC_NAMES:
            assert report[name].metrics[metric] == pytest.approx(getattr(expected, metric), abs=1e-12)
        assert report[name].n_ood == 23
    assert report.id_accuracy == pytest.approx(float((id_logits.argmax(1) == id_y).double().mean()), abs=1e-15)
    assert model.modes and not any(model.modes)  # ran in eval mode...
    assert model.training and model.linear.training  # ...and training mode is restored

    scores = evaluator.compute_scores(ood_images_only)
    torch.testing.assert_close(scores, energy_score(ood_logits))


def test_accuracy_needs_labels_and_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    model = _ModeRecorder()
    no_labels = OODEvaluator(max_logit_score, model=model, progress=False).evaluate(list(x.split(6)), {"o": [x[:5]]})
    assert no_labels.id_accuracy is None
    features = nn.Sequential(nn.Linear(4, 1, dtype=torch.float64))

    def norm(feats: Tensor) -> Tensor:
        return feats[:, 0]

    loader = DataLoader(TensorDataset(x, torch.zeros(20, dtype=torch.long)), batch_size=7)
    with pytest.raises(ValueError, match="pass accuracy=False when the model returns features"):
        OODEvaluator(norm, model=features, progress=False).evaluate(loader, {"o": [x[:5]]})
    report = OODEvaluator(norm, model=features, accuracy=False, progress=False).evaluate(loader, {"o": [x[:5]]})
    assert report.id_accuracy is None


def test_detector_object_without_model() -> None:
    class NormDetector:
        """Scores images by minus their squared L2 norm."""

        def score(self, inputs: Tensor) -> Tensor:
            return -(inputs**2).sum(dim=1)

    gen = torch.Generator().manual_seed(2)
    id_x = 0.5 * torch.randn(30, 3, generator=gen)
    ood_x = 2.0 * torch.randn(20, 3, generator=gen)
    evaluator = OODEvaluator(NormDetector(), device="cpu", progress=False)
    report = evaluator.evaluate(DataLoader(TensorDataset(id_x, torch.zeros(30)), batch_size=9), {"wide": [ood_x]})
    expected = ood_metrics(-(id_x**2).sum(1), -(ood_x**2).sum(1))
    assert report["wide"].metrics == {m: getattr(expected, m) for m in METRIC_NAMES}


def test_scorer_output_shape_and_empty_loader_errors() -> None:
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"one score per sample, shape \(6,\), got shape \(6, 4\)"):
        OODEvaluator(lambda batch: batch, progress=False).compute_scores([x])
    with pytest.raises(ValueError, match="yielded no batches"):
        OODEvaluator(max_logit_score, progress=False).compute_scores([])
    with pytest.raises(TypeError, match="a loader batch must be a tensor of images"):
        OODEvaluator(max_logit_score, progress=False).compute_scores([{"image": x}])
    with pytest.raises(NonFiniteError, match=r"ood_scores\['bad'\]"):
        OODEvaluator(max_logit_score, progress=False).evaluate([x], {"bad": [torch.full((3, 4), float("nan"))]})


# ---- report ------------------------------------------------------------------------------------------------


def _report(protocol: str) -> OODReport:
    logits = torch.randn(50, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = logits.argmax(1)
    labels[:5] = (labels[:5] + 1) % 3  # 90% accuracy
    evaluator = OODEvaluator(energy_score, protocol=protocol, repeats=3, seed=1, progress=False)
    ood = {"SVHN": _scores(1, 40, 0.0), "Textures": _scores(2, 30, 0.5)}
    return evaluator.evaluate_scores(energy_score(logits), ood, id_logits=logits, id_labels=labels)


@pytest.mark.parametrize("protocol", ["full", "paper"])
def test_report_json_round_trip(protocol: str, tmp_path: Path) -> None:
    report = _report(protocol)
    assert report.id_accuracy == 0.9
    path = tmp_path / "out" / "report.json"
    text = report.to_json(path)
    assert path.read_text() == text
    assert OODReport.from_json(path) == report
    assert OODReport.from_dict(json.loads(text)) == report
    assert json.loads(text)["rows"][0]["metrics"]["auroc"] == report["SVHN"].metrics["auroc"]


def test_report_rejects_bad_json(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        OODReport.from_json(broken)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"rows": []}))
    with pytest.raises(ArtifactError, match="not an OOD report"):
        OODReport.from_json(incomplete)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        OODReport.from_json(tmp_path / "missing.json")


def test_report_markdown_and_str() -> None:
    report = _report("full")
    markdown = report.to_markdown()
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| OOD set"))
    assert "FPR95 (ID+)" in header and "FPR95 (OOD+)" in header and "AUROC" in header
    svhn = next(line for line in lines if line.startswith("| SVHN"))
    cells = [cell.strip() for cell in svhn.strip("|").split("|")]
    assert cells[1] == "40"
    assert cells[2] == f"{100 * report['SVHN'].metrics['fpr95']:.2f}"
    assert cells[4] == f"{100 * report['SVHN'].metrics['auroc']:.2f}"
    assert any(line.startswith("| Textures") for line in lines) and any(line.startswith("| Mean") for line in lines)
    assert "ID accuracy: 90.00%" in markdown

    text = str(report)
    assert "SVHN" in text and "Textures" in text and "Mean" in text and "FPR95 (OOD+)" in text
    assert "ID accuracy: 90.00%" in text

    paper = _report("paper")
    assert f"{100 * paper['SVHN'].metrics['auroc']:.2f} ± {100 * paper['SVHN'].std['auroc']:.2f}" in paper.to_markdown()  # type: ignore[index]


def test_metric_headers_follow_the_tpr_level() -> None:
    report = OODEvaluator(energy_score, tpr=0.9, progress=False).evaluate_scores(torch.ones(5), {"a": torch.zeros(5)})
    assert "FPR90 (ID+)" in report.to_markdown() and "FPR90 (OOD+)" in report.to_markdown()


@pytest.mark.parametrize("protocol", ["full", "paper"])
def test_report_csv(protocol: str, tmp_path: Path) -> None:
    report = _report(protocol)
    path = tmp_path / "report.csv"
    text = report.to_csv(path)
    assert path.read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["OOD set"] for row in rows] == ["SVHN", "Textures", "Mean"]
    assert float(rows[1]["AUROC"]) == pytest.approx(100 * report["Textures"].metrics["auroc"], abs=1e-4)
    assert float(rows[0]["FPR95 (OOD+)"]) == pytest.approx(100 * report["SVHN"].metrics["fpr95_ood_positive"], abs=1e-4)
    assert rows[2]["ID Acc"] == "90.0000" and rows[0]["ID Acc"] == ""
    assert ("AUROC std" in rows[0]) == (protocol == "paper")


# ---- the FPR threshold rule and the trapezoid AUPRs -----------------------------------------------------------


def test_fpr_rule_and_trapezoid_auprs_reach_the_report(tmp_path: Path) -> None:
    id_scores = torch.tensor([5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    ood = {"tied": torch.tensor([4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)}
    default = OODEvaluator(energy_score, progress=False).evaluate_scores(id_scores, ood)
    reference = OODEvaluator(energy_score, progress=False, fpr_rule="nearest", aupr_trapezoid=True).evaluate_scores(
        id_scores, ood
    )
    assert default.fpr_rule == "exact" and reference.fpr_rule == "nearest"
    assert default["tied"].metrics["fpr95"] == 0.6 and reference["tied"].metrics["fpr95"] == 0.4
    assert "aupr_in_trapezoid" not in default.mean.metrics and default.metric_names == METRIC_NAMES
    expected = ood_metrics(id_scores, ood["tied"], fpr_rule="nearest")
    assert reference["tied"].metrics["aupr_in_trapezoid"] == expected.aupr_in_trapezoid
    assert reference["tied"].metrics["aupr_out_trapezoid"] == expected.aupr_out_trapezoid
    markdown = reference.to_markdown()
    assert "AUPR-In (trapz)" in markdown and "FPR threshold rule 'nearest'" in markdown
    assert "AUPR-Out (trapz)" in reference.to_csv()
    path = tmp_path / "report.json"
    reference.to_json(path)
    assert OODReport.from_json(path) == reference
    # Reports written before the rule existed load with the exact rule.
    data = json.loads(default.to_json())
    del data["fpr_rule"]
    assert OODReport.from_dict(data) == default
    with pytest.raises(ValueError, match="fpr_rule must be one of 'exact', 'nearest', got 'near'"):
        OODEvaluator(energy_score, fpr_rule="near")  # type: ignore[arg-type]
