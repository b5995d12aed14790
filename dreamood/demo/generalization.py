"""The demo's generalisation table: DREAM-ID's decoded inliers against augmentation baselines and MEMO.

DREAM-ID (paper Sec. 5) samples inlier embeddings around the densest bank points of each class and decodes
them with their labels; the augmentation baselines (RandAugment, AutoAugment, AugMix, CutMix) append as many
augmented copies of the training digits; MEMO (Zhang et al., NeurIPS 2022) adapts model (a) at test time.
Every model's top-1 accuracy is measured on the ID test digits and on a rotated copy of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dreamood.demo.context import SeedRun, classifier, loader, recipe, seeded
from dreamood.demo.dream_ood import sampler_settings
from dreamood.demo.labels import ROTATED
from dreamood.feature_bank import FeatureBank

__all__ = ["appended_images", "decode_inliers", "generalization", "train_generalization"]


def decode_inliers(run: SeedRun, bank: FeatureBank) -> tuple[Tensor, Tensor]:
    """DREAM-ID's inliers: embeddings drawn around the densest bank points of each class, decoded, labelled."""
    from dreamood.sampling.knn_boundary import KNNBoundarySampler

    config, anchors = run.config, run.demo.anchors
    settings = sampler_settings(config, int(bank.class_counts.min()), inlier=True)
    sigma = config.effective_inlier_sigma(anchors.dim)
    run.inlier_sampler_settings = {**settings, "sigma": sigma, "num_per_class": config.inliers_per_class}
    sampler = KNNBoundarySampler(
        **settings, sigma=sigma, mode="inlier", seed=run.seed, device=run.device, show_progress=config.progress
    )
    samples = sampler.sample(bank, anchors, config.inliers_per_class)
    samples.save(run.folder / "artifacts" / "inlier_embeddings")
    return run.decode(samples, run.folder / "inliers" / "dream-id")


def appended_images(run: SeedRun, inliers: tuple[Tensor, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The labelled images each generalisation method appends to the training digits, as many for every method.

    DREAM-ID appends its decoded inliers; each augmentation baseline appends a fixed pool of augmented copies
    of the training digits (paper Table 4), ``inliers_per_class`` per class, built once (pool item ``i`` is
    always the same image). CutMix's labels are mixtures: rows of class probabilities.
    """
    from dreamood.baselines import AUGMENTATIONS, AugmentedPool

    data = run.data
    train_set = TensorDataset(data.train_images, data.train_labels)
    extra = {"dream_id": inliers}
    for method in AUGMENTATIONS:
        pool = AugmentedPool(
            train_set, method, num_per_class=run.config.inliers_per_class, num_classes=data.num_classes, seed=run.seed
        )
        images, labels = zip(*(pool[i] for i in range(len(pool))))
        targets = torch.stack(labels) if method == "cutmix" else torch.tensor(labels, dtype=torch.int64)
        extra[method] = (torch.stack(images), targets)
    return extra


def train_generalization(run: SeedRun, extra: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, nn.Module]:
    """The classifier of model (a) trained from scratch on the training digits plus each method's extra images.

    Every step adds a batch of the extra images to the ID batch, as DREAM-ID's training does (paper Sec. 5);
    CutMix's mixed labels are target distributions, which :func:`~dreamood.training.train_classifier` takes as
    they are.
    """
    models: dict[str, nn.Module] = {}
    for key, (images, labels) in extra.items():
        with seeded(run.seed):
            model = classifier(run.config, run.data.num_classes)
        synthetic = loader(images, labels, run.config.classifier_batch_size, run.seed + 1)
        models[key] = run.train(key, model, recipe(run.config), synthetic_id_loader=synthetic)
    return models


def generalization(run: SeedRun, models: Mapping[str, nn.Module]) -> None:
    """Top-1 accuracy of every model of the table, and of MEMO on model (a), into ``run.generalization``."""
    sets = {"ID test": run.data.test_images, ROTATED: run.demo.rotated}
    timer = run.demo.timer
    with timer.stage("generalisation: accuracy", f"seed {run.seed}"):
        for key, model in models.items():
            run.generalization[key] = _accuracies(run, model, sets)
    with timer.stage("generalisation: MEMO", f"seed {run.seed}: {run.config.memo_augmentations} copies per test image"):
        run.generalization["memo"] = _accuracies(run, _memo(run, models["ce"]), sets)


def _accuracies(run: SeedRun, model: Callable[[Tensor], Tensor], sets: Mapping[str, Tensor]) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on every version of the ID test set (all share the test labels)."""
    from dreamood.baselines import classification_accuracy

    return {
        name: classification_accuracy(
            model, loader(images, run.data.test_labels, 512), device=run.device, progress_bar=False
        )
        for name, images in sets.items()
    }


def _memo(run: SeedRun, model: nn.Module) -> Callable[[Tensor], Tensor]:
    """MEMO test-time adaptation (Zhang et al., NeurIPS 2022) of ``model``, restored exactly after every image."""
    from dreamood.baselines import MEMO

    config = run.config
    return MEMO(
        model,
        num_augmentations=config.memo_augmentations,
        lr=config.memo_lr,
        prior_strength=config.memo_prior_strength,
        seed=run.seed,
        device=run.device,
        progress=config.progress,
    )
