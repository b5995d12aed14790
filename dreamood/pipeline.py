"""The whole DREAM-OOD method as a sequence of stages, each writing its artefact and skipped when it exists.

Du, Sun, Zhu, Li, "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023:

============  ================================  =====================================================
stage         artefact in ``output_dir``        what it does
============  ================================  =====================================================
anchors       ``anchors.safetensors``           class token embeddings T(y) of the text encoder
encoder       ``encoder.pt``                    Phase 1: image encoder aligned with T(y) (Eq. 2)
bank          ``feature_bank.safetensors``      L2-normalised training embeddings of the encoder
samples       ``samples.safetensors``           Phase 2: k-NN boundary outliers (DREAM-ID: inliers)
images        ``images/``                       Stable Diffusion renders the sampled embeddings (Eq. 6)
classifier    ``classifier.pt``                 Phase 3: CE + beta * energy loss on the outliers (Eq. 7)
report        ``report.json``, ``report.md``    FPR95, AUROC, AUPR, ID accuracy on the OOD test sets
============  ================================  =====================================================

A stage whose artefact exists is skipped and its artefact loaded, so an interrupted run resumes where it
stopped (Phase 1, generation and Phase 3 also resume inside the stage, from their per-epoch checkpoints or
the images already written). Every artefact is written atomically, and each stage (each baseline too) first
deletes the temporary files that a process killed while writing its artefacts left behind. A stage is redone
when it is named in ``force``; the artefacts after it are not touched, so force those too when an earlier
stage changed. With ``progress = false`` no progress bar is drawn, transformers' and diffusers' model-loading
bars included.

The paper's baselines run on the same data, each in ``output_dir/baselines/<name>/`` and skipped when its
result exists unless it is named in ``force`` (then it is retrained from scratch): GODIN and GAN-based
outlier synthesis for OOD detection (:meth:`Pipeline.ood_baseline`, paper Tables 1 and 3), and for DREAM-ID's
generalisation (:meth:`Pipeline.generalization_baseline`, Table 4) a cross-entropy model, RandAugment,
AutoAugment, AugMix and CutMix copies and generic-prompt images appended in DREAM-ID's number, and MEMO on
the cross-entropy model. Their settings are in :class:`BaselineConfig`;
``dreamood run --baselines`` runs them after the stages and prints one comparison table.

:func:`smoke_setup` builds a tiny configuration with random data and randomly initialised tiny models, so
the whole wiring runs on a CPU in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dreamood._utils import library_progress_bars, resolve_device
from dreamood._validation import check_choice, check_positive, check_positive_int
from dreamood.config import PipelineConfig
from dreamood.io import atomic_write, load_checkpoint, remove_temporaries, save_checkpoint, sidecar_path

if TYPE_CHECKING:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.baselines import ConfidenceGAN, GodinClassifier
    from dreamood.encoder import TextConditionedEncoder
    from dreamood.evaluation import OODReport
    from dreamood.feature_bank import FeatureBank
    from dreamood.models import Classifier, ResNetFeatures, SmallConvNet
    from dreamood.protocols import EmbeddingDecoder
    from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "ARTIFACTS",
    "BASELINES",
    "GENERALIZATION_BASELINES",
    "OOD_BASELINES",
    "SMOKE_BASELINES",
    "STAGES",
    "BaselineConfig",
    "Pipeline",
    "PipelineData",
    "accuracy_table",
    "baselines_of",
    "build_backbone",
    "build_data",
    "class_names_of",
    "ood_table",
    "parse_baselines",
    "smoke_setup",
]

logger = logging.getLogger("dreamood.pipeline")

#: The stages of a run, in order.
STAGES: tuple[str, ...] = ("anchors", "encoder", "bank", "samples", "images", "classifier", "report")

# The `dreamood` subcommand that makes each stage's artefact.
_COMMAND_OF_STAGE = {
    "anchors": "anchors",
    "encoder": "fit-encoder",
    "bank": "fit-encoder",
    "samples": "sample",
    "images": "generate",
    "classifier": "train",
    "report": "evaluate",
}

# Keys that do not change any artefact, so a change of them is not reported.
_NEUTRAL_KEYS = frozenset({"progress", "data.num_workers", "output_dir"})

#: The artefact of each stage, relative to the output folder.
ARTIFACTS: dict[str, str] = {
    "anchors": "anchors.safetensors",
    "encoder": "encoder.pt",
    "bank": "feature_bank.safetensors",
    "samples": "samples.safetensors",
    "images": "images",
    "classifier": "classifier.pt",
    "report": "report.json",
}

# Fields of TrainConfig passed to every train_classifier call as they are.
_TRAINING_SPEED_OPTIONS = ("amp", "channels_last", "compile", "compile_mode", "cudnn_benchmark")
# The file generate_images writes once every image of the folder exists.
_MANIFEST = "manifest.jsonl"

#: Baselines of a DREAM-OOD run (OOD detection, paper Tables 1 and 3).
OOD_BASELINES: tuple[str, ...] = ("godin", "gan")

#: Baselines of a DREAM-ID run (generalisation, paper Table 4); ``cross-entropy`` is the model MEMO adapts.
GENERALIZATION_BASELINES: tuple[str, ...] = (
    "cross-entropy",
    "randaugment",
    "autoaugment",
    "augmix",
    "cutmix",
    "generic-prompts",
    "memo",
)

#: Every baseline, of either method (the names ``Pipeline(force=...)`` accepts beside :data:`STAGES`).
BASELINES: tuple[str, ...] = (*OOD_BASELINES, *GENERALIZATION_BASELINES)

Transform = Callable[[Any], Any]


def baselines_of(method: str) -> tuple[str, ...]:
    """The baselines a run of ``method`` is compared with.

    Args:
        method: ``"dream-ood"`` or ``"dream-id"``.

    Returns:
        :data:`OOD_BASELINES` for DREAM-OOD, :data:`GENERALIZATION_BASELINES` for DREAM-ID.

    Raises:
        ValueError: ``method`` is unknown.
    """
    if method == "dream-ood":
        return OOD_BASELINES
    if method == "dream-id":
        return GENERALIZATION_BASELINES
    raise ValueError(f"method must be 'dream-ood' or 'dream-id', got {method!r}")


def parse_baselines(text: str, method: str) -> tuple[str, ...]:
    """Read a list of baselines such as ``"godin,gan"``, ``"all"`` or ``""`` (none) for a run of ``method``.

    Args:
        text: Comma-separated baseline names, ``"all"`` (every baseline of ``method``) or empty.
        method: ``"dream-ood"`` or ``"dream-id"``.

    Returns:
        The names, in the order given, without duplicates.

    Raises:
        ValueError: A name is not a baseline of ``method``.
    """
    known = baselines_of(method)
    if text.strip() == "all":
        return known
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown baseline(s) {', '.join(unknown)} for {method}: choose from {', '.join(known)}, or all"
        )
    return names


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines, from their papers and public code; their training follows ``config.training``.

    Every baseline is trained from scratch with the configuration's from-scratch recipe (``training.epochs`` and
    ``training.lr``, or ``training.pretrain_epochs`` and ``training.pretrain_lr`` when the run fine-tunes a
    pre-trained model, as on ImageNet-100), the same backbone, batch sizes, momentum and weight decay.

    Attributes:
        godin_similarity: GODIN's ``h`` (Hsu et al., CVPR 2020): ``"cosine"`` (the paper's best), ``"inner"`` or
            ``"euclidean"``.
        godin_validation_images: ID training images (without augmentation, a seeded random subset) on which GODIN
            chooses its input perturbation; no OOD image is used.
        gan_beta: Weight of the KL-to-uniform term (Lee et al., ICLR 2018): their code's 0.1 for CIFAR-10.
        gan_width: Base feature maps of the DCGAN generator and discriminator (64, as DCGAN and their code).
        memo_augmentations: MEMO's AugMix copies per test image (Zhang et al., NeurIPS 2022; 64 on ImageNet).
        memo_lr: MEMO's learning rate (ImageNet ResNet-50: 2.5e-4).
        memo_prior_strength: MEMO's BatchNorm prior strength (ImageNet: 16), ``None`` for running statistics.

    Raises:
        ValueError: A setting is out of range.
    """

    godin_similarity: str = "cosine"
    godin_validation_images: int = 1000
    gan_beta: float = 0.1
    gan_width: int = 64
    memo_augmentations: int = 64
    memo_lr: float = 2.5e-4
    memo_prior_strength: float | None = 16.0

    def __post_init__(self) -> None:
        check_choice(self.godin_similarity, ("cosine", "inner", "euclidean"), "godin_similarity")
        check_positive_int(self.godin_validation_images, "godin_validation_images")
        check_positive(self.gan_beta, "gan_beta", allow_zero=True)
        check_positive_int(self.gan_width, "gan_width")
        check_positive_int(self.memo_augmentations, "memo_augmentations")
        check_positive(self.memo_lr, "memo_lr")
        if self.memo_prior_strength is not None:
            check_positive(self.memo_prior_strength, "memo_prior_strength", allow_zero=True)


#: The baselines' settings of a smoke run: a narrow DCGAN, few GODIN validation images and MEMO copies (seconds).
SMOKE_BASELINES = BaselineConfig(godin_validation_images=32, gan_width=8, memo_augmentations=4)


@dataclass
class PipelineData:
    """The datasets of a run.

    Attributes:
        class_names: Names of the ID classes, indexed by label.
        train: ID training set with the training augmentation (Phase 1 and Phase 3).
        bank: ID training set with the test transform (the feature bank is built without augmentation).
        test: ID test set.
        ood: OOD test sets by name.
        generated_transform: Transform of the generated images when they are read for training.
        generalization: Extra labelled ID test sets (ImageNet-A, ImageNet-V2) whose accuracy DREAM-ID reports.
        raw_train: The ID training images before augmentation and normalisation (RGB PIL images of the ID size, or
            tensors in ``[0, 1]``), with labels; the augmentation baselines augment these and then apply
            ``generated_transform``.
    """

    class_names: list[str]
    train: Dataset[Any]
    bank: Dataset[Any]
    test: Dataset[Any]
    ood: dict[str, Dataset[Any]]
    generated_transform: Transform | None = None
    generalization: dict[str, Dataset[Any]] = field(default_factory=dict)
    raw_train: Dataset[Any] | None = None


def _image_size(config: PipelineConfig) -> int:
    return config.data.image_size or (224 if config.benchmark == "imagenet100" else 32)


def _small_input(config: PipelineConfig) -> bool:
    return _image_size(config) <= 64


def class_names_of(config: PipelineConfig) -> list[str]:
    """The ID class names of a configuration, without loading any dataset.

    Args:
        config: The run's configuration.

    Returns:
        ``data.class_names`` when set; else the benchmark's bundled list (CIFAR-100 in label order, the paper's
        ImageNet-100 in the paper's order); for ``folder``, the sorted class folder names of ``data.root/train``
        with underscores read as spaces.

    Raises:
        FileNotFoundError: For ``folder``, ``data.root/train`` is missing.
    """
    from dreamood.data.classes import CIFAR100_CLASSES, IMAGENET100_CLASSES

    if config.data.class_names is not None:
        return list(config.data.class_names)
    if config.benchmark == "cifar100":
        return list(CIFAR100_CLASSES)
    if config.benchmark == "imagenet100":
        return list(IMAGENET100_CLASSES)
    folder = Path(config.data.root).expanduser() / "train"
    if not folder.is_dir():
        raise FileNotFoundError(f"class folder root not found: {folder} (expected data.root/train/<class>/...)")
    return [entry.name.replace("_", " ") for entry in sorted(folder.iterdir()) if entry.is_dir()]


def build_data(config: PipelineConfig) -> PipelineData:
    """Build the datasets of ``config`` from disk, with the paper's transforms.

    Args:
        config: The run's configuration (``data`` section and ``benchmark``).

    Returns:
        The datasets.

    Raises:
        FileNotFoundError: A dataset folder or file is missing (the message names the expected layout).
        ValueError: A dataset is malformed, or the class names do not match the data.
    """
    from dreamood.data.datasets import (
        ImageNet100,
        ImageNetA,
        ImageNetV2,
        cifar100,
        class_folder_dataset,
        with_transform,
    )
    from dreamood.data.ood import ood_test_sets
    from dreamood.data.transforms import get_transform

    data, benchmark = config.data, config.benchmark
    names = class_names_of(config)
    train_t, test_t = (get_transform(benchmark, split, image_size=data.image_size) for split in ("train", "test"))
    generated_t = get_transform(benchmark, "generated", image_size=data.image_size)
    raw_t = _raw_transform(config)
    root = Path(data.root).expanduser()
    generalization: dict[str, Dataset[Any]] = {}
    if benchmark == "cifar100":
        train = cifar100(root, True, train_t, download=data.download)
        test = cifar100(root, False, test_t)
    elif benchmark == "imagenet100":
        train = ImageNet100(root, "train", train_t)
        test = ImageNet100(root, "val", test_t)
        if data.imagenet_a is not None:
            generalization["ImageNet-A"] = ImageNetA(data.imagenet_a, test_t)
        if data.imagenet_v2 is not None:
            generalization["ImageNet-V2"] = ImageNetV2(data.imagenet_v2, test_t)
    else:
        train = class_folder_dataset(root / "train", train_t)
        test = class_folder_dataset(root / "test", test_t, classes=train.classes)
    # The plain and the raw views share the training images (CIFAR-100's 150 MB array is loaded once).
    bank, raw = with_transform(train, test_t), with_transform(train, raw_t)
    if len(names) != len(getattr(train, "classes", names)):
        raise ValueError(f"data.class_names has {len(names)} names but the training set has {len(train.classes)}")
    ood = ood_test_sets(benchmark, data.ood_root, test_t, names=data.ood_sets, paths=data.ood_paths)
    return PipelineData(names, train, bank, test, ood, generated_t, generalization, raw_train=raw)


def _normalization(benchmark: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and standard deviation the benchmark's transforms normalise with."""
    from dreamood.data.transforms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

    return (CIFAR_MEAN, CIFAR_STD) if benchmark == "cifar100" else (IMAGENET_MEAN, IMAGENET_STD)


def _rgb(image: Any) -> Any:
    return image.convert("RGB")


def _raw_transform(config: PipelineConfig) -> Transform:
    """RGB, resized and center-cropped to the ID size: the images the augmentation baselines start from."""
    import torchvision.transforms as T

    size = _image_size(config)
    composed: Transform = T.Compose([_rgb, T.Resize(size), T.CenterCrop(size)])
    return composed


def build_backbone(name: str, *, small_input: bool, seed: int | None = None) -> ResNetFeatures | SmallConvNet:
    """A feature extractor with a ``feature_dim`` attribute.

    Args:
        name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"small"`` (:class:`~dreamood.models.SmallConvNet`
            with 3 input channels and 64 features).
        small_input: Use the 3x3 stride-1 stem of the ResNets (32x32 images).
        seed: Seed of the weight initialisation.

    Returns:
        The backbone, mapping images to ``(N, feature_dim)``.

    Raises:
        ValueError: ``name`` is unknown.
    """
    from dreamood.models import SmallConvNet, resnet18, resnet34, resnet50

    factories = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
    if name == "small":
        return SmallConvNet(3, 64, width=16, seed=seed)
    if name not in factories:
        raise ValueError(f"backbone must be one of {', '.join([*factories, 'small'])}, got {name!r}")
    return factories[name](small_input=small_input, seed=seed)


def _seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators, which random image transforms draw from."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _saved_weights(path: Path) -> dict[str, Any]:
    """The ``"model"`` state dict of a checkpoint written by a stage."""
    from dreamood.errors import ArtifactError

    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise ArtifactError(f"{path} holds no 'model' state dict; it was not written by the pipeline")
    weights: dict[str, Any] = state["model"]
    return weights


def _remove_temporaries(paths: Sequence[Path]) -> None:
    """Delete the temporary files that a process killed while writing ``paths`` left behind."""
    removed = sum(remove_temporaries(path) for path in paths)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write of %s", removed, paths[0].name)


def _barrier() -> None:
    """Wait for every process of a torchrun run (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Pipeline:
    """Run DREAM-OOD (or DREAM-ID) stage by stage from a :class:`~dreamood.config.PipelineConfig`.

    Call the stages in order, passing each one's result to the next (what :meth:`run` does)::

        pipe = Pipeline(load_config("cifar100"))
        anchors = pipe.anchors()
        encoder = pipe.fit_encoder(anchors)
        bank = pipe.feature_bank(encoder)
        samples = pipe.sample(bank, anchors)
        images = pipe.generate(samples)
        model = pipe.train(images)
        report = pipe.evaluate(model)

    A stage whose artefact exists in ``config.output_dir`` loads it instead of recomputing it; :meth:`load`
    reads a stage's artefact without running anything.

    Args:
        config: The run's configuration.
        data: The datasets; ``None`` builds them from ``config.data`` when a stage first needs them.
        force: Stages to redo even when their artefact exists (names from :data:`STAGES`), and baselines to
            redo, classifier included, even when their result exists (names from :data:`OOD_BASELINES` and
            :data:`GENERALIZATION_BASELINES`). A forced baseline is redone once per ``Pipeline``.
        decoder_factory: Builds the image decoder (any :class:`~dreamood.protocols.EmbeddingDecoder`) from the
            configuration and the class names; ``None`` loads Stable Diffusion (``generation.model``) with
            :meth:`~dreamood.decoding.stable_diffusion.StableDiffusionDecoder.from_pretrained`.
        baselines: Settings of the baselines (``None``: the papers' :class:`BaselineConfig`).

    Attributes:
        config: The configuration.
        output_dir: Where the artefacts are written.
        device: The device stages run on.
        baselines: The baselines' settings.

    Raises:
        ValueError: A name in ``force`` is neither a stage nor a baseline.
    """

    def __init__(
        self,
        config: PipelineConfig,
        data: PipelineData | None = None,
        *,
        force: Sequence[str] = (),
        decoder_factory: Callable[[PipelineConfig, list[str]], EmbeddingDecoder] | None = None,
        baselines: BaselineConfig | None = None,
    ) -> None:
        unknown = [name for name in force if name not in STAGES and name not in BASELINES]
        if unknown:
            raise ValueError(
                f"force names unknown stages or baselines {unknown}; the stages are {', '.join(STAGES)}, the "
                f"baselines {', '.join(BASELINES)}"
            )
        self.config = config
        self.output_dir = Path(config.output_dir).expanduser()
        self.device = resolve_device(config.device)
        self.force = frozenset(force)
        self._data = data
        self._decoder_factory = decoder_factory
        self.baselines = BaselineConfig() if baselines is None else baselines
        self._redone: set[Path] = set()  # results and classifiers of forced baselines redone by this object

    # ---- bookkeeping ------------------------------------------------------------------------------------

    @property
    def data(self) -> PipelineData:
        """The datasets (built from the configuration on first use when none were given)."""
        if self._data is None:
            self._data = build_data(self.config)
        return self._data

    @property
    def class_names(self) -> list[str]:
        """Names of the ID classes, indexed by label (read without loading the datasets)."""
        return list(self._data.class_names) if self._data is not None else class_names_of(self.config)

    def path(self, stage: str) -> Path:
        """The artefact of ``stage`` (see :data:`ARTIFACTS`).

        Args:
            stage: A name from :data:`STAGES`.

        Returns:
            Its path inside the output folder.
        """
        if stage not in ARTIFACTS:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return self.output_dir / ARTIFACTS[stage]

    def is_done(self, stage: str) -> bool:
        """Whether the artefact of ``stage`` exists (for ``images``: whether generation completed).

        Args:
            stage: A name from :data:`STAGES`.

        Returns:
            ``True`` when the stage would be skipped (unless forced).
        """
        if stage == "images":  # generate_images writes the manifest once every image exists
            return (self.path("images") / _MANIFEST).is_file()
        return self.path(stage).exists()

    def _files_of(self, stage: str) -> list[Path]:
        """The files a stage writes atomically (generate_images looks after the images themselves)."""
        path = self.path(stage)
        if stage == "images":
            return [path / _MANIFEST]
        if path.suffix == ".safetensors":
            return [path, sidecar_path(path)]
        if stage == "report":
            return [path, self.output_dir / "report.md", self.output_dir / "generalization.json"]
        return [path]

    def _skip(self, stage: str) -> bool:
        if _is_main_process():  # only rank 0 writes the stages' files
            _remove_temporaries(self._files_of(stage))
        if stage in self.force or not self.is_done(stage):
            return False
        logger.info("[%s] skipped: %s exists", stage, self.path(stage))
        return True

    @contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        logger.info("[%s] running", stage)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        logger.info("[%s] done in %.1f s: %s", stage, seconds, self.path(stage))
        if _is_main_process():
            self._record_time(stage, seconds)

    def _record_time(self, stage: str, seconds: float) -> None:
        path = self.output_dir / "timings.json"
        _remove_temporaries([path])
        timings = json.loads(path.read_text()) if path.is_file() else {}
        timings[stage] = round(seconds, 3)
        with atomic_write(path, "w") as handle:
            handle.write(json.dumps(timings, indent=2))

    def write_config(self) -> Path:
        """Write the configuration to ``output_dir/config.json``, warning when it differs from the one there.

        Returns:
            The path written.
        """
        path = self.output_dir / "config.json"
        current = self.config.to_dict()
        if path.is_file():
            previous = json.loads(path.read_text())
            changed = sorted(set(_changed_keys(previous, current)) - _NEUTRAL_KEYS)
            if changed:
                logger.warning(
                    "the configuration differs from the one of the artefacts in %s (%s); finished stages are not "
                    "redone: force them or use another output_dir",
                    self.output_dir,
                    ", ".join(changed),
                )
        if _is_main_process():
            _remove_temporaries([path])
            with atomic_write(path, "w") as handle:
                handle.write(json.dumps(current, indent=2))
        return path

    def _loader(
        self, dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int | None = None
    ) -> DataLoader[Any]:
        """A loader of ``dataset``; shuffled by a generator seeded with ``seed`` (default: the run's seed)."""
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.config.data.num_workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _new_encoder(self, anchors: TokenEmbeddings) -> TextConditionedEncoder:
        from dreamood.encoder import TextConditionedEncoder

        cfg = self.config.encoder
        with torch.random.fork_rng(devices=[]):  # every initial weight, the projection's too, from the seed
            torch.manual_seed(self.config.seed)
            backbone = build_backbone(cfg.backbone, small_input=_small_input(self.config))
            return TextConditionedEncoder(backbone, backbone.feature_dim, anchors, cfg.temperature)

    def _new_classifier(self) -> Classifier:
        from dreamood.models import Classifier

        with torch.random.fork_rng(devices=[]):  # every initial weight, the head's too, from the seed
            torch.manual_seed(self.config.seed)
            backbone = build_backbone(self.config.training.backbone, small_input=_small_input(self.config))
            return Classifier(backbone, len(self.class_names))

    def load(self, stage: str) -> Any:
        """Read the artefact of ``stage`` without running anything.

        Args:
            stage: A name from :data:`STAGES`.

        Returns:
            ``TokenEmbeddings``, ``TextConditionedEncoder`` (eval mode), ``FeatureBank``, ``EmbeddingSamples``,
            the images folder, the ``Classifier`` (eval mode) or the ``OODReport``.

        Raises:
            FileNotFoundError: The artefact does not exist (the message names the command that makes it).
        """
        if not self.is_done(stage):
            raise FileNotFoundError(
                f"the {stage} artefact {self.path(stage)} does not exist: run its stage first "
                f"(`dreamood {_COMMAND_OF_STAGE[stage]}` or `dreamood run`)"
            )
        path = self.path(stage)
        if stage == "anchors":
            from dreamood.anchors import TokenEmbeddings

            return TokenEmbeddings.load(path)
        if stage == "encoder":
            encoder = self._new_encoder(self.load("anchors"))
            encoder.load_state_dict(_saved_weights(path))
            return encoder.eval()
        if stage == "bank":
            from dreamood.feature_bank import FeatureBank

            return FeatureBank.load(path)
        if stage == "samples":
            from dreamood.sampling.samples import EmbeddingSamples

            return EmbeddingSamples.load(path)
        if stage == "images":
            return path
        if stage == "classifier":
            model = self._new_classifier()
            model.load_state_dict(_saved_weights(path))
            return model.eval()
        from dreamood.evaluation import OODReport

        return OODReport.from_json(path)

    # ---- the stages -------------------------------------------------------------------------------------

    def anchors(self) -> TokenEmbeddings:
        """Stage 1: the class anchors T(y), rows of the text encoder's input token-embedding table.

        Returns:
            The anchors, saved to ``anchors.safetensors``.
        """
        if self._skip("anchors"):
            return self.load("anchors")  # type: ignore[no-any-return]
        from dreamood.anchors import TokenEmbeddings

        cfg = self.config.anchors
        with self._stage("anchors"), library_progress_bars(["transformers"], enabled=self.config.progress):
            anchors = TokenEmbeddings.from_pretrained(
                cfg.model, self.class_names, cfg.subword, local_files_only=cfg.local_files_only
            )
            anchors.save(self.path("anchors"))
        return anchors

    def fit_encoder(self, anchors: TokenEmbeddings) -> TextConditionedEncoder:
        """Stage 2 (Phase 1): train the text-conditioned image encoder (paper Eq. 2).

        Resumes from ``encoder/encoder_checkpoint.pt`` (written after every epoch) unless forced.

        Args:
            anchors: The class anchors.

        Returns:
            The trained encoder in eval mode, saved to ``encoder.pt``.
        """
        if self._skip("encoder"):
            return self.load("encoder")  # type: ignore[no-any-return]
        from dreamood.encoder import fit_encoder

        cfg = self.config.encoder
        encoder = self._new_encoder(anchors)
        with self._stage("encoder"):
            fit_encoder(
                encoder,
                self._loader(self.data.train, cfg.batch_size, shuffle=True),
                cfg.epochs,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                device=self.device,
                amp_dtype=cfg.amp,
                checkpoint_dir=self.output_dir / "encoder",
                resume="encoder" not in self.force,
                show_progress=self.config.progress,
                seed=self.config.seed,
            )
            save_checkpoint(self.path("encoder"), {"model": encoder.state_dict()})
        return encoder

    def feature_bank(self, encoder: TextConditionedEncoder) -> FeatureBank:
        """Stage 3: the L2-normalised training embeddings of the encoder, ``bank.per_class`` per class.

        Args:
            encoder: The trained encoder.

        Returns:
            The bank, saved to ``feature_bank.safetensors``.
        """
        if self._skip("bank"):
            return self.load("bank")  # type: ignore[no-any-return]
        from dreamood.feature_bank import FeatureBank

        cfg = self.config.bank
        with self._stage("bank"):
            bank = FeatureBank.from_encoder(
                encoder,
                self._loader(self.data.bank, cfg.batch_size, shuffle=False),
                num_classes=len(self.class_names),
                max_per_class=cfg.per_class,
                device=self.device,
                show_progress=self.config.progress,
            )
            bank.save(self.path("bank"))
        return bank

    def sample(self, bank: FeatureBank, anchors: TokenEmbeddings) -> EmbeddingSamples:
        """Stage 4 (Phase 2): outlier embeddings around each class's low-density boundary (paper Eq. 5).

        With ``method = "dream-id"`` the sampler works in inlier mode (densest anchors, smallest distances).

        Args:
            bank: The feature bank.
            anchors: The class anchors (the samples are rescaled to their norms).

        Returns:
            The samples, saved to ``samples.safetensors``.
        """
        if self._skip("samples"):
            return self.load("samples")  # type: ignore[no-any-return]
        from dreamood.sampling.knn_boundary import KNNBoundarySampler

        cfg = self.config.sampler
        with self._stage("samples"):
            sampler = KNNBoundarySampler(
                k=cfg.k,
                boundary_size=cfg.boundary,
                anchors_per_round=cfg.anchors_per_round,
                candidates_per_anchor=cfg.candidates_per_anchor,
                sigma=cfg.sigma,
                keep_per_anchor=cfg.keep,
                mode="inlier" if self.config.method == "dream-id" else "outlier",
                seed=self.config.seed,
                device=self.device,
                show_progress=self.config.progress,
            )
            samples = sampler.sample(bank, anchors, cfg.num_per_class)
            samples.save(self.path("samples"))
        return samples

    def generate(self, samples: EmbeddingSamples) -> Path:
        """Stage 5: render the first ``generation.images_per_class`` samples of each class (paper Eq. 6).

        Args:
            samples: The sampled embeddings.

        Returns:
            The folder of generated images.
        """
        if self._skip("images"):
            return self.path("images")
        from dreamood.decoding.generation import generate_images

        cfg = self.config.generation
        device = self.device
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
        with self._stage("images"):
            decoder = self._decoder(device)
            generate_images(
                decoder,
                samples,
                self.path("images"),
                cfg.images_per_class,
                batch_size=cfg.batch_size,
                seed=self.config.seed,
                show_progress=self.config.progress,
                overwrite="images" in self.force,
                writer_threads=cfg.writer_threads,
            )
        return self.path("images")

    def train(self, images: str | os.PathLike[str]) -> Classifier:
        """Stage 6 (Phase 3): train the classifier with the generated images (paper Eq. 7).

        DREAM-OOD: cross-entropy on the ID data plus ``beta`` times the energy regulariser with the generated
        outliers. DREAM-ID: cross-entropy on the ID data and the generated inliers with their labels. Starts
        from ``training.init_checkpoint``, or from a cross-entropy model trained first for
        ``training.pretrain_epochs`` when that is positive. Resumes from ``classifier/checkpoint.pt``.

        Args:
            images: The folder of generated images.

        Returns:
            The trained classifier in eval mode, saved to ``classifier.pt``.
        """
        if self._skip("classifier"):
            return self.load("classifier")  # type: ignore[no-any-return]
        from dreamood.data.generated import GeneratedImageFolder
        from dreamood.training import EnergyOODRegularizer, train_classifier

        cfg = self.config.training
        generated = GeneratedImageFolder(images, transform=self.data.generated_transform)
        options: dict[str, Any] = {
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "beta": cfg.beta,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            **{key: getattr(cfg, key) for key in _TRAINING_SPEED_OPTIONS},
            "device": self.config.device,
            "seed": self.config.seed,
            "progress": self.config.progress,
            "output_dir": self.output_dir / "classifier",
            "resume": "classifier" not in self.force,
        }
        model = self._new_classifier()
        id_loader = self._loader(self.data.train, cfg.batch_size, shuffle=True)
        generated_loader = self._loader(generated, cfg.outlier_batch_size, shuffle=True)
        with self._stage("classifier"):
            _seed_global_rngs(self.config.seed)  # the image augmentations draw from the global generators
            init = cfg.init_checkpoint
            if init is None and cfg.pretrain_epochs > 0:
                init = str(self._pretrain(id_loader, options))
            if self.config.method == "dream-ood":
                regularizer = EnergyOODRegularizer(cfg.head, cfg.hidden_dim, cfg.energy_temperature)
                train_classifier(
                    model,
                    id_loader,
                    outlier_loader=generated_loader,
                    regularizer=regularizer,
                    init_checkpoint=init,
                    **options,
                )
            else:
                train_classifier(
                    model, id_loader, synthetic_id_loader=generated_loader, init_checkpoint=init, **options
                )
            if _is_main_process():
                save_checkpoint(self.path("classifier"), {"model": model.state_dict()})
            _barrier()
        return model.eval()

    def _pretrain(self, id_loader: DataLoader[Any], options: dict[str, Any]) -> Path:
        """Train a cross-entropy classifier to start Phase 3 from (the paper's ImageNet-100 recipe)."""
        path = self.output_dir / "pretrained.pt"
        if _is_main_process():
            _remove_temporaries([path])
        if path.is_file():
            logger.info("[classifier] cross-entropy pre-training skipped: %s exists", path)
            return path
        from dreamood.training import train_classifier

        cfg = self.config.training
        logger.info("[classifier] cross-entropy pre-training for %d epochs", cfg.pretrain_epochs)
        _seed_global_rngs(self.config.seed)
        model = self._new_classifier()
        pretrain = {**options, "epochs": cfg.pretrain_epochs, "lr": cfg.pretrain_lr, "beta": 0.0, "resume": True}
        pretrain["output_dir"] = self.output_dir / "pretrain"
        train_classifier(model, id_loader, **pretrain)
        if _is_main_process():
            save_checkpoint(path, model.state_dict())
        _barrier()  # under torchrun, every process then reads the file rank 0 wrote
        return path

    def evaluate(self, model: nn.Module) -> OODReport:
        """Stage 7: FPR95, AUROC, AUPR of the negative energy and the ID accuracy, per OOD test set.

        Args:
            model: The trained classifier.

        Returns:
            The report, saved to ``report.json`` and ``report.md``.
        """
        if self._skip("report"):
            return self.load("report")  # type: ignore[no-any-return]
        from functools import partial

        from dreamood.evaluation import OODEvaluator, energy_score

        cfg = self.config.evaluation
        evaluator = OODEvaluator(
            partial(energy_score, temperature=self.config.training.energy_temperature),
            model=model.to(self.device),
            protocol=cfg.protocol,
            repeats=cfg.repeats,
            seed=self.config.seed,
            device=self.device,
            progress=self.config.progress,
        )
        with self._stage("report"):
            ood = {
                name: self._loader(dataset, cfg.batch_size, shuffle=False) for name, dataset in self.data.ood.items()
            }
            report = evaluator.evaluate(self._loader(self.data.test, cfg.batch_size, shuffle=False), ood)
            with atomic_write(self.output_dir / "report.md", "w") as handle:
                handle.write(report.to_markdown() + "\n")
            report.to_json(self.path("report"))  # last: its existence marks the stage done
        return report

    def generalization(self, model: nn.Module) -> dict[str, float]:
        """Top-1 accuracy on the ID test set and on each generalisation set (ImageNet-A, ImageNet-V2).

        DREAM-ID reports these to show that generated inliers improve generalisation.

        Args:
            model: The trained classifier.

        Returns:
            Accuracy (a fraction) by set name, also saved to ``generalization.json``. The file belongs to the
            ``report`` stage: it is read back, not recomputed, unless that stage is forced.
        """
        path = self.output_dir / "generalization.json"
        if "report" not in self.force and path.is_file():
            logger.info("[generalization] skipped: %s exists", path)
            return cast(dict[str, float], json.loads(path.read_text()))
        return self._accuracy_table(model.to(self.device), path, "generalization")

    def _accuracy_table(self, model: Callable[[Tensor], Tensor], path: Path, name: str) -> dict[str, float]:
        """Top-1 accuracy of ``model`` on the ID test set and each generalisation set, written to ``path``."""
        from dreamood.baselines import classification_accuracy

        sets = {"ID test": self.data.test, **self.data.generalization}
        accuracy: dict[str, float] = {}
        for set_name, dataset in sets.items():
            loader = self._loader(dataset, self.config.evaluation.batch_size, shuffle=False)
            accuracy[set_name] = classification_accuracy(
                model, loader, device=self.device, progress_bar=self.config.progress
            )
            logger.info("[%s] %s: top-1 accuracy %.2f%%", name, set_name, 100 * accuracy[set_name])
        if _is_main_process():
            with atomic_write(path, "w") as handle:
                handle.write(json.dumps(accuracy, indent=2))
        return accuracy

    # ---- the baselines ----------------------------------------------------------------------------------

    def baseline_dir(self, name: str) -> Path:
        """The folder of a baseline's artefacts: ``output_dir/baselines/<name>``.

        Args:
            name: A name from :data:`OOD_BASELINES` or :data:`GENERALIZATION_BASELINES`.

        Returns:
            The folder.

        Raises:
            ValueError: ``name`` is not a baseline.
        """
        if name not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {name!r}")
        return self.output_dir / "baselines" / name

    def baseline_path(self, name: str) -> Path:
        """The result file of a baseline, whose existence marks it done (and makes it be skipped).

        Args:
            name: A name from :data:`OOD_BASELINES` or :data:`GENERALIZATION_BASELINES`.

        Returns:
            ``baselines/<name>/report.json`` for an OOD baseline, ``baselines/<name>/generalization.json`` for a
            generalisation baseline.

        Raises:
            ValueError: ``name`` is not a baseline.
        """
        folder = self.baseline_dir(name)
        return folder / ("report.json" if name in OOD_BASELINES else "generalization.json")

    def ood_baseline(self, name: str) -> OODReport:
        """Train (or load) an OOD-detection baseline and evaluate it on the run's OOD test sets.

        * ``"godin"``: a :class:`~dreamood.baselines.GodinClassifier` on the run's backbone (Hsu et al., CVPR 2020),
          scored by :class:`~dreamood.baselines.GODIN` with the input perturbation chosen on
          ``baselines.godin_validation_images`` ID training images; ``godin.json`` records the choice.
        * ``"gan"``: the run's classifier trained jointly with a DCGAN whose samples it learns to give a uniform
          prediction (Lee et al., ICLR 2018), scored with the maximum softmax probability. Needs a power-of-two
          image size (CIFAR's 32; not ImageNet's 224) and a single process (not ``torchrun``). The loop's
          checkpoints hold the GAN too, so an interrupted run continues it exactly.

        The evaluation follows ``config.evaluation`` (protocol, repeats) like the main report. Skipped when
        ``baselines/<name>/report.json`` exists, unless ``name`` is in ``force`` (then it is retrained from scratch).

        Args:
            name: ``"godin"`` or ``"gan"``.

        Returns:
            The report, saved to ``baselines/<name>/report.json`` and ``report.md``.

        Raises:
            ValueError: ``name`` is not an OOD baseline, or the GAN cannot generate images of the ID size.
        """
        if name not in OOD_BASELINES:
            raise ValueError(f"name must be one of the OOD baselines {', '.join(OOD_BASELINES)}, got {name!r}")
        folder, path = self.baseline_dir(name), self.baseline_path(name)
        self._remove_baseline_temporaries(name)
        if self._baseline_done(name, path):
            from dreamood.evaluation import OODReport

            logger.info("[baseline %s] skipped: %s exists", name, path)
            return OODReport.from_json(path)
        from dreamood.baselines import GODIN, classification_accuracy
        from dreamood.detectors import MSP
        from dreamood.evaluation import OODEvaluator

        model = self._baseline_classifier(name)
        cfg = self.config.evaluation
        test_loader = self._loader(self.data.test, cfg.batch_size, shuffle=False)
        ood = {
            set_name: self._loader(dataset, cfg.batch_size, shuffle=False)
            for set_name, dataset in self.data.ood.items()
        }
        settings: dict[str, Any] = {
            "protocol": cfg.protocol,
            "repeats": cfg.repeats,
            "seed": self.config.seed,
            "device": self.device,
            "progress": self.config.progress,
        }
        logger.info("[baseline %s] evaluating", name)
        if name == "godin":
            detector = GODIN(model, batch_size=cfg.batch_size, device=self.device).fit(self._godin_validation_loader())
            if _is_main_process():
                scores = {f"{epsilon:g}": score for epsilon, score in detector.validation_scores_.items()}
                with atomic_write(folder / "godin.json", "w") as handle:
                    handle.write(json.dumps({"epsilon": detector.epsilon_, "validation_scores": scores}, indent=2))
            report = OODEvaluator(detector, accuracy=False, **settings).evaluate(test_loader, ood)
            accuracy = classification_accuracy(model, test_loader, device=self.device, progress_bar=False)
            report = replace(report, id_accuracy=accuracy)
        else:
            report = OODEvaluator(MSP(), model=model, **settings).evaluate(test_loader, ood)
        if _is_main_process():
            with atomic_write(folder / "report.md", "w") as handle:
                handle.write(report.to_markdown() + "\n")
            report.to_json(path)  # last: its existence marks the baseline done
        self._mark_redone(name, path)
        return report

    def generalization_baseline(self, name: str) -> dict[str, float]:
        """Train (or load) a generalisation baseline of DREAM-ID and measure its top-1 accuracy.

        As DREAM-ID appends ``generation.images_per_class`` generated inliers per class, each baseline trains the
        run's classifier from scratch on the ID training set plus as many images per class (paper Table 4):

        * ``"cross-entropy"``: nothing appended (the reference, and the model MEMO adapts);
        * ``"randaugment"``, ``"autoaugment"``, ``"augmix"``, ``"cutmix"``: a fixed pool of augmented copies of the
          training images (:class:`~dreamood.baselines.AugmentedPool`), read through ``generated_transform``
          (CutMix's labels are mixtures, which the shared loop takes as target distributions);
        * ``"generic-prompts"``: the decoder's plain prompt ``"A high-quality photo of a {class}"`` rendered with
          the seeds scheme of DREAM-ID's images (:func:`~dreamood.baselines.generate_generic_prompt_images`);
        * ``"memo"``: the ``"cross-entropy"`` model adapted to every test image (Zhang et al., NeurIPS 2022).

        Skipped when ``baselines/<name>/generalization.json`` exists, unless ``name`` is in ``force`` (then it is
        retrained from scratch).

        Args:
            name: A name from :data:`GENERALIZATION_BASELINES`.

        Returns:
            Accuracy (a fraction) on the ID test set and each generalisation set, also saved to
            ``baselines/<name>/generalization.json``.

        Raises:
            ValueError: ``name`` is not a generalisation baseline.
        """
        if name not in GENERALIZATION_BASELINES:
            raise ValueError(
                f"name must be one of the generalisation baselines {', '.join(GENERALIZATION_BASELINES)}, got {name!r}"
            )
        path = self.baseline_path(name)
        self._remove_baseline_temporaries(name)
        if self._baseline_done(name, path):
            logger.info("[baseline %s] skipped: %s exists", name, path)
            accuracy: dict[str, float] = json.loads(path.read_text())
            return accuracy
        if name == "memo":
            model: Callable[[Tensor], Tensor] = self._memo(self._baseline_classifier("cross-entropy"))
        else:
            model = self._baseline_classifier(name)
        accuracy = self._accuracy_table(model, path, f"baseline {name}")
        self._mark_redone(name, path)
        return accuracy

    def _baseline_done(self, name: str, path: Path) -> bool:
        """Whether ``path`` (a baseline's result or classifier) is to be used as it is, rather than redone."""
        return path.is_file() and (name not in self.force or path in self._redone)

    def _mark_redone(self, name: str, path: Path) -> None:
        if name in self.force:
            self._redone.add(path)

    def _remove_baseline_temporaries(self, name: str) -> None:
        """Delete what killed writes of a baseline's files left (its training and images clean up themselves)."""
        if _is_main_process():
            folder = self.baseline_dir(name)
            files = ("report.json", "report.md", "godin.json", "generalization.json", "classifier.pt", "dcgan.pt")
            _remove_temporaries([folder / file for file in files])

    def _scratch_recipe(self) -> dict[str, Any]:
        """The options of a model trained from scratch: the pre-training recipe when the run fine-tunes."""
        cfg = self.config.training
        epochs, lr = (cfg.pretrain_epochs, cfg.pretrain_lr) if cfg.pretrain_epochs > 0 else (cfg.epochs, cfg.lr)
        return {
            "epochs": epochs,
            "lr": lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "device": self.config.device,
            "seed": self.config.seed,
            "progress": self.config.progress,
        }

    def _baseline_classifier(self, name: str) -> nn.Module:
        """Train a baseline's classifier, or load it from ``baselines/<name>/classifier.pt``."""
        folder = self.baseline_dir(name)
        path = folder / "classifier.pt"
        self._remove_baseline_temporaries(name)
        model: nn.Module = self._new_godin() if name == "godin" else self._new_classifier()
        if self._baseline_done(name, path):
            logger.info("[baseline %s] classifier loaded from %s", name, path)
            model.load_state_dict(_saved_weights(path))
            return model.to(self.device).eval()
        from dreamood.baselines import GodinClassifier, UniformKLRegularizer, train_godin
        from dreamood.training import train_classifier

        gan = self._new_gan() if name == "gan" else None  # checks the image size before anything is trained

        cfg = self.config.training
        recipe = self._scratch_recipe()
        # Every baseline trains with the shared loop, so a killed run resumes from its last per-epoch checkpoint
        # in training/ (for the GAN baseline that checkpoint holds the GAN as well).
        speed = {key: getattr(cfg, key) for key in _TRAINING_SPEED_OPTIONS}
        loop = {**recipe, **speed, "output_dir": folder / "training", "resume": name not in self.force}
        id_loader = self._loader(self.data.train, cfg.batch_size, shuffle=True)
        logger.info("[baseline %s] training for %d epochs", name, recipe["epochs"])
        start = time.perf_counter()
        _seed_global_rngs(self.config.seed)  # the image augmentations draw from the global generators
        if isinstance(model, GodinClassifier):
            train_godin(model, id_loader, **loop)
        elif gan is not None:
            real_loader = self._loader(self.data.train, cfg.batch_size, shuffle=True, seed=self.config.seed + 1)
            outliers = gan.outlier_loader(real_loader, model)
            train_classifier(
                model,
                id_loader,
                outlier_loader=outliers,
                regularizer=UniformKLRegularizer(),
                extra_state={"gan": outliers},
                **{**loop, "beta": gan.beta},
            )
            if _is_main_process():
                save_checkpoint(folder / "dcgan.pt", {"model": gan.state_dict()})
        elif name == "cross-entropy":
            train_classifier(model, id_loader, **loop)
        else:
            extra = self._loader(self._appended_images(name), cfg.outlier_batch_size, shuffle=True)
            train_classifier(model, id_loader, synthetic_id_loader=extra, **loop)
        if _is_main_process():
            save_checkpoint(path, {"model": model.state_dict()})
        _barrier()
        self._mark_redone(name, path)
        logger.info("[baseline %s] trained in %.1f s: %s", name, time.perf_counter() - start, path)
        return model.eval()

    def _appended_images(self, name: str) -> Dataset[Any]:
        """The labelled images a generalisation baseline appends: augmented copies or generic-prompt images."""
        from dreamood.data.generated import GeneratedImageFolder

        per_class = self.config.generation.images_per_class
        if name == "generic-prompts":
            from dreamood.baselines import generate_generic_prompt_images

            cfg = self.config.generation
            folder = self.baseline_dir(name) / "images"
            decoder = self._decoder(self.device)
            generate_generic_prompt_images(
                decoder,  # type: ignore[arg-type]
                folder,
                per_class,
                batch_size=cfg.batch_size,
                seed=self.config.seed,
                show_progress=self.config.progress,
                overwrite=name in self.force,
            )
            return GeneratedImageFolder(folder, transform=self.data.generated_transform)
        from dreamood.baselines import AugmentedPool

        if self.data.raw_train is None:
            raise ValueError(
                f"the {name} baseline augments the raw ID training images, but PipelineData.raw_train is None"
            )
        return AugmentedPool(
            self.data.raw_train,
            name,
            num_per_class=per_class,
            num_classes=len(self.class_names),
            seed=self.config.seed,
            transform=_AfterAugmentation(self.data.generated_transform),
        )

    def _godin_validation_loader(self) -> DataLoader[Any]:
        """A seeded random subset of the ID training images without augmentation, for GODIN's epsilon."""
        from torch.utils.data import Subset

        count = min(self.baselines.godin_validation_images, len(self.data.bank))  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.config.seed)
        indices = torch.randperm(len(self.data.bank), generator=generator)[:count].tolist()  # type: ignore[arg-type]
        return self._loader(Subset(self.data.bank, indices), self.config.evaluation.batch_size, shuffle=False)

    def _new_godin(self) -> GodinClassifier:
        from dreamood.baselines import GodinClassifier

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            backbone = build_backbone(self.config.training.backbone, small_input=_small_input(self.config))
            return GodinClassifier(backbone, len(self.class_names), similarity=self.baselines.godin_similarity)

    def _new_gan(self) -> ConfidenceGAN:
        from dreamood.baselines import ConfidenceGAN

        size = _image_size(self.config)
        if size < 8 or size & (size - 1):
            raise ValueError(
                f"the GAN baseline's DCGAN makes square images of a power-of-two side (32 for CIFAR); the ID images "
                f"are {size}x{size}: set data.image_size to a power of two or leave this baseline out"
            )
        mean, std = _normalization(self.config.benchmark)
        return ConfidenceGAN(
            size,
            3,
            generator_width=self.baselines.gan_width,
            discriminator_width=self.baselines.gan_width,
            beta=self.baselines.gan_beta,
            mean=mean,
            std=std,
            seed=self.config.seed,
            device=self.device,
        )

    def _memo(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        from dreamood.baselines import MEMO, augmentation_transform

        mean, std = _normalization(self.config.benchmark)
        return MEMO(
            model,
            _PixelSpace(augmentation_transform("augmix"), mean, std),
            num_augmentations=self.baselines.memo_augmentations,
            lr=self.baselines.memo_lr,
            prior_strength=self.baselines.memo_prior_strength,
            seed=self.config.seed,
            device=self.device,
            progress=self.config.progress,
        )

    def _decoder(self, device: torch.device) -> Any:
        """The image decoder: the factory's, else Stable Diffusion from ``generation.model``."""
        with library_progress_bars(["transformers", "diffusers"], enabled=self.config.progress):
            if self._decoder_factory is not None:
                return self._decoder_factory(self.config, self.class_names)
            return _make_decoder(self.config, self.class_names, device)

    def run(self) -> OODReport:
        """Run every stage in order (skipping those already done) and return the evaluation report.

        Returns:
            The OOD report.
        """
        self.write_config()
        anchors = self.anchors()
        encoder = self.fit_encoder(anchors)
        bank = self.feature_bank(encoder)
        samples = self.sample(bank, anchors)
        images = self.generate(samples)
        model = self.train(images)
        report = self.evaluate(model)
        if self.config.method == "dream-id":
            self.generalization(model)
        return report


def _make_decoder(config: PipelineConfig, class_names: list[str], device: torch.device) -> Any:
    """Stable Diffusion with the configuration's generation settings (safety checker off, see the decoder)."""
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder

    cfg = config.generation
    return StableDiffusionDecoder.from_pretrained(
        cfg.model,
        class_names,
        torch_dtype=cfg.dtype,
        device=device,
        scheduler=cfg.scheduler,
        local_files_only=cfg.local_files_only,
        prompt_template=cfg.prompt,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=cfg.height,
        width=cfg.width,
        output_size=cfg.save_size,
        progress=config.progress,
        channels_last=cfg.channels_last,
        fuse_qkv_projections=cfg.fuse_qkv_projections,
        compile=cfg.compile,
        compile_vae=cfg.compile_vae,
        compile_mode=cfg.compile_mode,
    )


def ood_table(reports: Mapping[str, OODReport]) -> str:
    """A markdown table comparing methods by their mean over the OOD sets.

    Args:
        reports: One report per method, by method name.

    Returns:
        The table: mean FPR95 (ID positive, the paper's), mean AUROC and ID accuracy, in %.
    """
    lines = ["| method | mean FPR95 (ID+) | mean AUROC | ID accuracy |", "|---|---|---|---|"]
    for name, report in reports.items():
        mean = report.mean.metrics
        accuracy = "-" if report.id_accuracy is None else f"{100 * report.id_accuracy:.2f}"
        lines.append(f"| {name} | {100 * mean['fpr95']:.2f} | {100 * mean['auroc']:.2f} | {accuracy} |")
    return "\n".join(lines)


def accuracy_table(accuracies: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of top-1 accuracy by method and test set.

    Args:
        accuracies: ``{method: {test set: accuracy}}``, every method with the same test sets.

    Returns:
        The table, accuracies in %.
    """
    sets = list(next(iter(accuracies.values()), {}))
    lines = ["| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, row in accuracies.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[key]:.2f}" for key in sets) + " |")
    return "\n".join(lines)


class _AfterAugmentation:
    """Read an augmented image in ``[0, 1]`` as a generated image is read: as a PIL image through ``transform``."""

    def __init__(self, transform: Transform | None) -> None:
        self.transform = transform

    def __call__(self, image: Tensor) -> Any:
        if self.transform is None:
            return image
        from torchvision.transforms.functional import to_pil_image

        return self.transform(to_pil_image(image))


class _PixelSpace:
    """Apply an augmentation of ``[0, 1]`` images to a normalised image: undo the normalisation, augment, redo it."""

    def __init__(self, transform: Transform, mean: Sequence[float], std: Sequence[float]) -> None:
        self.transform = transform
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        from dreamood.baselines import augment_image

        pixels = (image * self.std + self.mean).clamp(0.0, 1.0)  # the clamp only removes rounding errors
        augmented: Tensor = (augment_image(pixels, self.transform) - self.mean) / self.std
        return augmented


def _changed_keys(old: Any, new: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".")


# ---- smoke runs ---------------------------------------------------------------------------------------------

_SMOKE_CLASSES: dict[str, list[str]] = {
    "cifar100": ["apple", "bird", "cat", "dog"],
    "imagenet100": ["bird", "frog", "horse", "ship"],
    "folder": ["car", "deer", "plane", "truck"],
}


def smoke_setup(
    config: PipelineConfig,
    output_dir: str | os.PathLike[str],
    *,
    per_class: int = 24,
    image_size: int = 32,
    model_dir: str | os.PathLike[str] | None = None,
) -> tuple[PipelineConfig, PipelineData]:
    """Shrink ``config`` to a run that checks the whole wiring on a CPU in seconds, with random data.

    Every stage runs as in a real run, through the same code, but with a tiny randomly initialised Stable
    Diffusion (saved to ``model_dir`` and loaded back from there, like real weights), four classes of random
    images (one random prototype per class plus noise, pixels in ``[0, 1]``, normalised like the benchmark's
    images), two random OOD sets, a rotated copy of the ID test set as generalisation set, a small CNN, a few
    epochs and a few generated images per class. The OOD numbers it produces mean nothing; the classifier does
    learn the four classes. Run the baselines with :data:`SMOKE_BASELINES`.

    Args:
        config: The configuration to shrink (its benchmark, method and seed are kept).
        output_dir: Folder of the smoke run.
        per_class: Random training images per class.
        image_size: Side of the random images.
        model_dir: Folder of the tiny Stable Diffusion, written when it does not hold one yet; default
            ``output_dir/tiny-stable-diffusion``.

    Returns:
        The shrunk configuration and the random datasets.
    """
    from torch.utils.data import TensorDataset

    from dreamood.data.transforms import get_transform
    from dreamood.testing import tiny_stable_diffusion_pipeline, write_tiny_clip_tokenizer

    root = Path(output_dir).expanduser()
    model = root / "tiny-stable-diffusion" if model_dir is None else Path(model_dir).expanduser()
    if not (model / "model_index.json").is_file():
        with (
            tempfile.TemporaryDirectory() as scratch,
            library_progress_bars(["transformers", "diffusers"], enabled=config.progress),
        ):
            tiny_stable_diffusion_pipeline(scratch).save_pretrained(str(model))
        # Newer transformers save only tokenizer.json; SD v1.x folders also hold vocab.json and merges.txt.
        write_tiny_clip_tokenizer(model / "tokenizer")
    names = _SMOKE_CLASSES[config.benchmark]
    keep = 1 if config.method == "dream-id" else 2
    small = config.replace(
        **{
            "output_dir": str(root),
            "device": "cpu",
            "data.class_names": names,
            "data.image_size": image_size,
            "data.num_workers": 0,
            "anchors.model": str(model),
            "encoder.backbone": "small",
            "encoder.epochs": 3,
            "encoder.batch_size": 16,
            "bank.per_class": 16,
            "bank.batch_size": 32,
            "sampler.k": 4,
            "sampler.boundary": 8,
            "sampler.anchors_per_round": 4,
            "sampler.candidates_per_anchor": 32,
            "sampler.keep": keep,
            "sampler.num_per_class": 8,
            "generation.model": str(model),
            "generation.steps": 2,
            "generation.height": 64,
            "generation.width": 64,
            "generation.save_size": image_size,
            "generation.images_per_class": 4,
            "generation.batch_size": 8,
            "generation.dtype": "fp32",
            "training.backbone": "small",
            "training.epochs": 6,
            "training.batch_size": 16,
            "training.outlier_batch_size": 8,
            "training.init_checkpoint": None,
            "training.pretrain_epochs": min(config.training.pretrain_epochs, 1),
            "evaluation.repeats": 2,
            "evaluation.batch_size": 64,
        }
    )
    from dreamood.baselines import rotate_images

    generator = torch.Generator().manual_seed(config.seed)
    shape = (3, image_size, image_size)
    prototypes = torch.rand(len(names), *shape, generator=generator)
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in _normalization(config.benchmark))

    def pixels(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(len(names)).repeat_interleave(count)
        noise = 0.2 * torch.randn(len(labels), *shape, generator=generator)
        return (prototypes[labels] + noise).clamp(0.0, 1.0), labels

    def normalized(images: Tensor, labels: Tensor | None = None) -> TensorDataset:
        images = (images - mean) / std  # as the benchmark's transforms normalise real images
        return TensorDataset(images) if labels is None else TensorDataset(images, labels)

    train_pixels, train_labels = pixels(per_class)
    test_pixels, test_labels = pixels(max(per_class // 2, 3))
    train = normalized(train_pixels, train_labels)
    ood: dict[str, Dataset[Any]] = {
        "Gaussian noise": normalized((0.5 + 0.25 * torch.randn(40, *shape, generator=generator)).clamp(0.0, 1.0)),
        "Uniform noise": normalized(torch.rand(40, *shape, generator=generator)),
    }
    rotated = rotate_images(test_pixels, 15.0, seed=config.seed)
    data = PipelineData(
        names,
        train,
        train,
        normalized(test_pixels, test_labels),
        ood,
        generated_transform=get_transform(config.benchmark, "generated", image_size=image_size),
        generalization={"ID test, rotated": normalized(rotated, test_labels)},
        raw_train=TensorDataset(train_pixels, train_labels),
    )
    return small, data
