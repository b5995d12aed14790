"""The paper's baselines of a run: their names, their settings, and how the pipeline trains and scores them.

DREAM-OOD is compared with GODIN and GAN-based outlier synthesis (paper Tables 1 and 3), DREAM-ID with a
cross-entropy model, RandAugment, AutoAugment, AugMix and CutMix copies, generic-prompt images and MEMO (Table
4). Each baseline works in ``output_dir/baselines/<name>/`` on the run's data and training recipe, and is skipped
when its result exists unless it is forced.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dreamood._validation import check_choice, check_positive, check_positive_int
from dreamood.io import atomic_write, save_checkpoint
from dreamood.pipeline.data import Transform, image_size_of, normalization_of
from dreamood.pipeline.stages import (
    barrier,
    is_main_process,
    saved_weights,
    seed_global_rngs,
)

if TYPE_CHECKING:
    from dreamood.baselines import ConfidenceGAN, GodinClassifier
    from dreamood.config import TrainingConfig
    from dreamood.evaluation import OODReport
    from dreamood.pipeline.runner import Pipeline

__all__ = [
    "BASELINES",
    "GENERALIZATION_BASELINES",
    "OOD_BASELINES",
    "SMOKE_BASELINES",
    "BaselineConfig",
    "BaselineRunner",
    "baselines_of",
    "parse_baselines",
]

logger = logging.getLogger("dreamood.pipeline")

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


class BaselineRunner:
    """Trains, evaluates and reloads the baselines of one :class:`~dreamood.pipeline.Pipeline`.

    :meth:`Pipeline.ood_baseline <dreamood.pipeline.Pipeline.ood_baseline>` and
    :meth:`Pipeline.generalization_baseline <dreamood.pipeline.Pipeline.generalization_baseline>` delegate here.

    Args:
        pipe: The run whose data, recipe, components and output folder the baselines use.
        settings: The baselines' settings.
    """

    def __init__(self, pipe: Pipeline, settings: BaselineConfig) -> None:
        self.pipe = pipe
        self.settings = settings
        self._redone: set[Path] = set()  # results and classifiers of forced baselines redone by this object
        self._started: set[str] = set()  # baselines whose folder this object prepared

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
        return self.pipe.output_dir / "baselines" / name

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
        cfg = self.pipe.config.evaluation
        test_loader = self.pipe.loader(self.pipe.data.test, cfg.batch_size, shuffle=False)
        ood = {
            set_name: self.pipe.loader(dataset, cfg.batch_size, shuffle=False)
            for set_name, dataset in self.pipe.data.ood.items()
        }
        settings: dict[str, Any] = {
            "protocol": cfg.protocol,
            "sample_size": cfg.ood_subsample,
            "fpr_rule": cfg.fpr_rule,
            "aupr_trapezoid": cfg.aupr_trapezoid,
            "repeats": cfg.repeats,
            "seed": self.pipe.config.seed,
            "device": self.pipe.device,
            "progress": self.pipe.config.progress,
        }
        logger.info("[baseline %s] evaluating", name)
        if name == "godin":
            detector = GODIN(model, batch_size=cfg.batch_size, device=self.pipe.device).fit(
                self._godin_validation_loader()
            )
            if is_main_process():
                scores = {f"{epsilon:g}": score for epsilon, score in detector.validation_scores_.items()}
                with atomic_write(folder / "godin.json", "w") as handle:
                    handle.write(json.dumps({"epsilon": detector.epsilon_, "validation_scores": scores}, indent=2))
            report = OODEvaluator(detector, accuracy=False, **settings).evaluate(test_loader, ood)
            accuracy = classification_accuracy(model, test_loader, device=self.pipe.device, progress_bar=False)
            report = replace(report, id_accuracy=accuracy)
        else:
            report = OODEvaluator(MSP(), model=model, **settings).evaluate(test_loader, ood)
        if is_main_process():
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
        accuracy = self.pipe.accuracy_table(model, path, f"baseline {name}")
        self._mark_redone(name, path)
        return accuracy

    def _baseline_done(self, name: str, path: Path) -> bool:
        """Whether ``path`` (a baseline's result or classifier) is to be used as it is, rather than redone.

        It is, when it exists, its baseline was made from the run's current settings, and it is not forced (or
        was redone by this object already). Otherwise the baseline's folder is prepared for a fresh start.
        """
        if path.is_file() and self._is_current(name) and (name not in self.pipe.force or path in self._redone):
            return True
        self._start(name)
        return False

    def fingerprint(self, name: str) -> str:
        """The SHA-256 of what a baseline's results depend on: the run's training, data and evaluation settings,
        the baselines' settings and the backbone factory (the generic-prompt images add the generation settings).

        Args:
            name: A name from :data:`BASELINES`.

        Returns:
            The hexadecimal fingerprint.
        """
        from dataclasses import asdict

        from dreamood.pipeline.records import fingerprint_of, settings_of
        from dreamood.pipeline.stages import CLASSIFIER

        keys = ["training", "data", "seed", "benchmark", "method", "evaluation"]
        if name == "generic-prompts":
            keys.append("generation")
        settings = settings_of(self.pipe.config.to_dict(), keys)
        settings.update({f"baselines.{key}": value for key, value in asdict(self.settings).items()})
        settings["class names"] = self.pipe.class_names
        components = self.pipe.components_of(CLASSIFIER)
        return fingerprint_of(f"baseline {name}", settings, components, {})

    def _record_path(self, name: str) -> Path:
        return self.baseline_dir(name) / "fingerprint.json"

    def is_done(self, name: str) -> bool:
        """Whether a baseline's result exists and was made from the run's current settings.

        Args:
            name: A name from :data:`BASELINES`.

        Returns:
            ``True`` when the baseline would be skipped (unless forced).
        """
        return self.baseline_path(name).is_file() and self._is_current(name)

    def _recorded(self, name: str) -> str | None:
        """The fingerprint recorded in the baseline's folder (``None``: none, as an older dreamood left it)."""
        path = self._record_path(name)
        try:
            recorded = json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
        return recorded if isinstance(recorded, str) else None

    def _is_current(self, name: str) -> bool:
        return self._recorded(name) == self.fingerprint(name)

    def _start(self, name: str) -> None:
        """Before a baseline runs: delete what another configuration left in its folder, then record this one."""
        if not is_main_process():
            return
        import shutil

        folder, recorded = self.baseline_dir(name), self._recorded(name)
        changed = recorded is not None and recorded != self.fingerprint(name)
        forced = name in self.pipe.force and name not in self._started
        if (changed or forced) and folder.is_dir():
            logger.info("[baseline %s] starts afresh: %s", name, "forced" if forced else "its settings changed")
            shutil.rmtree(folder)
        self._started.add(name)
        if not self._is_current(name):
            record = self._record_path(name)
            with atomic_write(record, "w") as handle:
                json.dump({"fingerprint": self.fingerprint(name)}, handle)

    def _mark_redone(self, name: str, path: Path) -> None:
        if name in self.pipe.force:
            self._redone.add(path)

    def _remove_baseline_temporaries(self, name: str) -> None:
        """Delete what killed writes of a baseline's files left (its training and images clean up themselves)."""
        if is_main_process():
            folder = self.baseline_dir(name)
            files = ("report.json", "report.md", "godin.json", "generalization.json", "classifier.pt", "dcgan.pt")
            self.pipe.remove_temporaries([folder / file for file in files])

    def _scratch_recipe(self) -> TrainingConfig:
        """The loop settings of a model trained from scratch: the pre-training recipe when the run fine-tunes."""
        cfg = self.pipe.config.training
        epochs, lr = (cfg.pretrain_epochs, cfg.pretrain_lr) if cfg.pretrain_epochs > 0 else (cfg.epochs, cfg.lr)
        return replace(cfg.loop(), epochs=epochs, lr=lr)

    def _baseline_classifier(self, name: str) -> nn.Module:
        """Train a baseline's classifier, or load it from ``baselines/<name>/classifier.pt``."""
        folder = self.baseline_dir(name)
        path = folder / "classifier.pt"
        self._remove_baseline_temporaries(name)
        model: nn.Module = self._new_godin() if name == "godin" else self.pipe.new_classifier()
        if self._baseline_done(name, path):
            logger.info("[baseline %s] classifier loaded from %s", name, path)
            model.load_state_dict(saved_weights(path))
            return model.to(self.pipe.device).eval()
        from dreamood.baselines import GodinClassifier, UniformKLRegularizer, train_godin
        from dreamood.training import train_classifier

        gan = self._new_gan() if name == "gan" else None  # checks the image size before anything is trained

        cfg = self.pipe.config.training
        recipe = self._scratch_recipe()
        # Every baseline trains with the shared loop, so a killed run resumes from its last per-epoch checkpoint
        # in training/ (for the GAN baseline that checkpoint holds the GAN as well).
        where = self.pipe.training_run(
            folder / "training", resume=name not in self.pipe.force, fingerprint=self.fingerprint(name)
        )
        id_loader = self.pipe.loader(self.pipe.data.train, cfg.batch_size, shuffle=True)
        logger.info("[baseline %s] training for %d epochs", name, recipe.epochs)
        start = time.perf_counter()
        seed_global_rngs(self.pipe.config.seed)  # the image augmentations draw from the global generators
        if isinstance(model, GodinClassifier):
            train_godin(model, id_loader, recipe, **where)
        elif gan is not None:
            real_loader = self.pipe.loader(
                self.pipe.data.train, cfg.batch_size, shuffle=True, seed=self.pipe.config.seed + 1
            )
            outliers = gan.outlier_loader(real_loader, model)
            train_classifier(
                model,
                id_loader,
                replace(recipe, beta=gan.beta),
                outlier_loader=outliers,
                regularizer=UniformKLRegularizer(),
                extra_state={"gan": outliers},
                **where,
            )
            if is_main_process():
                save_checkpoint(folder / "dcgan.pt", {"model": gan.state_dict()})
        elif name == "cross-entropy":
            train_classifier(model, id_loader, recipe, **where)
        else:
            extra = self.pipe.loader(self._appended_images(name), cfg.outlier_batch_size, shuffle=True)
            train_classifier(model, id_loader, recipe, synthetic_id_loader=extra, **where)
        if is_main_process():
            save_checkpoint(path, {"model": model.state_dict()})
        barrier()
        self._mark_redone(name, path)
        logger.info("[baseline %s] trained in %.1f s: %s", name, time.perf_counter() - start, path)
        return model.eval()

    def _appended_images(self, name: str) -> Dataset[Any]:
        """The labelled images a generalisation baseline appends: augmented copies or generic-prompt images."""
        from dreamood.data.generated import GeneratedImageFolder

        per_class = self.pipe.config.generation.images_per_class
        if name == "generic-prompts":
            from dreamood.baselines import generate_generic_prompt_images

            cfg = self.pipe.config.generation
            folder = self.baseline_dir(name) / "images"
            decoder = self.pipe.decoder(self.pipe.device)
            generate_generic_prompt_images(
                decoder,  # type: ignore[arg-type]
                folder,
                per_class,
                batch_size=cfg.batch_size,
                seed=self.pipe.config.seed,
                show_progress=self.pipe.config.progress,
                overwrite=name in self.pipe.force,
            )
            return GeneratedImageFolder(folder, transform=self.pipe.data.generated_transform)
        from dreamood.baselines import AugmentedPool

        if self.pipe.data.raw_train is None:
            raise ValueError(
                f"the {name} baseline augments the raw ID training images, but PipelineData.raw_train is None"
            )
        return AugmentedPool(
            self.pipe.data.raw_train,
            name,
            num_per_class=per_class,
            num_classes=len(self.pipe.class_names),
            seed=self.pipe.config.seed,
            transform=_AfterAugmentation(self.pipe.data.generated_transform),
        )

    def _godin_validation_loader(self) -> DataLoader[Any]:
        """A seeded random subset of the ID training images without augmentation, for GODIN's epsilon."""
        from torch.utils.data import Subset

        count = min(self.settings.godin_validation_images, len(self.pipe.data.bank))  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.pipe.config.seed)
        indices = torch.randperm(len(self.pipe.data.bank), generator=generator)[:count].tolist()  # type: ignore[arg-type]
        return self.pipe.loader(
            Subset(self.pipe.data.bank, indices), self.pipe.config.evaluation.batch_size, shuffle=False
        )

    def _new_godin(self) -> GodinClassifier:
        from dreamood.baselines import GodinClassifier

        with self.pipe.seeded_init():
            cfg = self.pipe.config.training
            backbone = self.pipe.backbone_factory(cfg.backbone, cfg.stem)
            return GodinClassifier(backbone, len(self.pipe.class_names), similarity=self.settings.godin_similarity)

    def _new_gan(self) -> ConfidenceGAN:
        from dreamood.baselines import ConfidenceGAN

        size = image_size_of(self.pipe.config)
        if size < 8 or size & (size - 1):
            raise ValueError(
                f"the GAN baseline's DCGAN makes square images of a power-of-two side (32 for CIFAR); the ID images "
                f"are {size}x{size}: set data.image_size to a power of two or leave this baseline out"
            )
        mean, std = normalization_of(self.pipe.config.benchmark)
        return ConfidenceGAN(
            size,
            3,
            generator_width=self.settings.gan_width,
            discriminator_width=self.settings.gan_width,
            beta=self.settings.gan_beta,
            mean=mean,
            std=std,
            seed=self.pipe.config.seed,
            device=self.pipe.device,
        )

    def _memo(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        from dreamood.baselines import MEMO, augmentation_transform

        mean, std = normalization_of(self.pipe.config.benchmark)
        return MEMO(
            model,
            _PixelSpace(augmentation_transform("augmix"), mean, std),
            num_augmentations=self.settings.memo_augmentations,
            lr=self.settings.memo_lr,
            prior_strength=self.settings.memo_prior_strength,
            seed=self.pipe.config.seed,
            device=self.pipe.device,
            progress=self.pipe.config.progress,
        )


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
