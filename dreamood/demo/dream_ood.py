"""The demo's DREAM-OOD path as a :class:`~dreamood.pipeline.Pipeline`: digits, the in-domain decoder, a small CNN.

Anchors -> encoder -> bank -> samples -> images -> classifier -> report run through the library's pipeline,
in ``seed-<seed>/``, with the demo's components: the anchors are the trained decoder's class embeddings, the
decoder is that decoder, the backbones are the demo's small CNNs and the sampler is
:class:`~dreamood.sampling.knn_boundary.KNNBoundarySampler` with the paper's settings scaled to the bank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dreamood.anchors import TokenEmbeddings
from dreamood.config import PipelineConfig
from dreamood.demo.config import DemoConfig
from dreamood.demo.context import SeedRun, to_digits
from dreamood.encoder import TextConditionedEncoder
from dreamood.feature_bank import FeatureBank
from dreamood.models import Classifier, SmallConvNet
from dreamood.pipeline import STAGES, Pipeline, PipelineData
from dreamood.sampling.knn_boundary import KNNBoundarySampler
from dreamood.sampling.samples import EmbeddingSamples

__all__ = ["DigitsPipeline", "sampler_settings"]


def sampler_settings(config: DemoConfig, smallest_class: int, *, inlier: bool = False) -> dict[str, Any]:
    """k, anchor set and anchors per round scaled from the paper's ImageNet-100 values to the bank's class size.

    Outliers: the DREAM-OOD setting (boundary 200 of 1,000, 50 anchors per round, keep 2); inliers: the
    DREAM-ID setting (all 1,000 as anchor set, 100 anchors per round, keep 1).

    Args:
        config: The demo's settings.
        smallest_class: Embeddings of the smallest class in the bank.
        inlier: The DREAM-ID setting rather than DREAM-OOD's.

    Returns:
        ``k``, ``boundary_size``, ``anchors_per_round``, ``candidates_per_anchor`` and ``keep_per_anchor``.
    """
    boundary_fraction = config.inlier_boundary_fraction if inlier else config.boundary_fraction
    anchors_fraction = config.inlier_anchors_fraction if inlier else config.anchors_fraction
    keep = 1 if inlier else config.keep_per_anchor
    k = max(1, min(smallest_class - 1, round(config.k_fraction * smallest_class)))
    boundary = max(1, min(smallest_class, round(boundary_fraction * smallest_class)))
    anchors = max(1, min(boundary, round(anchors_fraction * boundary)))
    return {
        "k": k,
        "boundary_size": boundary,
        "anchors_per_round": anchors,
        "candidates_per_anchor": config.candidates_per_anchor,
        "keep_per_anchor": min(keep, config.candidates_per_anchor),
    }


def _digits_transform(image: Any) -> Tensor:
    """A generated image (PIL) in the digits' format: grey levels in ``[0, 1]``, quantised to 17 levels."""
    from torchvision.transforms.functional import pil_to_tensor

    return to_digits(pil_to_tensor(image.convert("L")).float() / 255.0)


@dataclass
class DreamOOD:
    """What the DREAM-OOD path produced for one seed, up to the generated images."""

    encoder: TextConditionedEncoder
    bank: FeatureBank
    outliers: EmbeddingSamples
    images: Path


class DigitsPipeline(Pipeline):
    """The :class:`~dreamood.pipeline.Pipeline` of one seed of the demo.

    The encoder's backbone has the encoder's size and the classifier's the classifier's (the configuration names
    both ``"small"``), so :meth:`new_encoder` builds its backbone from the encoder settings. Every stage is
    forced: the components (the decoder above all) are not part of the configuration, so an artefact left in the
    folder by another run could not be told apart.

    Args:
        run: The seed; its ``sampler_settings`` are set to the sampler's.
    """

    def __init__(self, run: SeedRun) -> None:
        config, data = run.config, run.data
        self.demo_config = config
        smallest = int(torch.bincount(data.train_labels).min())
        settings = sampler_settings(config, smallest)
        sigma = config.effective_sigma(run.demo.anchors.dim)
        run.sampler_settings = {**settings, "sigma": sigma, "num_per_class": config.outliers_per_class}
        sampler = KNNBoundarySampler(
            **settings, sigma=sigma, seed=run.seed, device=run.device, show_progress=config.progress
        )
        decoder = run.demo.decoder

        def anchors(class_names: Sequence[str]) -> TokenEmbeddings:
            return decoder.token_embeddings

        def backbone(name: str, stem: str) -> nn.Module:
            return SmallConvNet(1, config.classifier_feature_dim, width=config.classifier_width)

        super().__init__(
            _pipeline_config(run, settings, sigma),
            _pipeline_data(run),
            anchor_source=anchors,
            sampler=sampler,
            decoder_factory=lambda pipeline_config, names: decoder,
            backbone_factory=backbone,
            force=[stage.name for stage in STAGES],
        )

    def new_encoder(self, anchors: TokenEmbeddings) -> TextConditionedEncoder:
        """A freshly initialised encoder: the demo's encoder CNN and a projection to the anchors (seeded)."""
        config = self.demo_config
        with self.seeded_init():
            backbone = SmallConvNet(1, config.encoder_feature_dim, width=config.encoder_width)
            temperature = self.config.encoder.temperature
            return TextConditionedEncoder(backbone, config.encoder_feature_dim, anchors, temperature)

    def outliers(self, run: SeedRun) -> DreamOOD:
        """Anchors, Phase 1 (encoder and bank), Phase 2 (outlier embeddings) and their decoding.

        Also measures the encoder's nearest-anchor accuracy on the ID test digits into ``run``.
        """
        with run.demo.timer.stage("phase 1: encoder + feature bank", f"seed {run.seed}"):
            anchors = self.anchors()
            encoder = self.fit_encoder(anchors)
            bank = self.feature_bank(encoder)
            with torch.no_grad():
                logits = encoder(run.data.test_images.to(run.device))
            run.encoder_test_accuracy = float((logits.argmax(dim=1).cpu() == run.data.test_labels).float().mean())
        with run.demo.timer.stage("phase 2: outlier embeddings", f"seed {run.seed}"):
            outliers = self.sample(bank, anchors)
        with run.demo.timer.stage("decoding outliers", f"seed {run.seed}"):
            images = self.generate(outliers)
        return DreamOOD(encoder, bank, outliers, images)

    def classifier(self, run: SeedRun, images: Path) -> Classifier:
        """Phase 3 of DREAM-OOD: the pipeline's classifier stage; records its final training accuracy in ``run``."""
        model = self.train(images)
        history = json.loads((self.output_dir / "classifier" / "metrics.json").read_text())["history"]
        run.train_accuracy["dream_ood"] = float(history[-1]["accuracy"])
        return model


def _pipeline_config(run: SeedRun, settings: dict[str, Any], sigma: float) -> PipelineConfig:
    """The demo's settings of one seed as a pipeline configuration writing into ``seed-<seed>/``."""
    config, data = run.config, run.data
    largest = int(torch.bincount(data.train_labels).max())
    return PipelineConfig().replace(
        **{
            "benchmark": "folder",
            "output_dir": str(run.folder),
            "seed": run.seed,
            "device": str(run.device),
            "progress": config.progress,
            "data.class_names": list(data.class_names),
            "data.image_size": int(data.train_images.shape[-1]),
            "data.num_workers": 0,
            "encoder.backbone": "small",
            "encoder.epochs": config.encoder_epochs,
            "encoder.batch_size": config.encoder_batch_size,
            "encoder.lr": config.encoder_lr,
            "bank.per_class": largest,  # the whole training set
            "bank.batch_size": 256,
            "sampler.k": settings["k"],
            "sampler.boundary": settings["boundary_size"],
            "sampler.anchors_per_round": settings["anchors_per_round"],
            "sampler.candidates_per_anchor": settings["candidates_per_anchor"],
            "sampler.keep": settings["keep_per_anchor"],
            "sampler.sigma": sigma,
            "sampler.num_per_class": config.outliers_per_class,
            "generation.images_per_class": config.outliers_per_class,
            "generation.batch_size": config.decode_batch_size,
            "generation.steps": config.ddim_steps,
            "generation.guidance_scale": config.guidance_scale,
            "training.backbone": "small",
            "training.epochs": config.classifier_epochs,
            "training.lr": config.classifier_lr,
            "training.beta": config.beta,
            "training.head": config.ood_head,
            "training.batch_size": config.classifier_batch_size,
            "training.outlier_batch_size": config.classifier_batch_size,
            "evaluation.protocol": "full",
            "evaluation.batch_size": 512,
        }
    )


def _pipeline_data(run: SeedRun) -> PipelineData:
    """The digits as the pipeline's datasets (tensors, as :func:`~dreamood.testing.smoke_setup` builds them)."""
    data = run.data
    train = TensorDataset(data.train_images, data.train_labels)
    return PipelineData(
        list(data.class_names),
        train=train,
        bank=train,
        test=TensorDataset(data.test_images, data.test_labels),
        ood={name: TensorDataset(images) for name, images in run.demo.test_sets.items()},
        generated_transform=_digits_transform,
        raw_train=train,
    )
