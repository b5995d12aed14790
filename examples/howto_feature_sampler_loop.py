"""Use the VOS and NPOS feature-space outlier samplers inside any training loop.

A :class:`dreamood.FeatureOutlierSampler` needs three calls: ``update(features, labels)`` with each batch's
penultimate features, ``ready`` (true once every class queue is full) and ``sample()``, which returns
virtual outlier features. Pass them through the classifier's last layer and regularise with the energy loss
(:class:`dreamood.EnergyOODRegularizer`, paper Eq. 7 / VOS Eq. 5), or with any loss of your own.

The script trains a small classifier on three Gaussian blobs three ways -- cross-entropy only, a
hand-written loop with :class:`~dreamood.sampling.feature_samplers.VOSSampler`, and
:func:`dreamood.train_classifier` with :class:`~dreamood.sampling.feature_samplers.NPOSSampler` -- and scores
held-out ID points and far-away points with the negative energy. It runs on a CPU in seconds:

    python examples/howto_feature_sampler_loop.py
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood import EnergyOODRegularizer, FeatureOutlierSampler, TrainingConfig, ood_metrics, train_classifier
from dreamood.evaluation import energy_score
from dreamood.models import Classifier
from dreamood.sampling.feature_samplers import NPOSSampler, VOSSampler

NUM_CLASSES, INPUT_DIM, FEATURE_DIM = 3, 8, 16


def blobs(seed: int = 0) -> dict[str, Tensor]:
    """Three ID Gaussian blobs at radius 4 (train and test) and OOD points on the sphere of radius 8."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * F.normalize(torch.randn(NUM_CLASSES, INPUT_DIM, generator=g), dim=1)
    train_y = torch.arange(NUM_CLASSES).repeat_interleave(128)
    test_y = torch.arange(NUM_CLASSES).repeat_interleave(64)
    far = 8.0 * F.normalize(torch.randn(192, INPUT_DIM, generator=g), dim=1)
    return {
        "train_x": centres[train_y] + torch.randn(len(train_y), INPUT_DIM, generator=g),
        "train_y": train_y,
        "test_x": centres[test_y] + torch.randn(len(test_y), INPUT_DIM, generator=g),
        "ood_x": far,
    }


def make_model(seed: int = 0) -> Classifier:
    """An MLP backbone (the penultimate features) and a linear head: ``model.features`` and ``model.head``."""
    with torch.random.fork_rng():  # seeded initial weights, global random state untouched
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Linear(INPUT_DIM, 32), nn.ReLU(), nn.Linear(32, FEATURE_DIM), nn.ReLU())
        return Classifier(backbone, NUM_CLASSES, feature_dim=FEATURE_DIM)


def loader(data: dict[str, Tensor], seed: int = 0) -> DataLoader[tuple[Tensor, ...]]:
    dataset = TensorDataset(data["train_x"], data["train_y"])
    return DataLoader(dataset, batch_size=48, shuffle=True, generator=torch.Generator().manual_seed(seed))


def train_by_hand(
    model: Classifier,
    batches: DataLoader[tuple[Tensor, ...]],
    epochs: int,
    sampler: FeatureOutlierSampler | None = None,
    beta: float = 0.5,
) -> None:
    """Cross-entropy, plus ``beta`` times the energy loss on virtual outliers once the sampler is ready."""
    regularizer = EnergyOODRegularizer(head="linear")
    parameters = list(model.parameters()) + list(regularizer.parameters())
    optimiser = torch.optim.SGD(parameters, lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for images, labels in batches:
            logits, features = model.forward_with_features(images)
            loss = F.cross_entropy(logits, labels)
            if sampler is not None:
                if sampler.ready:
                    virtual = sampler.sample()  # (M, FEATURE_DIM), detached from the queues
                    loss = loss + beta * regularizer(logits, model.head(virtual))
                sampler.update(features.detach(), labels)  # a copy of this batch goes into the class queues
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


@torch.no_grad()
def evaluate(model: Classifier, data: dict[str, Tensor]) -> dict[str, float]:
    """ID accuracy, and FPR95 / AUROC of the negative energy (higher = more ID) against the far points."""
    model.eval()
    id_logits = model(data["test_x"])
    metrics = ood_metrics(energy_score(id_logits), energy_score(model(data["ood_x"])))
    accuracy = float((id_logits.argmax(dim=1) == torch.arange(NUM_CLASSES).repeat_interleave(64)).float().mean())
    return {"accuracy": accuracy, "fpr95": metrics.fpr95, "auroc": metrics.auroc}


def main() -> dict[str, Any]:
    """Train the three variants, print their ID accuracy and OOD metrics, and return models and metrics."""
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    torch.manual_seed(0)  # the regularisers' heads start from the global generator
    data = blobs()
    results = {}

    baseline = make_model()
    train_by_hand(baseline, loader(data), epochs=15)
    results["cross-entropy only"] = evaluate(baseline, data)

    # VOS in a hand-written loop: class-conditional Gaussians on the queued features, lowest-likelihood draws.
    vos_model = make_model()
    vos = VOSSampler(NUM_CLASSES, queue_size=64, sample_from=1000, select=4, seed=0)
    train_by_hand(vos_model, loader(data), epochs=15, sampler=vos)
    results["VOS, own loop"] = evaluate(vos_model, data)

    # NPOS through the library's loop: it feeds model.features to the sampler and model.head to the regulariser.
    npos_model = make_model()
    npos = NPOSSampler(
        NUM_CLASSES,
        queue_size=64,
        k=8,
        num_boundary=16,
        num_anchors=4,
        candidates_per_anchor=64,
        keep_per_anchor=2,
        sigma=0.5,
        seed=0,
    )
    train_classifier(
        npos_model,
        loader(data),
        TrainingConfig(epochs=15, lr=0.05, beta=0.5),
        feature_sampler=npos,
        feature_extractor=npos_model.features,
        classifier_head=npos_model.head,
        regularizer=EnergyOODRegularizer(head="linear"),
        device="cpu",
        progress=False,
    )
    results["NPOS, train_classifier"] = evaluate(npos_model, data)

    print(f"{'':24} {'ID acc':>7} {'FPR95 (ID+)':>12} {'AUROC':>7}")
    for name, values in results.items():
        print(f"{name:24} {values['accuracy']:7.3f} {values['fpr95']:12.3f} {values['auroc']:7.3f}")
    models = {"cross-entropy only": baseline, "VOS, own loop": vos_model, "NPOS, train_classifier": npos_model}
    return {"metrics": results, "models": models, "samplers": {"VOS": vos, "NPOS": npos}, "data": data}


if __name__ == "__main__":
    main()
