"""The demo's own Phase 3 experiments next to DREAM-OOD: other outlier sources, OOD baselines, post-hoc detectors.

Every classifier here shares DREAM-OOD's architecture, initial weights and recipe, so that only the source of
the outliers (or the detection method) differs: cross-entropy only, Table 2 (I) Gaussian noise on ``T(y)``,
VOS and NPOS in feature space, GODIN (Hsu et al., CVPR 2020) and GAN-based outliers (Lee et al., ICLR 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dreamood.demo.config import PAPER_KNN_DETECTOR_K, PAPER_KNN_DETECTOR_TRAIN
from dreamood.demo.context import SeedRun, classifier, loader, recipe, seeded
from dreamood.evaluation import OODReport
from dreamood.feature_bank import FeatureBank
from dreamood.io import save_checkpoint
from dreamood.sampling.samples import EmbeddingSamples

__all__ = ["Scoring", "evaluate", "token_noise_outliers", "train_classifiers", "train_ood_baselines"]


class Scoring(NamedTuple):
    """How an OOD baseline is scored.

    Attributes:
        scorer: The evaluator's scorer.
        model: What the evaluator runs before the scorer (``None``: the scorer takes the images).
        classifier: The classifier whose ID accuracy the row reports when the evaluator runs no model.
    """

    scorer: Any
    model: Callable[[Tensor], Tensor] | None
    classifier: nn.Module | None


def token_noise_outliers(run: SeedRun, bank: FeatureBank) -> EmbeddingSamples:
    """Table 2 (I): Gaussian noise on ``T(y)``, with the paper's noise-to-token ratio; saved with the artefacts."""
    from dreamood.sampling.token_samplers import GaussianTokenNoiseSampler

    anchors = run.demo.anchors
    run.token_noise_std = run.config.effective_token_noise_std(anchors.dim, float(anchors.norms.mean()))
    sampler = GaussianTokenNoiseSampler(run.token_noise_std, seed=run.seed, device=run.device)
    noisy = sampler.sample(bank, anchors, run.config.outliers_per_class)
    noisy.save(run.folder / "artifacts" / "token_noise_embeddings")
    return noisy


def train_classifiers(run: SeedRun, noise_images: Tensor, dream_ood: Callable[[], nn.Module]) -> dict[str, nn.Module]:
    """Phase 3: the same classifier (architecture, initial weights, recipe) trained five ways.

    Args:
        run: The seed.
        noise_images: The decoded Table 2 (I) outliers.
        dream_ood: Trains the DREAM-OOD classifier (the pipeline's classifier stage).

    Returns:
        The trained models by key of :data:`~dreamood.demo.labels.METHODS`.
    """
    from dreamood.training import EnergyOODRegularizer

    config, data, seed = run.config, run.data, run.seed
    base = replace(recipe(config), beta=config.beta)
    feature_start = min(config.classifier_epochs - 1, round(config.feature_ood_start * config.classifier_epochs))
    models: dict[str, nn.Module] = {}
    for key in ("ce", "dream_ood", "token_noise", "vos", "npos"):
        if key == "dream_ood":
            models[key] = dream_ood()
            continue
        with seeded(seed):
            model = classifier(config, data.num_classes)
            regularizer = EnergyOODRegularizer(head=config.ood_head)
        if key == "ce":
            models[key] = run.train(key, model, base)
        elif key == "token_noise":
            outliers = loader(noise_images, None, config.classifier_batch_size, seed + 1)
            models[key] = run.train(key, model, base, outlier_loader=outliers, regularizer=regularizer)
        else:
            sampler = _vos(run) if key == "vos" else _npos(run, models["ce"])
            models[key] = run.train(
                key,
                model,
                replace(base, ood_start_epoch=feature_start),
                feature_sampler=sampler,
                feature_extractor=model.features,
                classifier_head=model.head,
                regularizer=regularizer,
            )
    return models


def _queue_size(run: SeedRun) -> int:
    return min(run.config.feature_queue_size, int(torch.bincount(run.data.train_labels).min()))


def _vos(run: SeedRun) -> Any:
    from dreamood.sampling.feature_samplers import VOSSampler

    return VOSSampler(run.data.num_classes, queue_size=_queue_size(run), seed=run.seed)


def _npos(run: SeedRun, ce_model: nn.Module) -> Any:
    """NPOS with sigma a tenth of the mean penultimate-feature norm of the cross-entropy model."""
    from dreamood.sampling.feature_samplers import NPOSSampler

    queue = _queue_size(run)
    run.npos_sigma = 0.1 * _mean_feature_norm(ce_model, run.data.train_images, run.device)
    return NPOSSampler(
        run.data.num_classes,
        queue_size=queue,
        k=max(1, min(queue - 1, round(0.1 * queue))),
        num_boundary=max(2, round(0.05 * queue)),
        num_anchors=2,
        sigma=run.npos_sigma,
        seed=run.seed,
    )


@torch.no_grad()
def _mean_feature_norm(model: nn.Module, images: Tensor, device: torch.device) -> float:
    features = model.features(images.to(device))  # type: ignore[operator]
    return float(features.norm(dim=1).mean())


def train_ood_baselines(run: SeedRun) -> dict[str, Scoring]:
    """GODIN and GAN-based outliers: the classifier of Phase 3 (same backbone and recipe), each scored its way.

    GODIN (Hsu et al., CVPR 2020) replaces the linear head by ``h(x) / g(x)``, trains without weight decay on
    ``h``, and scores ``max_i h_i`` of an input perturbed by the ``epsilon`` that maximises the mean score of
    ID images; the ID training digits serve as its validation data (no OOD or test image is used). The
    ``epsilon = 0`` row scores the unperturbed ``max_i h_i``. The GAN baseline (Lee et al., ICLR 2018) trains
    a DCGAN with the classifier so that its samples lie at the boundary of the ID data, and the classifier
    is pushed to a uniform prediction on them; it is scored with the maximum softmax probability.

    Returns:
        For each row of :data:`~dreamood.demo.labels.OOD_BASELINES`, the scorer, the model the evaluator runs,
        and the classifier whose accuracy the row reports when the evaluator cannot measure it.
    """
    from dreamood.evaluation import max_logit_score, msp_score

    godin_model, detector = _godin(run)
    gan_model = _gan(run)
    return {
        "godin": Scoring(detector, None, godin_model),
        "godin_eps0": Scoring(max_logit_score, godin_model.similarity_model(), None),
        "gan": Scoring(msp_score, gan_model, None),
    }


def _godin(run: SeedRun) -> tuple[Any, Any]:
    from dreamood.baselines import GODIN, GodinClassifier, train_godin
    from dreamood.models import SmallConvNet

    config = run.config
    with seeded(run.seed):
        backbone = SmallConvNet(1, config.classifier_feature_dim, width=config.classifier_width)
        model = GodinClassifier(backbone, run.data.num_classes, similarity=config.godin_similarity)
    run.train("godin", model, recipe(config), train=train_godin)
    detector = GODIN(model, device=run.device).fit(run.data.train_images)
    run.godin_epsilon = detector.epsilon_
    run.godin_validation_scores = {f"{eps:g}": score for eps, score in detector.validation_scores_.items()}
    return model, detector


def _gan(run: SeedRun) -> nn.Module:
    from dreamood.baselines import ConfidenceGAN, UniformKLRegularizer

    config, data = run.config, run.data
    with seeded(run.seed):
        model = classifier(config, data.num_classes)
    gan = ConfidenceGAN(
        image_size=int(data.train_images.shape[-1]),
        channels=int(data.train_images.shape[1]),
        generator_width=config.gan_width,
        discriminator_width=config.gan_width,
        beta=config.gan_beta,
        seed=run.seed,
        device=run.device,
    )
    real = loader(data.train_images, None, config.classifier_batch_size, run.seed + 2)
    outliers = gan.outlier_loader(real, model)
    model = run.train(
        "gan",
        model,
        replace(recipe(config), beta=gan.beta),
        outlier_loader=outliers,
        regularizer=UniformKLRegularizer(),
        extra_state={"gan": outliers},
    )
    save_checkpoint(run.folder / "classifiers" / "gan" / "dcgan.pt", {"model": gan.state_dict()})
    return model


class _Evaluation:
    """Evaluates scorers on the ID test digits and every OOD set, writing ``reports/<key>.json`` of the seed."""

    def __init__(self, run: SeedRun) -> None:
        self.run = run
        self.id_loader = loader(run.data.test_images, run.data.test_labels, 512)
        self.ood_loaders = {name: loader(images, None, 512) for name, images in run.demo.test_sets.items()}

    def __call__(
        self,
        key: str,
        scorer: Any,
        model: Callable[[Tensor], Tensor] | None,
        accuracy: bool = True,
        accuracy_of: nn.Module | None = None,
    ) -> None:
        from dreamood.baselines import classification_accuracy
        from dreamood.evaluation import OODEvaluator

        evaluator = OODEvaluator(scorer, model=model, accuracy=accuracy, device=self.run.device, progress=False)
        report = evaluator.evaluate(self.id_loader, self.ood_loaders)
        if accuracy_of is not None:
            measured = classification_accuracy(accuracy_of, self.id_loader, device=self.run.device, progress_bar=False)
            report = replace(report, id_accuracy=measured)
        self.record(key, report)

    def record(self, key: str, report: OODReport) -> None:
        report.to_json(self.run.folder / "reports" / f"{key}.json")
        self.run.reports[key] = report.to_dict()


def evaluate(
    run: SeedRun, models: Mapping[str, nn.Module], baselines: Mapping[str, Scoring], dream_ood: OODReport
) -> None:
    """Energy scores of models (a)-(e), the baselines' own scores, post-hoc detectors on model (a), pixel mean.

    Args:
        run: The seed.
        models: The classifiers of Phase 3 but DREAM-OOD's.
        baselines: The OOD baselines and how each is scored.
        dream_ood: The pipeline's report of the DREAM-OOD classifier (same scorer, sets and protocol).
    """
    from dreamood.evaluation import energy_score

    evaluate_one = _Evaluation(run)
    for key, model in models.items():
        if key == "dream_ood":
            evaluate_one.record(key, dream_ood)
        else:
            evaluate_one(key, energy_score, model)
    for key, scoring in baselines.items():
        # A scorer of images (GODIN) gets no model; the accuracy then comes from its classifier.
        evaluate_one(key, scoring.scorer, scoring.model, scoring.classifier is None, scoring.classifier)
    _posthoc(run, models["ce"], evaluate_one)
    reference = float(run.data.train_images.mean(dim=(1, 2, 3)).mean())

    def pixel_mean_score(images: Tensor) -> Tensor:
        return -(images.mean(dim=(1, 2, 3)) - reference).abs()

    evaluate_one("pixel_mean", pixel_mean_score, None, accuracy=False)


def _posthoc(run: SeedRun, baseline: Any, evaluate_one: _Evaluation) -> None:
    """Post-hoc detectors on the cross-entropy model, fitted on its training features."""
    from dreamood.detectors import KNN, MSP, Mahalanobis, MaxLogit, ReAct, ViM

    data = run.data
    with torch.no_grad():
        _, train_features = baseline.forward_with_features(data.train_images.to(run.device))
    train_labels = data.train_labels.to(run.device)
    knn_k = max(1, round(PAPER_KNN_DETECTOR_K * len(data.train_labels) / PAPER_KNN_DETECTOR_TRAIN))
    posthoc: dict[str, tuple[Any, bool]] = {
        "posthoc_msp": (MSP(), False),
        "posthoc_maxlogit": (MaxLogit(), False),
        "posthoc_mahalanobis": (Mahalanobis().fit(train_features, train_labels), True),
        "posthoc_knn": (KNN(k=knn_k).fit(train_features), True),
        "posthoc_vim": (ViM(baseline.head).fit(train_features), True),
        "posthoc_react": (ReAct(baseline.head).fit(train_features), True),
    }
    for key, (detector, on_features) in posthoc.items():
        evaluate_one(key, detector, baseline.features if on_features else baseline, accuracy=not on_features)
