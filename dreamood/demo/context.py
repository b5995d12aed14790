"""What the demo's stages share: the run (data, decoder, output, timer), one seed's state, and small helpers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.anchors import TokenEmbeddings
from dreamood.decoding.generation import generate_images
from dreamood.decoding.in_domain import InDomainDiffusionDecoder
from dreamood.demo.config import DemoConfig
from dreamood.demo.data import DIGIT_LEVELS, DigitsData
from dreamood.sampling.samples import EmbeddingSamples
from dreamood.training.config import TrainingConfig, TrainingResult

__all__ = ["DemoRun", "SeedRun", "StageTimer"]

logger = logging.getLogger("dreamood.demo")


class StageTimer:
    """Wall-clock and CPU seconds per named stage (a stage entered several times, e.g. per seed, adds up).

    The CPU time is this process's (all its threads); on a busy machine the wall-clock time exceeds it. Each
    stage is announced on the ``dreamood.demo`` logger when it starts.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        """Time the block and add its durations to ``name``; ``detail`` is only logged."""
        logger.info("== %s%s", name, f" ({detail})" if detail else "")
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - wall
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu

    @property
    def total(self) -> float:
        """Wall-clock seconds summed over the stages."""
        return sum(self.seconds.values())


@dataclass
class DemoRun:
    """What every seed of the demo shares: settings, data, the trained decoder, the output folder, the timer."""

    config: DemoConfig
    data: DigitsData
    test_sets: dict[str, Tensor]
    rotated: Tensor
    decoder: InDomainDiffusionDecoder
    decoder_info: dict[str, Any]
    device: torch.device
    out_dir: Path
    timer: StageTimer
    figures: dict[str, str]

    @property
    def anchors(self) -> TokenEmbeddings:
        """The anchors T(y): the decoder's learned class embeddings."""
        return self.decoder.token_embeddings


@dataclass
class SeedRun:
    """One seed of Phases 1-3: the shared run, and everything the seed produced that the report needs."""

    demo: DemoRun
    seed: int
    encoder_test_accuracy: float = float("nan")
    sampler_settings: dict[str, Any] = field(default_factory=dict)
    token_noise_std: float = float("nan")
    npos_sigma: float = float("nan")
    inlier_sampler_settings: dict[str, Any] = field(default_factory=dict)
    godin_epsilon: float = float("nan")
    godin_validation_scores: dict[str, float] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_accuracy: dict[str, float] = field(default_factory=dict)
    generalization: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def config(self) -> DemoConfig:
        """The demo's settings."""
        return self.demo.config

    @property
    def data(self) -> DigitsData:
        """The digits."""
        return self.demo.data

    @property
    def device(self) -> torch.device:
        """Where the networks run."""
        return self.demo.device

    @property
    def folder(self) -> Path:
        """The seed's output folder, ``seed-<seed>``."""
        return self.demo.out_dir / f"seed-{self.seed}"

    @property
    def first(self) -> bool:
        """Whether this is the first seed (the one the figures show)."""
        return self.seed == self.config.seed

    def id_loader(self) -> DataLoader[Any]:
        """The ID training digits in the order every classifier of the seed sees them."""
        return loader(self.data.train_images, self.data.train_labels, self.config.classifier_batch_size, self.seed)

    def train(
        self,
        key: str,
        model: nn.Module,
        recipe: TrainingConfig,
        train: Callable[..., TrainingResult] | None = None,
        **inputs: Any,
    ) -> nn.Module:
        """Train ``model`` on the ID training digits (with ``inputs``: outliers, extra images, ...), in place.

        ``train`` is the training function: :func:`~dreamood.training.train_classifier` by default, or a wrapper
        of it such as :func:`~dreamood.baselines.train_godin`. Either writes its checkpoint and history to
        ``seed-<seed>/classifiers/<key>/``; the loop's seed is the run's.

        Returns:
            The trained model, in eval mode.
        """
        from dreamood.training import train_classifier

        result = (train or train_classifier)(
            model,
            self.id_loader(),
            recipe,
            device=str(self.device),
            seed=self.seed,
            output_dir=self.folder / "classifiers" / key,
            progress=self.config.progress,
            **inputs,
        )
        self.train_accuracy[key] = result.final.accuracy
        return model.eval()

    def decode(self, samples: EmbeddingSamples, folder: Path, *, progress: bool | None = None) -> tuple[Tensor, Tensor]:
        """Render ``samples`` with the decoder into ``folder`` and read them back as digits (see :func:`decode`)."""
        shown = self.config.progress if progress is None else progress
        return decode(self.demo.decoder, samples, folder, self.config, seed=self.seed, progress=shown)


def recipe(config: DemoConfig) -> TrainingConfig:
    """The recipe every classifier of the demo is trained with: the paper's SGD, cosine schedule, weight decay."""
    return TrainingConfig(epochs=config.classifier_epochs, lr=config.classifier_lr)


def classifier(config: DemoConfig, num_classes: int) -> Any:
    """The demo's classifier: a small CNN with a linear head (initialised from torch's global random state)."""
    from dreamood.models import Classifier, SmallConvNet

    backbone = SmallConvNet(1, config.classifier_feature_dim, width=config.classifier_width)
    return Classifier(backbone, num_classes)


def to_digits(images: Tensor) -> Tensor:
    """Quantise images in ``[0, 1]`` to the digits' 17 grey levels."""
    levels = DIGIT_LEVELS - 1
    return torch.round(images * levels) / levels


def decode(
    decoder: InDomainDiffusionDecoder,
    samples: EmbeddingSamples,
    folder: Path,
    config: DemoConfig,
    *,
    seed: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Render ``samples`` into ``folder`` and read them back in the digits' format ``(N, 1, 8, 8)``, 17 levels.

    Returns:
        The images and their labels, in the order of ``samples``.
    """
    generate_images(
        decoder, samples, folder, batch_size=config.decode_batch_size, seed=seed, show_progress=progress, overwrite=True
    )
    return read_digits(folder, int(decoder.image_size))


def read_digits(folder: Path, image_size: int) -> tuple[Tensor, Tensor]:
    """The generated images of ``folder`` in the digits' format, with their labels, in the folder's order."""
    from dreamood.data.generated import GeneratedImageFolder

    dataset = GeneratedImageFolder(folder, image_size=image_size, mode="L")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return to_digits(images), torch.tensor(dataset.targets, dtype=torch.int64)


def loader(images: Tensor, labels: Tensor | None, batch_size: int, shuffle_seed: int | None = None) -> DataLoader[Any]:
    """A DataLoader over in-memory tensors; shuffled by a generator seeded with ``shuffle_seed`` when given."""
    dataset = TensorDataset(images) if labels is None else TensorDataset(images, labels)
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_seed is not None, generator=generator)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU random state seeded by ``seed``; restore the previous state afterwards.

    Modules initialise their weights from the global state; seeding it here makes every model of a seed start
    from the same weights whatever ran before (a decoder trained or loaded from the cache, for example).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
