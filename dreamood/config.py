"""Configuration of a whole DREAM-OOD run: dataclasses with the paper's defaults and a strict file loader.

A configuration is a TOML, YAML or JSON file with one table per stage (``[data]``, ``[anchors]``, ``[encoder]``,
``[bank]``, ``[sampler]``, ``[generation]``, ``[training]``, ``[evaluation]``) and a few top-level keys. Keys
that are left out take the defaults of the dataclasses below, which are the paper's CIFAR-100 settings (Du et
al., NeurIPS 2023, and its public code). The package ships the two paper configurations (``cifar100``,
``imagenet100``) and the DREAM-ID variant (``imagenet100-dream-id``); :func:`load_config` accepts their names
as well as file paths.

The loader is strict: an unknown key, a value of the wrong type or an out-of-range value raises one
:class:`ConfigError` that names the key (``training.epochs``) and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from dreamood.errors import DreamoodError

__all__ = [
    "PACKAGED_CONFIGS",
    "AnchorsConfig",
    "BankConfig",
    "ConfigError",
    "DataConfig",
    "EncoderConfig",
    "EvaluationConfig",
    "GenerationConfig",
    "PipelineConfig",
    "SamplerConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "packaged_config_path",
]

#: Names of the configurations shipped with the package (``dreamood/configs/<name>.toml``).
PACKAGED_CONFIGS: tuple[str, ...] = (
    "cifar100",
    "imagenet100",
    "imagenet100-dream-id",
    "cifar100-reference",
    "imagenet100-reference",
    "imagenet100-dream-id-reference",
)

#: ResNet stem choices of ``encoder.stem`` and ``training.stem`` (``dreamood.models.resnet.STEMS``).
STEM_CHOICES: tuple[str, ...] = ("auto", "3x3", "7x7")
#: Outlier losses of ``training.loss``.
LOSSES: tuple[str, ...] = ("energy", "oe", "outlier-class")
#: FPR95 threshold rules of ``evaluation.fpr_rule``.
FPR_RULES: tuple[str, ...] = ("exact", "nearest")

BENCHMARKS: tuple[str, ...] = ("cifar100", "imagenet100", "folder")
METHODS: tuple[str, ...] = ("dream-ood", "dream-id")
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "small")
#: ``torch.compile`` modes accepted by the decoder and the training loop (defined here, where no torch import is
#: needed). ``"reduce-overhead"`` replays CUDA graphs; the ``max-autotune`` modes benchmark kernel choices.
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Autocast dtypes accepted by the encoder and the training loop's ``amp``.
AMP_DTYPES: tuple[str, ...] = ("bf16", "fp16")


class ConfigError(DreamoodError, ValueError):
    """A configuration file or override is malformed: unknown key, wrong type, or out-of-range value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    _require(math.isfinite(value), f"{name} must be a finite number {bound}, got {value}")
    _require(value >= 0 if allow_zero else value > 0, f"{name} must be {bound}, got {value}")


def _at_most(value: float, limit: float, name: str, meaning: str) -> None:
    _require(value <= limit, f"{name} must be at most {limit:g} ({meaning}), got {value:g}")


def _momentum(value: float, name: str) -> None:
    _positive(value, name, allow_zero=True)
    _require(value < 1, f"{name} must be in [0, 1) (SGD momentum; 0.9 in the paper), got {value}")


def _one_of(value: str, choices: Sequence[str], name: str) -> None:
    _require(value in choices, f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# The checks of TrainingConfig, with the messages of dreamood._validation (which imports torch, so it cannot be
# used here): TypeError for a value of the wrong type, ConfigError (a ValueError) for one out of range.


def _finite_number(value: float, name: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    bound = ">= 0" if allow_zero else "> 0"
    _require(
        (number >= 0 if allow_zero else number > 0) and math.isfinite(number),
        f"{name} must be a finite number {bound}, got {value!r}",
    )


def _count(value: int, name: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    _require(value > 0 or (allow_zero and value == 0), f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Where the datasets live and how they are loaded.

    Attributes:
        root: The ID data: for ``cifar100`` the folder holding ``cifar-100-python/``; for ``imagenet100`` the
            ImageNet-1k root holding ``train/`` and ``val/``; for ``folder`` a folder holding ``train/`` and
            ``test/``, each with one sub-folder of images per class.
        ood_root: The folder holding the OOD test sets (see :mod:`dreamood.data.ood` for their sub-folders).
        ood_sets: The OOD test sets to evaluate on; default: all of the benchmark's.
        ood_paths: Folder of an OOD set by name, overriding ``ood_root/<default folder>``.
        class_names: Class names in label order; default: the benchmark's bundled list (``folder``: the class
            folder names with underscores read as spaces).
        image_size: Side of the ID images; default 32 for ``cifar100`` and ``folder``, 224 for ``imagenet100``.
        download: Let torchvision download CIFAR-100 when it is missing.
        num_workers: DataLoader worker processes.
        imagenet_a: ImageNet-A folder, to measure generalisation accuracy (DREAM-ID).
        imagenet_v2: ImageNet-V2 folder, to measure generalisation accuracy (DREAM-ID).
    """

    root: str = "data/cifar100"
    ood_root: str = "data/ood"
    ood_sets: list[str] | None = None
    ood_paths: dict[str, str] = field(default_factory=dict)
    class_names: list[str] | None = None
    image_size: int | None = None
    download: bool = False
    num_workers: int = 4
    imagenet_a: str | None = None
    imagenet_v2: str | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _positive(self.image_size, "image_size")
        _positive(self.num_workers, "num_workers", allow_zero=True)
        if self.class_names is not None:
            _require(len(set(self.class_names)) == len(self.class_names), "class_names has duplicates")
            _require(len(self.class_names) > 0, "class_names is empty")


@dataclass(frozen=True)
class AnchorsConfig:
    """Step 1, the class anchors T(y): rows of the text encoder's input token-embedding table.

    Attributes:
        model: Stable Diffusion folder or Hugging Face model id (the anchors come from its tokenizer and text
            encoder, so they match the generator).
        subword: How a class name split into several tokens becomes one vector: ``"mean-norm"`` (the mean of
            its rows rescaled to their mean norm), ``"mean"`` (the plain mean, whose norm shrinks) or ``"first"``
            (the first token's row, as the authors' code does).
        local_files_only: Never download the model.
        words: Per-class words tokenised instead of the class names (one per class, label order), e.g. the
            authors' injection words (``dreamood.data.reference_words(benchmark).injection_words``); ``None``
            tokenises the class names.
    """

    model: str = "CompVis/stable-diffusion-v1-4"
    subword: str = "mean-norm"
    local_files_only: bool = True
    words: list[str] | None = None

    def __post_init__(self) -> None:
        _one_of(self.subword, ("mean-norm", "mean", "first"), "subword")
        if self.words is not None and (not self.words or any(not word.strip() for word in self.words)):
            raise ConfigError("words must be null or a non-empty list of non-empty words, one per class")


@dataclass(frozen=True)
class EncoderConfig:
    """Phase 1: the text-conditioned image encoder (paper Eq. 2).

    Attributes:
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"small"`` (a small CNN for smoke runs).
        epochs: Training epochs.
        batch_size: Images per step.
        lr: Initial learning rate of the per-step cosine schedule (SGD, Nesterov momentum).
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        temperature: The temperature ``t`` of the cosine logits.
        amp: ``"bf16"`` or ``"fp16"`` autocast, or none.
        stem: ResNet stem: ``"auto"`` (3x3 stride-1 without max-pool up to 64 px, else 7x7), ``"3x3"`` at any
            resolution (the authors' networks, also at 224 px) or ``"7x7"``; see ``dreamood.models.resnet.STEMS``.
    """

    backbone: str = "resnet34"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.1
    amp: str | None = None
    stem: str = "auto"

    def __post_init__(self) -> None:
        _one_of(self.backbone, BACKBONES, "backbone")
        _positive(self.epochs, "epochs")
        _positive(self.batch_size, "batch_size")
        _positive(self.lr, "lr")
        _momentum(self.momentum, "momentum")
        _positive(self.weight_decay, "weight_decay", allow_zero=True)
        _positive(self.temperature, "temperature")
        if self.amp is not None:
            _one_of(self.amp, ("bf16", "fp16"), "amp")
        _one_of(self.stem, STEM_CHOICES, "stem")


@dataclass(frozen=True)
class BankConfig:
    """The feature bank: L2-normalised training embeddings of the trained encoder.

    Attributes:
        per_class: Embeddings kept per class (500 on CIFAR-100, 1000 on ImageNet-100).
        batch_size: Images per forward pass.
        augment: Embed the training images through the training augmentation (random crop and flip), as the
            authors' code does; ``False`` (dreamood's default) embeds the plain test-time view.
        shuffle: Visit the training images in a seeded random order (which images fill ``per_class`` when a
            class has more), as the authors' code does; ``False`` takes them in dataset order.
    """

    per_class: int = 500
    batch_size: int = 256
    augment: bool = False
    shuffle: bool = False

    def __post_init__(self) -> None:
        _positive(self.per_class, "per_class")
        _positive(self.batch_size, "batch_size")


@dataclass(frozen=True)
class SamplerConfig:
    """Phase 2: k-NN boundary sampling of outlier (or, for DREAM-ID, inlier) embeddings (paper Eq. 5).

    Attributes:
        k: The k of the k-th nearest-neighbour distance.
        boundary: Size of each class's anchor set: the bank embeddings with the largest k-NN distance (for
            inliers, the smallest).
        anchors_per_round: Distinct members of the anchor set drawn as Gaussian centres per round.
        candidates_per_anchor: Gaussian candidates drawn around each centre.
        sigma: Standard deviation of the Gaussian noise.
        keep: Candidates kept per centre (largest k-NN distance; for inliers, the smallest).
        num_per_class: Embeddings sampled per class.
    """

    k: int = 300
    boundary: int = 50
    anchors_per_round: int = 50
    candidates_per_anchor: int = 1500
    sigma: float = 0.07
    keep: int = 2
    num_per_class: int = 10000

    def __post_init__(self) -> None:
        for name in ("k", "boundary", "anchors_per_round", "candidates_per_anchor", "keep", "num_per_class"):
            _positive(getattr(self, name), name)
        _positive(self.sigma, "sigma")
        # The bank's embeddings have norm 1 and the paper uses 0.01-0.07: beyond this the noise is all there is.
        _at_most(self.sigma, 10.0, "sigma", "standard deviation of noise around unit-norm embeddings")
        _require(
            self.anchors_per_round <= self.boundary,
            f"anchors_per_round ({self.anchors_per_round}) must not exceed boundary ({self.boundary})",
        )
        _require(
            self.keep <= self.candidates_per_anchor,
            f"keep ({self.keep}) must not exceed candidates_per_anchor ({self.candidates_per_anchor})",
        )


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding sampled embeddings into images with Stable Diffusion (paper Eq. 6).

    Attributes:
        model: Stable Diffusion v1.x folder or Hugging Face model id.
        prompt: Prompt with one ``{}`` where the class token goes.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance weight.
        height: Rendered height in pixels (a multiple of 8).
        width: Rendered width in pixels (a multiple of 8).
        save_size: Side of the saved images (256 in the paper); none keeps the rendered size.
        images_per_class: Images rendered per class (from the first sampled embeddings of the class).
        batch_size: Images rendered together.
        scheduler: ``"pndm"`` (PLMS, the paper's), ``"ddim"``, ``"dpm++"``, or a few-step choice: ``"lcm"``
            (with an LCM-LoRA), ``"euler"``, ``"euler-a"``, ``"model"`` (the model folder's own scheduler, for
            SD-Turbo and SDXL-Turbo: 1-4 steps, ``guidance_scale`` 0).
        dtype: Weights' dtype (``"fp16"``, ``"bf16"``, ``"fp32"``); none: fp16 on CUDA, fp32 elsewhere.
        local_files_only: Never download the model.
        channels_last: Run the UNet and VAE in channels-last memory format.
        fuse_qkv_projections: Fuse the attention layers' query/key/value projections.
        compile: ``torch.compile`` the UNet (minutes at the first batch; keep ``batch_size`` fixed).
        compile_vae: ``torch.compile`` the VAE decoder.
        compile_mode: ``torch.compile`` mode: ``"default"``, ``"reduce-overhead"`` (CUDA graphs),
            ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.
        writer_threads: Threads that encode and write the PNG files while the next batch renders (0: inline).
        prompt_words: Per class (label order), the word written into the prompt instead of the class name
            (e.g. the authors' prompt words); none writes the class names.
        class_prompts: Per-class templates that replace ``prompt`` for the classes named (keys are class names,
            values hold one ``{}``), e.g. the authors' ImageNet-100 suffixes ``"A high-quality image of the {}
            bird"``.
        injection: ``"span"`` (the prompt word's token span collapses into one slot, dreamood's default) or
            ``"token"`` (every occurrence of the injection token takes the vector, the authors' vocabulary-row
            overwrite; refuses a class whose token is not in its prompt).
        injection_words: ``"token"`` only: per class, the word whose first token is replaced (e.g. the authors'
            injection words); none takes the prompt word's first token.
        conditioning_noise: Standard deviation of seeded Gaussian noise added to the prompt conditioning (the
            authors' ``--gaussian_scale``, 0 in their runs).
        fixed_latent_seed: When set, every image starts from one latent drawn with this seed (the authors'
            ``--fixed_code``, off in their runs).
        lora: LoRA weights loaded into the model and fused before generation (an LCM-LoRA folder with
            ``scheduler = "lcm"``, 4 steps, ``guidance_scale`` 1); none loads no LoRA.
        lora_scale: Weight of the LoRA update.
    """

    model: str = "CompVis/stable-diffusion-v1-4"
    prompt: str = "A high-quality photo of a {}"
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    save_size: int | None = 256
    images_per_class: int = 1000
    batch_size: int = 8
    scheduler: str = "pndm"
    dtype: str | None = None
    local_files_only: bool = True
    channels_last: bool = True
    fuse_qkv_projections: bool = True
    compile: bool = False
    compile_vae: bool = False
    compile_mode: str = "default"
    writer_threads: int = 4
    prompt_words: list[str] | None = None
    class_prompts: dict[str, str] = field(default_factory=dict)
    injection: str = "span"
    injection_words: list[str] | None = None
    conditioning_noise: float = 0.0
    fixed_latent_seed: int | None = None
    lora: str | None = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        from dreamood.decoding.few_step import SCHEDULERS

        _require(self.prompt.count("{}") == 1, f"prompt must hold exactly one '{{}}', got {self.prompt!r}")
        for name, template in self.class_prompts.items():
            _require(
                template.count("{}") == 1,
                f"class_prompts.{name} must hold exactly one '{{}}', got {template!r}",
            )
        for key in ("prompt_words", "injection_words"):
            words = getattr(self, key)
            _require(
                words is None or (bool(words) and all(word.strip() for word in words)),
                f"{key} must be null or a non-empty list of non-empty words, one per class",
            )
        _one_of(self.injection, ("span", "token"), "injection")
        _require(
            self.injection_words is None or self.injection == "token",
            "injection_words are used by injection = 'token' only",
        )
        _positive(self.conditioning_noise, "conditioning_noise", allow_zero=True)
        if self.fixed_latent_seed is not None:
            _positive(self.fixed_latent_seed, "fixed_latent_seed", allow_zero=True)
        for name in ("steps", "height", "width", "images_per_class", "batch_size"):
            _positive(getattr(self, name), name)
        for name in ("height", "width"):
            _require(getattr(self, name) % 8 == 0, f"{name} must be a multiple of 8, got {getattr(self, name)}")
        _positive(self.guidance_scale, "guidance_scale", allow_zero=True)
        if self.save_size is not None:
            _positive(self.save_size, "save_size")
        _one_of(self.scheduler, SCHEDULERS, "scheduler")
        if self.dtype is not None:
            _one_of(self.dtype, ("fp16", "bf16", "fp32", "float16", "bfloat16", "float32"), "dtype")
        _one_of(self.compile_mode, COMPILE_MODES, "compile_mode")
        _positive(self.writer_threads, "writer_threads", allow_zero=True)
        _require(self.lora is None or bool(self.lora), "lora must be a LoRA folder, file or model id, or none")
        _require(math.isfinite(self.lora_scale), f"lora_scale must be a finite number, got {self.lora_scale!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters and engineering options of :func:`~dreamood.training.train_classifier`.

    The defaults follow the DREAM-OOD paper and its public code: SGD with Nesterov momentum 0.9, weight decay
    5e-4, a cosine learning rate updated every step down to ``min_lr``. The paper trains CIFAR-100 from scratch
    for 200 epochs with ``lr=0.1, beta=2.5`` and fine-tunes ImageNet-100 for 20 epochs with ``lr=0.001,
    beta=1.0`` from a cross-entropy model. What a call trains on and where (device, seed, output folder,
    resuming, initial weights, progress bar) are arguments of :func:`~dreamood.training.train_classifier`.
    :class:`TrainConfig`, the ``[training]`` section of a run configuration, extends this class; use
    ``dataclasses.replace(config, lr=0.01)`` for a copy with other values.

    Args:
        epochs: Number of epochs.
        lr: Peak learning rate (the first step's).
        beta: Weight of the outlier loss: ``loss = CE + beta * L_ood``.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 weight decay on every trained parameter (classifier and regulariser).
        min_lr: Learning rate reached by the cosine schedule after the last step.
        ood_start_epoch: Number of epochs trained with cross-entropy alone before the outlier loss starts (VOS
            starts at epoch 40 of 100); a feature sampler still sees every batch from the first epoch on.
        amp: ``None`` (full precision), ``"bf16"`` or ``"fp16"`` autocast; ``"fp16"`` also scales the loss.
        channels_last: Convert the model and 4-D image batches to the channels-last memory format.
        compile: Run the forward pass through ``torch.compile``.
        compile_mode: ``torch.compile``'s ``mode`` with ``compile=True``: ``None`` (its default), ``"default"``,
            ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.
        cudnn_benchmark: Set ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution algorithms and keeps
            the fastest) while :func:`~dreamood.training.train_classifier` runs, and restore the previous value
            afterwards; ``False`` leaves the setting as it is.
        sync_every: Read the step statistics (losses, accuracy counts, label checks) back from the
            device every this many steps (default 10) and at the end of every epoch, so the host does not wait
            for the device at every step; the epoch metrics do not depend on it. A non-finite loss is reported at
            the next read-back and names the first bad step, but by then that step and up to ``sync_every - 1``
            more have updated the model, so its weights in memory may be NaN (the checkpoint on disk is the last
            completed epoch's). ``1`` checks every step before its update. The progress bar moves at read-backs.

    Raises:
        ValueError: A number is out of range, ``amp`` or ``compile_mode`` is unknown, or ``compile_mode`` is set
            without ``compile=True`` (a :class:`ConfigError`).
        TypeError: A count is not an int or a number is not a number.
    """

    epochs: int
    lr: float = 0.1
    beta: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    min_lr: float = 1e-6
    ood_start_epoch: int = 0
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    cudnn_benchmark: bool = False
    sync_every: int = 10

    def __post_init__(self) -> None:
        _count(self.epochs, "epochs")
        _finite_number(self.lr, "lr")
        _finite_number(self.beta, "beta", allow_zero=True)
        _finite_number(self.momentum, "momentum", allow_zero=True)
        _require(self.momentum < 1, f"momentum must be in [0, 1) (SGD momentum; 0.9 in the paper), got {self.momentum}")
        _finite_number(self.weight_decay, "weight_decay", allow_zero=True)
        _finite_number(self.min_lr, "min_lr", allow_zero=True)
        _require(self.min_lr <= self.lr, f"min_lr must not exceed lr, got min_lr={self.min_lr!r} and lr={self.lr!r}")
        _require(not (self.nesterov and self.momentum == 0), "nesterov=True needs momentum > 0, got momentum=0")
        _count(self.ood_start_epoch, "ood_start_epoch", allow_zero=True)
        _require(
            self.ood_start_epoch == 0 or self.ood_start_epoch < self.epochs,
            f"ood_start_epoch={self.ood_start_epoch} is not below epochs={self.epochs}: the outlier loss would "
            "never start",
        )
        if self.amp is not None:
            _one_of(self.amp, AMP_DTYPES, "amp")
        if self.compile_mode is not None:
            _one_of(self.compile_mode, COMPILE_MODES, "compile_mode")
            _require(self.compile, f"compile_mode={self.compile_mode!r} needs compile=True")
        _count(self.sync_every, "sync_every")

    def loop(self) -> TrainingConfig:
        """Only the training loop's settings: a plain :class:`TrainingConfig` with this one's values.

        Returns:
            The loop's settings (a :class:`TrainConfig` drops its run-level fields).
        """
        names = [field.name for field in dataclasses.fields(TrainingConfig)]
        return TrainingConfig(**{name: getattr(self, name) for name in names})

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-serialisable dict.

        Returns:
            A dict mapping each field name to its value.
        """
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig(TrainingConfig):
    """Phase 3: training the classifier with the energy regulariser on imagined outliers (paper Eq. 7).

    The ``[training]`` section of a run configuration: the options of the training loop
    (:class:`TrainingConfig`: ``epochs``, ``lr``, ``beta``, ``momentum``, ``nesterov``, ``weight_decay``,
    ``min_lr``, ``ood_start_epoch``, ``amp``, ``channels_last``, ``compile``, ``compile_mode``,
    ``cudnn_benchmark``, ``sync_every``, with its defaults except ``epochs = 200`` and ``beta = 2.5``, the
    paper's CIFAR-100 recipe), plus the model, the batches and the initial weights below. An instance can be
    passed to :func:`~dreamood.training.train_classifier` as it is; the loop reads only its own fields.

    Attributes:
        epochs: Training epochs (default 200).
        beta: Weight of the outlier loss (default 2.5).
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"small"``.
        batch_size: ID images per step.
        outlier_batch_size: Generated images per step (outliers for DREAM-OOD, inliers for DREAM-ID).
        head: ``"linear"`` (``Linear(1, 2)``) or ``"mlp"`` (``1 -> hidden_dim -> 2``) on the negative energy.
        hidden_dim: Width of the MLP head.
        energy_temperature: Temperature of the energy score.
        init_checkpoint: Weights to start from (a cross-entropy model for ImageNet-100), when given.
        pretrain_epochs: When no ``init_checkpoint`` is given and this is positive, first train the classifier
            with cross-entropy alone for this many epochs (at ``pretrain_lr``) and start from it.
        pretrain_lr: Learning rate of that cross-entropy pre-training.
        stem: ResNet stem, as :attr:`EncoderConfig.stem`.
        temperature_form: How ``energy_temperature`` enters the regulariser's score: ``"free-energy"``
            (``T * logsumexp(f / T)``, dreamood's) or ``"scaled-logsumexp"`` (``logsumexp(f) / T``, the authors'
            ImageNet-100 code); equal at ``T = 1``.
        loss: The outlier loss: ``"energy"`` (paper Eq. 7), ``"oe"`` (outlier exposure, the authors'
            ``--score OE``) or ``"outlier-class"`` (K+1 classes, outliers labelled ``K``: the authors'
            ``--add_class``; scored with ``outlier_class_score``).
    """

    epochs: int = 200
    beta: float = 2.5
    backbone: str = "resnet34"
    batch_size: int = 256
    outlier_batch_size: int = 256
    head: str = "linear"
    hidden_dim: int = 512
    energy_temperature: float = 1.0
    init_checkpoint: str | None = None
    pretrain_epochs: int = 0
    pretrain_lr: float = 0.1
    stem: str = "auto"
    temperature_form: str = "free-energy"
    loss: str = "energy"

    def __post_init__(self) -> None:
        _one_of(self.stem, STEM_CHOICES, "stem")
        _one_of(self.temperature_form, ("free-energy", "scaled-logsumexp"), "temperature_form")
        _one_of(self.loss, LOSSES, "loss")
        _one_of(self.backbone, BACKBONES, "backbone")
        for name in ("batch_size", "outlier_batch_size", "hidden_dim"):
            _positive(getattr(self, name), name)
        for name in ("energy_temperature", "pretrain_lr"):
            _positive(getattr(self, name), name)
        _positive(self.pretrain_epochs, "pretrain_epochs", allow_zero=True)
        _one_of(self.head, ("linear", "mlp"), "head")
        if self.compile_mode in COMPILE_MODES:  # TrainingConfig's check, phrased for a configuration file
            _require(self.compile, f"compile_mode={self.compile_mode!r} needs compile = true")
        super().__post_init__()


@dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation: FPR95, AUROC, AUPR and ID accuracy of the negative-energy score.

    Attributes:
        protocol: ``"paper"`` (each OOD set subsampled to a fifth of the ID test size, averaged over
            ``repeats``) or ``"full"`` (every OOD image).
        repeats: Subsamples per OOD set for the ``"paper"`` protocol.
        batch_size: Images per forward pass.
        fpr_rule: How the FPR95 threshold is found: ``"exact"`` (dreamood's) or ``"nearest"`` (the threshold at
            the recall nearest 0.95, the authors' code).
        ood_subsample: Size of each OOD subsample of the ``"paper"`` protocol; none takes a fifth of the ID test
            set (the authors' ImageNet-100 code cuts it to whole batches of 160: 960).
        aupr_trapezoid: Also report AUPR by the trapezoid rule (pytorch-ood's and OpenOOD's), beside the
            step-wise average precision.
    """

    protocol: str = "paper"
    repeats: int = 5
    batch_size: int = 256
    fpr_rule: str = "exact"
    ood_subsample: int | None = None
    aupr_trapezoid: bool = False

    def __post_init__(self) -> None:
        _one_of(self.protocol, ("paper", "full"), "protocol")
        _positive(self.repeats, "repeats")
        _positive(self.batch_size, "batch_size")
        _one_of(self.fpr_rule, FPR_RULES, "fpr_rule")
        if self.ood_subsample is not None:
            _positive(self.ood_subsample, "ood_subsample")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole run: benchmark, method, output folder, and one section per stage.

    Attributes:
        benchmark: ``"cifar100"``, ``"imagenet100"`` or ``"folder"`` (any dataset stored as class folders).
        method: ``"dream-ood"`` (imagined outliers + energy regulariser) or ``"dream-id"`` (imagined inliers
            used as extra labelled training data).
        output_dir: Folder of every artefact; a stage whose artefact exists there is skipped.
        seed: Seed of every random choice of the run.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        progress: Show progress bars.
        data: See :class:`DataConfig`.
        anchors: See :class:`AnchorsConfig`.
        encoder: See :class:`EncoderConfig`.
        bank: See :class:`BankConfig`.
        sampler: See :class:`SamplerConfig`.
        generation: See :class:`GenerationConfig`.
        training: See :class:`TrainConfig`.
        evaluation: See :class:`EvaluationConfig`.
    """

    benchmark: str = "cifar100"
    method: str = "dream-ood"
    output_dir: str = "runs/cifar100"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    anchors: AnchorsConfig = field(default_factory=AnchorsConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        _one_of(self.benchmark, BENCHMARKS, "benchmark")
        _one_of(self.method, METHODS, "method")
        _require(0 <= self.seed < 2**63, f"seed must be an integer in [0, 2**63) (torch's generators), got {self.seed}")
        _require(self.output_dir.strip() != "", "output_dir must name a folder, got an empty string")
        _require(
            self.generation.images_per_class <= self.sampler.num_per_class,
            f"generation.images_per_class ({self.generation.images_per_class}) must not exceed "
            f"sampler.num_per_class ({self.sampler.num_per_class}): each image renders one sampled embedding",
        )
        count = len(self.data.class_names) if self.data.class_names is not None else None
        if count is None and self.benchmark in ("cifar100", "imagenet100"):
            count = 100
        for key, words in (
            ("anchors.words", self.anchors.words),
            ("generation.prompt_words", self.generation.prompt_words),
            ("generation.injection_words", self.generation.injection_words),
        ):
            _require(
                words is None or count is None or len(words) == count,
                f"{key} has {0 if words is None else len(words)} words but the benchmark has {count} classes",
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as nested plain dicts (``None`` values included).

        Returns:
            A JSON-serialisable dict that :func:`config_from_dict` turns back into an equal config.
        """
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PipelineConfig:
        """Return a copy with dotted keys replaced, e.g. ``replace(**{"training.epochs": 2})``.

        Args:
            **changes: Dotted key -> new value (checked like a value in a file).

        Returns:
            The new configuration.

        Raises:
            ConfigError: A key is unknown or a value invalid.
        """
        return apply_overrides(self, changes)


# ---- loading ---------------------------------------------------------------------------------------------

C = TypeVar("C")


def _type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "a table"
    origin = get_origin(hint)
    plural = {int: "ints", float: "numbers", str: "strings", bool: "booleans"}
    if origin is list:
        return f"a list of {plural.get(get_args(hint)[0], 'values')}"
    if origin is dict:
        return f"a table of {plural.get(get_args(hint)[1], 'values')}"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        hint, str(hint)
    )


def _is_scalar(value: Any, hint: type) -> bool:
    if isinstance(value, bool):  # bool is a subclass of int: true/false must not pass as 1/0
        return hint is bool
    return isinstance(value, (int, float)) if hint is float else isinstance(value, hint)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` (converting ints to floats and tables to dataclasses)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        # Every union of the configuration is "X | None": check against X for its precise error message.
        (inner,) = [option for option in get_args(hint) if option is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and isinstance(value, Mapping):
        return _build(hint, value, key)
    elif origin is list and isinstance(value, (list, tuple)):
        (item,) = get_args(hint)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        item = get_args(hint)[1]
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    elif hint in (bool, int, float, str) and _is_scalar(value, hint):
        return float(value) if hint is float else value
    shown = "a table" if isinstance(value, Mapping) else f"{type(value).__name__} {value!r}"
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {shown}")


def _build(cls: type[C], values: Mapping[str, Any], prefix: str) -> C:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrongly typed values."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    where = f"[{prefix}]" if prefix else "the top level"
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {_join(prefix, str(key))!r}{hint}; the keys of {where} are: {', '.join(names)}"
            )
    arguments = {key: _convert(value, hints[key], _join(prefix, key)) for key, value in values.items()}
    try:
        return cls(**arguments)
    except ConfigError as error:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{error}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def config_from_dict(values: Mapping[str, Any]) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from nested dicts, strictly.

    Args:
        values: Top-level keys and one table per section; missing keys take their defaults.

    Returns:
        The configuration.

    Raises:
        ConfigError: A key is unknown (the message suggests the closest known key), a value has the wrong
            type, or a value is out of range; the message names the dotted key.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"a configuration must be a table of keys, got {type(values).__name__}")
    return _build(PipelineConfig, values, "")


def packaged_config_path(name: str) -> Path:
    """Path of a configuration shipped with the package.

    Args:
        name: One of :data:`PACKAGED_CONFIGS`.

    Returns:
        The path of ``dreamood/configs/<name>.toml``.

    Raises:
        ConfigError: ``name`` is not a packaged configuration.
    """
    if name not in PACKAGED_CONFIGS:
        raise ConfigError(f"no packaged configuration {name!r}; packaged: {', '.join(PACKAGED_CONFIGS)}")
    return Path(__file__).resolve().parent / "configs" / f"{name}.toml"


def _read_toml(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found]
    data: dict[str, Any] = tomllib.loads(text)
    return data


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"configuration file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not a text file (not UTF-8: {error.reason} at byte {error.start})") from None
    try:
        if suffix == ".toml":
            return _read_toml(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if suffix == ".json":
            return json.loads(text)
    except Exception as error:  # each parser has its own error class; all mean "not valid syntax"
        raise ConfigError(f"{path} is not valid {suffix[1:].upper()}: {error}") from error
    raise ConfigError(f"unsupported configuration format {path.suffix!r} of {path}: use .toml, .yaml, .yml or .json")


def load_config(source: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Load a configuration file (TOML, YAML or JSON) or a packaged configuration, then apply overrides.

    Args:
        source: A file path, or the name of a packaged configuration (``"cifar100"``, ``"imagenet100"``,
            ``"imagenet100-dream-id"``).
        overrides: Dotted key -> value, applied after the file (e.g. ``{"training.epochs": 2}``). A string
            value of a key that holds a string is kept as it is (``"null"`` clears an optional key); for other
            keys it is parsed as a TOML literal (``"2"`` -> 2, ``"[1, 2]"`` -> a list, ``"true"`` -> true).

    Returns:
        The configuration.

    Raises:
        FileNotFoundError: The file does not exist.
        ConfigError: The file cannot be parsed, or a key or value is invalid (the message names the file and
            the dotted key).
    """
    text = os.fspath(source)
    path = packaged_config_path(text) if text in PACKAGED_CONFIGS and not Path(text).exists() else Path(text)
    values = _read_file(path)
    try:
        config = config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return apply_overrides(config, overrides or {})


def _field_hint(parts: Sequence[str]) -> Any:
    """The type of the dotted key ``parts`` of :class:`PipelineConfig` (``None`` when there is no such key)."""
    hint: Any = PipelineConfig
    for part in parts:
        if not (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
            return None
        hints = get_type_hints(hint)
        if part not in hints:
            return None
        hint = hints[part]
    return hint


def _parse_value(raw: Any, hint: Any) -> Any:
    """An override's value: strings become TOML literals unless the key holds a string."""
    if not isinstance(raw, str):
        return raw
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if raw.strip() in ("null", "none", "None") and type(None) in options:
        return None
    if str in options:
        return raw
    try:
        return _read_toml(f"value = {raw}")["value"]
    except Exception:  # not a TOML literal: keep the string, and let the type check name the key
        return raw


def apply_overrides(config: PipelineConfig, overrides: Mapping[str, Any]) -> PipelineConfig:
    """Return ``config`` with dotted keys replaced (``{"sampler.sigma": 0.05, "seed": 1}``).

    Args:
        config: The configuration to start from.
        overrides: Dotted key -> value; strings are parsed as TOML literals when possible (see
            :func:`load_config`).

    Returns:
        A new configuration.

    Raises:
        ConfigError: A key is unknown or a value invalid.
    """
    if not overrides:
        return config
    values = config.to_dict()
    for dotted, raw in overrides.items():
        parts = str(dotted).split(".")
        target: Any = values
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(target, dict) or part not in target or not isinstance(target[part], dict):
                raise ConfigError(f"unknown key {'.'.join(parts[: depth + 1])!r} in override {dotted!r}")
            target = target[part]
        if parts[-1] not in target:
            names = list(target)
            close = difflib.get_close_matches(parts[-1], names, n=1)
            hint = f" (did you mean {'.'.join([*parts[:-1], close[0]])!r}?)" if close else ""
            raise ConfigError(f"unknown key {dotted!r} in overrides{hint}")
        target[parts[-1]] = _parse_value(raw, _field_hint(parts))
    return config_from_dict(values)
