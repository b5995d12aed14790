"""evaluate_detectors: shared outputs give the same reports as each detector alone; selection; tables; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.evaluation import (
    DETECTORS,
    DetectorComparison,
    ModelParts,
    OODEvaluator,
    applicable_detectors,
    evaluate_detectors,
)
from dreamood.models import Classifier
from dreamood.models.small import SmallConvNet

N_CLASSES, DIM = 4, 8


class _ReluBackbone(nn.Module):
    feature_dim = DIM

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)


def _data(seed: int = 0):
    """ID: class c near 5 e_c; OOD: near 5 e_4, a direction the classifier (W ~ e_c) ignores."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), 30)
    means = 5.0 * np.eye(DIM)[:N_CLASSES]
    as_f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    train = as_f(means[labels] + 0.3 * rng.normal(size=(labels.size, DIM)))
    test = as_f(means[labels] + 0.3 * rng.normal(size=(labels.size, DIM)))
    ood = as_f(5.0 * np.eye(DIM)[N_CLASSES] + 0.3 * rng.normal(size=(50, DIM)))
    torch.manual_seed(seed)
    model = Classifier(_ReluBackbone(), N_CLASSES)
    with torch.no_grad():
        model.head.weight.copy_(as_f(np.eye(DIM)[:N_CLASSES] + 0.05 * rng.normal(size=(N_CLASSES, DIM))))
        model.head.bias.zero_()
    y = torch.from_numpy(labels)
    loaders = {
        "fit": DataLoader(TensorDataset(train, y), batch_size=32),
        "test": DataLoader(TensorDataset(test, y), batch_size=32),
        "ood": {"far": DataLoader(TensorDataset(ood), batch_size=16)},
    }
    return model, train, y, test, ood, loaders


def test_every_shared_detector_matches_its_own_evaluation(tmp_path: Path) -> None:
    model, train, y, test, ood, loaders = _data()
    comparison = evaluate_detectors(
        model,
        loaders["test"],
        loaders["ood"],
        fit_loader=loaders["fit"],
        device="cpu",
        progress_bar=False,
        output_dir=tmp_path,
        options={"KNN": {"k": 5}},
    )
    parts = ModelParts.from_classifier(model)
    assert comparison.names == applicable_detectors(parts, has_fit_data=True)
    assert {"MSP", "ODIN", "Mahalanobis", "ASH-S", "fDBD", "SHE", "GradNorm"} <= set(comparison.names)
    with torch.no_grad():
        features = {"fit": torch.relu(train), "test": torch.relu(test), "far": torch.relu(ood)}
        logits = {key: model.head(value) for key, value in features.items()}
    evaluator = OODEvaluator(lambda x: x, progress=False)
    for name in comparison.names:
        spec = DETECTORS[name]
        if spec.inputs == "images":
            continue
        detector = spec.build(parts, len(train), {"k": 5} if name == "KNN" else {})
        outputs = logits if spec.inputs == "logits" else features
        detector.fit(outputs["fit"], y)
        expected = evaluator.evaluate_scores(detector.score(outputs["test"]), {"far": detector.score(outputs["far"])})
        assert comparison[name].rows == expected.rows, name
    assert comparison.id_accuracy == 1.0 and comparison["Energy"].id_accuracy == 1.0
    assert comparison["Energy"].mean.metrics["auroc"] > 0.95
    assert comparison.detectors["KNN"].startswith("KNN(k=5")
    markdown = comparison.to_markdown()
    assert markdown.count("\n| ") == len(comparison.names) + 1  # header and one row per detector
    assert "| fDBD |" in markdown and "ID accuracy 100.00%" in markdown
    assert comparison.to_markdown(per_set=True).count("| far |") == len(comparison.names)
    written = json.loads((tmp_path / "detectors.json").read_text())
    assert DetectorComparison.from_dict(written) == comparison
    assert (tmp_path / "detectors.md").read_text() == comparison.to_markdown(per_set=True)


def test_named_detectors_protocol_and_rules() -> None:
    model, *_, loaders = _data(1)
    comparison = evaluate_detectors(
        model,
        loaders["test"],
        loaders["ood"],
        detectors=["energy", "MSP"],
        protocol="paper",
        repeats=2,
        fpr_rule="nearest",
        aupr_trapezoid=True,
        progress_bar=False,
        device="cpu",
    )
    assert comparison.names == ["Energy", "MSP"]
    report = comparison["Energy"]
    assert report.protocol == "paper" and report.repeats == 2 and report.fpr_rule == "nearest"
    assert "aupr_in_trapezoid" in report.mean.metrics
    assert "AUPR-In (trapz)" in comparison.to_markdown() and "rule 'nearest'" in comparison.to_markdown()


def test_without_fit_data_only_detectors_that_learn_nothing_run() -> None:
    model, *_, loaders = _data(2)
    comparison = evaluate_detectors(model, loaders["test"], loaders["ood"], progress_bar=False, device="cpu")
    assert "Mahalanobis" not in comparison.names and {"MSP", "ASH-S", "SCALE", "GradNorm"} <= set(comparison.names)
    with pytest.raises(ValueError, match="detector 'KNN' needs fit_loader, which the call does not provide"):
        evaluate_detectors(model, loaders["test"], loaders["ood"], detectors=["knn"], progress_bar=False)


def test_selection_errors() -> None:
    model, *_, loaders = _data(3)
    call = lambda **kw: evaluate_detectors(model, loaders["test"], loaders["ood"], progress_bar=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="unknown detector 'Foo'; known detectors: MSP, MaxLogit"):
        call(detectors=["Foo"])
    with pytest.raises(ValueError, match="detector 'MSP' is listed twice"):
        call(detectors=["MSP", "msp"])
    with pytest.raises(ValueError, match="detectors must be 'all' or a list"):
        call(detectors="everything")
    with pytest.raises(ValueError, match="options name detectors that are not evaluated"):
        call(detectors=["MSP"], options={"Energy": {"temperature": 2.0}})
    plain = ModelParts(model=model)
    with pytest.raises(ValueError, match="detector 'ReAct' needs features, head"):
        call(detectors=["ReAct"], parts=plain)


def test_failing_detectors_can_be_skipped() -> None:
    model, *_, loaders = _data(5)
    names = ["Energy", "OpenMax"]
    call = lambda **kw: evaluate_detectors(  # noqa: E731
        model, loaders["test"], loaders["ood"], fit_loader=loaders["fit"], detectors=names, progress_bar=False, **kw
    )
    options = {"OpenMax": {"tailsize": 500}}  # more than any class has
    with pytest.raises(ValueError, match="fewer than tailsize=500"):
        call(options=options)
    comparison = call(options=options, errors="skip")
    assert comparison.names == ["Energy"] and "fewer than tailsize=500" in comparison.skipped["OpenMax"]
    assert "Skipped: OpenMax (ValueError: class 0 has" in comparison.to_markdown()
    assert DetectorComparison.from_dict(comparison.to_dict()) == comparison
    with pytest.raises(ValueError, match="errors must be one of"):
        call(errors="ignore")


def test_parts_of_dreamood_backbones() -> None:
    model = Classifier(SmallConvNet(in_channels=1, feature_dim=6, width=2, seed=0), 3)
    parts = ModelParts.from_classifier(model, input_std=[0.5])
    images = torch.randn(2, 1, 8, 8)
    assert parts.feature_map is not None and parts.map_head is not None and len(parts.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(parts.map_head(parts.feature_map(images)), model(images))
    assert parts.input_std == (0.5,)


def test_image_detectors_run_over_the_loaders() -> None:
    from dreamood.detectors import ODIN, Gram, MCDropout, MultiLayerMahalanobis, RankFeat

    torch.manual_seed(0)
    model = Classifier(SmallConvNet(in_channels=1, feature_dim=6, width=2, seed=0), 3)
    model.head = nn.Sequential(nn.Dropout(0.2), model.head)  # type: ignore[assignment]
    images, labels = torch.randn(24, 1, 6, 6), torch.arange(3).repeat(8)
    fit = DataLoader(TensorDataset(images, labels), batch_size=8)
    test = DataLoader(TensorDataset(torch.randn(12, 1, 6, 6), labels[:12]), batch_size=6)
    ood = {"noise": DataLoader(TensorDataset(3 * torch.randn(10, 1, 6, 6)), batch_size=5)}
    head = model.head[1]
    parts = ModelParts(
        model=model,
        features=model.features,
        head=head,
        feature_map=model.backbone.body[:4],
        map_head=nn.Sequential(model.backbone.body[4], model.backbone.body[5], head),
        layers=(model.backbone.body[0], model.backbone.body[3]),
        input_std=(0.5,),
    )
    names = ["ODIN", "RankFeat", "MCDropout", "MahalanobisMultiLayer", "Gram"]
    comparison = evaluate_detectors(
        model, test, ood, fit_loader=fit, parts=parts, detectors=names, progress_bar=False, device="cpu"
    )
    assert comparison.names == names
    evaluator = lambda d: OODEvaluator(d, accuracy=False, progress=False)  # noqa: E731
    expected = {
        "ODIN": ODIN(model, std=[0.5]),
        "RankFeat": RankFeat(parts.feature_map, parts.map_head),  # type: ignore[arg-type]
        "MCDropout": MCDropout(model),
        "MahalanobisMultiLayer": MultiLayerMahalanobis(model, parts.layers, std=[0.5]).fit_loader(fit),
        "Gram": Gram(model, parts.layers).fit_loader(fit),
    }
    model.eval()
    for name, detector in expected.items():
        assert comparison[name].rows == evaluator(detector).evaluate(test, ood).rows, name
    assert "MCDropout" in applicable_detectors(parts, has_fit_data=True)
    assert "MCDropout" not in applicable_detectors(
        ModelParts.from_classifier(Classifier(SmallConvNet(), 2)), has_fit_data=True
    )


def test_validation_data_fits_the_held_out_detectors_and_the_gram_normaliser() -> None:
    from dreamood.detectors import Gram, TemperatureScaling

    model, _, y, test, ood, loaders = _data(4)
    validation = torch.cat([test[::2], ood[:10]])  # any held-out data with labels
    labels = torch.cat([y[::2], torch.zeros(10, dtype=torch.int64)])
    validation_loader = DataLoader(TensorDataset(validation, labels), batch_size=32)
    comparison = evaluate_detectors(
        model,
        loaders["test"],
        loaders["ood"],
        fit_loader=loaders["fit"],
        validation_loader=validation_loader,
        detectors=["TempScaling"],
        progress_bar=False,
        device="cpu",
    )
    with torch.no_grad():
        detector = TemperatureScaling().fit(model(validation), labels)
        scores = {"far": detector.score(model(ood))}
    expected = OODEvaluator(lambda x: x, progress=False).evaluate_scores(detector.score(model(test)), scores)
    assert comparison["TempScaling"].rows == expected.rows
    assert comparison.detectors["TempScaling"] == repr(detector)

    conv = Classifier(SmallConvNet(in_channels=1, feature_dim=4, width=2, seed=0), 2)
    images = DataLoader(TensorDataset(torch.randn(16, 1, 5, 5), torch.arange(2).repeat(8)), batch_size=8)
    held = DataLoader(TensorDataset(torch.randn(8, 1, 5, 5), torch.arange(2).repeat(4)), batch_size=8)
    gram = evaluate_detectors(
        conv, held, {"x": images}, fit_loader=images, validation_loader=held, detectors=["Gram"], progress_bar=False
    )
    parts = ModelParts.from_classifier(conv)
    conv.eval()
    reference = Gram(conv, parts.layers).fit_loader(images).fit_normalizer(held)
    expected_gram = OODEvaluator(reference, accuracy=False, progress=False).evaluate(held, {"x": images})
    assert gram["Gram"].rows == expected_gram.rows
