"""Bring your own post-hoc detector: ``fit(features, labels) -> self`` and ``score(features)``, higher = more ID.

The detector below is SHE, the Simplified Hopfield Energy of Zhang et al., "Out-of-Distribution Detection
based on In-Distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023: ``fit`` stores
one pattern per class, the mean penultimate feature of the training samples the classifier gets right;
``score`` is the inner product of a feature with the pattern of its predicted class. Subclassing
:class:`dreamood.detectors.Detector` gives it the library's conventions (``inputs``, ``reference``, a
``repr``, a not-fitted error, ``__call__``); :class:`~dreamood.evaluation.OODEvaluator` takes any object with a
``score`` method (:class:`dreamood.evaluation.SupportsScore`), inherited or not.

It is evaluated on tiny synthetic features next to two built-in detectors:

    python examples/howto_custom_detector.py
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dreamood import OODEvaluator
from dreamood.detectors import KNN, Detector, Mahalanobis
from dreamood.evaluation import SupportsScore


class SHE(Detector):
    """Simplified Hopfield Energy: ``<f(x), P[argmax_c head(f(x))_c]>``; higher = more in-distribution.

    Zhang et al. "Out-of-Distribution Detection based on In-Distribution Data Patterns
    Memorization with Modern Hopfield Energy", ICLR 2023.

    Args:
        head: The classifier's last layer, mapping features to logits.
        device: Where the computation runs (``None``: the device of the features).

    Attributes:
        patterns_: ``(C, d)`` mean feature of the correctly classified training samples of each class
            (of all its samples when the classifier gets none of them right), set by :meth:`fit`.
    """

    inputs = "features"
    reference = (
        "Zhang et al. Out-of-Distribution Detection based on In-Distribution Data Patterns "
        "Memorization with Modern Hopfield Energy. ICLR 2023."
    )

    def __init__(self, head: nn.Linear, device: str | None = None) -> None:
        super().__init__(device)
        self.head = head

    @torch.no_grad()
    def fit(self, features: Tensor, labels: Tensor | None = None) -> SHE:
        """Store the class patterns from in-distribution training features and their labels."""
        if labels is None:
            raise ValueError("SHE needs the training labels: call fit(features, labels)")
        predicted = self.head(features).argmax(dim=1)
        patterns = []
        for c in range(self.head.out_features):
            correct = (labels == c) & (predicted == c)
            rows = features[correct] if bool(correct.any()) else features[labels == c]
            if len(rows) == 0:
                raise ValueError(f"class {c} has no training feature")
            patterns.append(rows.double().mean(dim=0))
        self.patterns_ = torch.stack(patterns)
        return self

    @torch.no_grad()
    def score(self, features: Tensor) -> Tensor:
        """One score per row of ``features`` ``(N, d)``: the inner product with its predicted class's pattern."""
        self._check_fitted("patterns_")
        device = self._compute_device(features)
        patterns = self.patterns_.to(device)
        predicted = self.head.to(device)(features.to(device)).argmax(dim=1)
        scores = (features.to(device).double() * patterns[predicted]).sum(dim=1)
        return scores.to(features.dtype).to(features.device)


def toy_features(seed: int = 0) -> dict[str, Tensor]:
    """Non-negative (post-ReLU-like) features of 4 ID classes, and two OOD sets: near and far."""
    g = torch.Generator().manual_seed(seed)
    num_classes, dim = 4, 16
    means = 2.0 * torch.rand(num_classes, dim, generator=g)

    def draw(centres: Tensor, count: int) -> Tensor:
        return (centres + 0.6 * torch.randn(count, dim, generator=g)).relu()

    train_labels = torch.arange(num_classes).repeat_interleave(100)
    test_labels = torch.arange(num_classes).repeat_interleave(50)
    return {
        "train": draw(means[train_labels], len(train_labels)),
        "train_labels": train_labels,
        "test": draw(means[test_labels], len(test_labels)),
        "near": draw(means.mean(dim=0).expand(200, dim), 200),  # between the classes
        "far": draw(torch.full((200, dim), 0.3), 200),  # weak activations everywhere
        "means": means,
    }


def nearest_mean_head(means: Tensor) -> nn.Linear:
    """The linear classifier that predicts the nearest class mean: ``w_c = mu_c``, ``b_c = -||mu_c||^2 / 2``."""
    head = nn.Linear(means.shape[1], means.shape[0])
    with torch.no_grad():
        head.weight.copy_(means)
        head.bias.copy_(-0.5 * means.square().sum(dim=1))
    return head


def main() -> dict[str, object]:
    """Fit SHE and two built-in detectors on the training features and evaluate them on the OOD sets."""
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    data = toy_features()
    head = nearest_mean_head(data["means"])

    she = SHE(head)
    assert isinstance(she, SupportsScore)  # what OODEvaluator consumes: score(features)
    detectors = {"SHE": she, "Mahalanobis": Mahalanobis(), "KNN": KNN(k=10)}
    # Without a model, the evaluator hands each loader batch (here: features) straight to the detector.
    id_batches = list(data["test"].split(64))
    ood_batches = {name: list(data[name].split(64)) for name in ("near", "far")}
    reports = {}
    # Percentages, as in the OODReport tables printed below.
    print(f"{'detector':12} {'OOD set':8} {'FPR95 (ID+) %':>14} {'FPR95 (OOD+) %':>15} {'AUROC %':>8}")
    for name, detector in detectors.items():
        detector.fit(data["train"], data["train_labels"])
        evaluator = OODEvaluator(detector, protocol="full", device="cpu", progress=False)
        reports[name] = evaluator.evaluate(id_batches, ood_batches)
        for row in reports[name].rows:
            m = row.metrics
            fpr_id, fpr_ood, auroc = (100 * m[key] for key in ("fpr95", "fpr95_ood_positive", "auroc"))
            print(f"{name:12} {row.name:8} {fpr_id:14.2f} {fpr_ood:15.2f} {auroc:8.2f}")
    print(f"\nSHE: {SHE.reference}")
    print(reports["SHE"].to_markdown())
    return {"she": she, "data": data, "head": head, "reports": reports}


if __name__ == "__main__":
    main()
