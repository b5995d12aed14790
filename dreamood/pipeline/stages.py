"""The stages of a run: one record each, saying what it makes, from which stages, and how.

A :class:`Stage` names its artefact, the stages whose results it takes, the configuration keys its result
depends on, and three functions: ``make`` (compute the result and write the artefact), ``load`` (read the
artefact back) and ``summary`` (one line on a result). :class:`~dreamood.pipeline.Pipeline` runs the records of
:data:`STAGES` in order and owns everything around them (skipping, forcing, resuming, timings, temporaries); the
``dreamood`` command asks the records for its subcommands. A new stage is one record and one ``make`` function.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn

from dreamood.io import atomic_write, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.encoder import TextConditionedEncoder
    from dreamood.evaluation import OODReport
    from dreamood.feature_bank import FeatureBank
    from dreamood.models import Classifier
    from dreamood.pipeline.runner import Pipeline
    from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "ANCHORS",
    "BANK",
    "CLASSIFIER",
    "ENCODER",
    "IMAGES",
    "REPORT",
    "SAMPLES",
    "STAGES",
    "Stage",
    "stage_named",
]

T = TypeVar("T")

# The file generate_images writes once every image of the folder exists.
MANIFEST = "manifest.jsonl"
# What save_pretrained writes: the encoder and the classifier of a run load with from_pretrained("run/<stage>").
PRETRAINED_FILES = ("config.json", "model.safetensors", "README.md")


@dataclass(frozen=True)
class Stage(Generic[T]):
    """One stage of a run: its artefact, its inputs, the settings it depends on, and how to make and read it.

    Attributes:
        name: The stage's name, as ``force`` and ``dreamood run --force`` take it.
        artifact: Its artefact, relative to the output folder.
        inputs: The stages whose results ``make`` takes after the pipeline, in that order.
        command: The ``dreamood`` subcommand that runs it.
        help: What it does, in one line.
        make: ``make(pipeline, *input_results)`` computes the result and writes the artefact.
        load: ``load(pipeline, path)`` reads the artefact at ``path`` back.
        summary: One line describing a result.
        settings: The configuration keys the result depends on (dotted; a section name covers the section).
        files: The files it writes atomically, relative to the output folder (their temporaries are removed
            before it runs); empty: the artefact, with its JSON sidecar for a ``.safetensors`` file.
        marker: The file whose existence marks the stage done, relative to the output folder; ``None``: the
            artefact.
        distributed: Whether the stage may run under ``torchrun`` with several processes.
        workdirs: Folders (relative to the output folder) holding the stage's resumable state, such as per-epoch
            checkpoints; they are deleted when the stage starts afresh (forced, or redone because its settings
            or inputs changed), so it never resumes from the state of another run.
        component: The :class:`~dreamood.pipeline.Pipeline` component the stage uses (``"anchor_source"``,
            ``"sampler"``, ``"decoder_factory"`` or ``"backbone_factory"``), whose class enters its fingerprint.
    """

    name: str
    artifact: str
    inputs: tuple[str, ...]
    command: str
    help: str
    make: Callable[..., T]
    load: Callable[[Pipeline, Path], T]
    summary: Callable[[T], str]
    settings: tuple[str, ...] = ()
    files: tuple[str, ...] = field(default=())
    marker: str | None = None
    distributed: bool = False
    workdirs: tuple[str, ...] = ()
    component: str | None = None

    def written_files(self) -> tuple[str, ...]:
        """The files the stage writes atomically, relative to the output folder."""
        if self.files:
            return self.files
        if self.artifact.endswith(".safetensors"):
            return (self.artifact, self.artifact[: -len(".safetensors")] + ".json")
        return (self.artifact,)

    def done_marker(self) -> str:
        """The file whose existence marks the stage done, relative to the output folder."""
        return self.marker or self.artifact


# ---- helpers the stages share ------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0 under ``torchrun``, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of a ``torchrun`` run (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators, which random image transforms draw from."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def saved_weights(path: Path) -> dict[str, Any]:
    """The ``"model"`` state dict of a checkpoint written by a stage or a baseline.

    Raises:
        ArtifactError: The checkpoint holds no ``"model"`` state dict.
    """
    from dreamood.errors import ArtifactError

    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise ArtifactError(f"{path} holds no 'model' state dict; it was not written by the pipeline")
    weights: dict[str, Any] = state["model"]
    return weights


# ---- anchors -----------------------------------------------------------------------------------------------


def _make_anchors(pipe: Pipeline) -> TokenEmbeddings:
    anchors = pipe.anchor_source(pipe.class_names)
    anchors.save(pipe.path(ANCHORS))
    return anchors


def _load_anchors(pipe: Pipeline, path: Path) -> TokenEmbeddings:
    from dreamood.anchors import TokenEmbeddings

    return TokenEmbeddings.load(path)


ANCHORS: Stage[TokenEmbeddings] = Stage(
    name="anchors",
    artifact="anchors.safetensors",
    inputs=(),
    command="anchors",
    help="take the class anchors T(y) from the text encoder's token-embedding table",
    make=_make_anchors,
    load=_load_anchors,
    summary=lambda anchors: f"anchors: {anchors.num_classes} classes, dimension {anchors.dim}",
    settings=("anchors", "data.class_names", "benchmark"),
    component="anchor_source",
)


# ---- Phase 1: encoder and feature bank ---------------------------------------------------------------------


def _make_encoder(pipe: Pipeline, anchors: TokenEmbeddings) -> TextConditionedEncoder:
    from dreamood.encoder import fit_encoder

    cfg = pipe.config.encoder
    pipe.check_anchors(anchors)  # before any training: the anchors must fit the decoder of the images stage
    encoder = pipe.new_encoder(anchors)
    fit_encoder(
        encoder,
        pipe.loader(pipe.data.train, cfg.batch_size, shuffle=True),
        cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        device=pipe.device,
        amp_dtype=cfg.amp,
        checkpoint_dir=pipe.output_dir / "encoder",
        resume=not pipe.starts_afresh(ENCODER),
        show_progress=pipe.config.progress,
        seed=pipe.config.seed,
        fingerprint=pipe.fingerprint(ENCODER),
    )
    save_checkpoint(pipe.path(ENCODER), {"model": encoder.state_dict()})
    encoder.save_pretrained(pipe.output_dir / "encoder")  # TextConditionedEncoder.from_pretrained("run/encoder")
    return encoder


def _load_encoder(pipe: Pipeline, path: Path) -> TextConditionedEncoder:
    encoder = pipe.new_encoder(pipe.load(ANCHORS))
    encoder.load_state_dict(saved_weights(path))
    return encoder.eval()


ENCODER: Stage[TextConditionedEncoder] = Stage(
    name="encoder",
    artifact="encoder.pt",
    inputs=("anchors",),
    command="fit-encoder",
    help="Phase 1: train the text-conditioned encoder and build the feature bank",
    make=_make_encoder,
    load=_load_encoder,
    summary=lambda encoder: f"encoder: {type(encoder.backbone).__name__} -> {encoder.embedding_dim}-d embeddings",
    settings=("encoder", "data", "seed", "benchmark"),
    files=("encoder.pt", *(f"encoder/{name}" for name in PRETRAINED_FILES)),
    workdirs=("encoder",),
    component="backbone_factory",
)


def _make_bank(pipe: Pipeline, encoder: TextConditionedEncoder) -> FeatureBank:
    from dreamood.feature_bank import FeatureBank

    cfg = pipe.config.bank
    images = pipe.data.train if cfg.augment else pipe.data.bank  # augmented: the authors' bank
    if cfg.augment:
        seed_global_rngs(pipe.config.seed)  # the augmentations draw from the global generators
    bank = FeatureBank.from_encoder(
        encoder,
        pipe.loader(images, cfg.batch_size, shuffle=cfg.shuffle),
        num_classes=len(pipe.class_names),
        max_per_class=cfg.per_class,
        device=pipe.device,
        show_progress=pipe.config.progress,
    )
    bank.save(pipe.path(BANK))
    return bank


def _load_bank(pipe: Pipeline, path: Path) -> FeatureBank:
    from dreamood.feature_bank import FeatureBank

    return FeatureBank.load(path)


BANK: Stage[FeatureBank] = Stage(
    name="bank",
    artifact="feature_bank.safetensors",
    inputs=("encoder",),
    command="fit-encoder",
    help="Phase 1: train the text-conditioned encoder and build the feature bank",
    make=_make_bank,
    load=_load_bank,
    summary=lambda bank: f"feature bank: {len(bank)} embeddings of {bank.num_classes} classes",
    settings=("bank", "data", "benchmark"),
)


# ---- Phase 2: samples --------------------------------------------------------------------------------------


def _make_samples(pipe: Pipeline, bank: FeatureBank, anchors: TokenEmbeddings) -> EmbeddingSamples:
    samples = pipe.sampler.sample(bank, anchors, pipe.config.sampler.num_per_class)
    samples.save(pipe.path(SAMPLES))
    return samples


def _load_samples(pipe: Pipeline, path: Path) -> EmbeddingSamples:
    from dreamood.sampling.samples import EmbeddingSamples

    return EmbeddingSamples.load(path)


SAMPLES: Stage[EmbeddingSamples] = Stage(
    name="samples",
    artifact="samples.safetensors",
    inputs=("bank", "anchors"),
    command="sample",
    help="Phase 2: sample outlier (DREAM-ID: inlier) embeddings at the class boundaries",
    make=_make_samples,
    load=_load_samples,
    summary=lambda samples: f"samples: {len(samples)} embeddings ({samples.config.get('mode', 'outlier')} mode)",
    settings=("sampler", "method", "seed"),
    component="sampler",
)


# ---- decoding ----------------------------------------------------------------------------------------------


def _make_images(pipe: Pipeline, samples: EmbeddingSamples) -> Path:
    from dreamood.decoding.generation import generate_images

    cfg = pipe.config.generation
    device = pipe.device
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    generate_images(
        pipe.decoder(device),
        samples,
        pipe.path(IMAGES),
        cfg.images_per_class,
        batch_size=cfg.batch_size,
        seed=pipe.config.seed,
        show_progress=pipe.config.progress,
        overwrite=pipe.starts_afresh(IMAGES),
        writer_threads=cfg.writer_threads,
    )
    return pipe.path(IMAGES)


IMAGES: Stage[Path] = Stage(
    name="images",
    artifact="images",
    inputs=("samples",),
    command="generate",
    help="render the sampled embeddings with Stable Diffusion (torchrun: split over processes)",
    make=_make_images,
    load=lambda pipe, path: path,
    summary=lambda folder: f"images: {folder}",
    settings=("generation", "seed"),
    files=(f"images/{MANIFEST}",),
    marker=f"images/{MANIFEST}",  # generate_images writes the manifest once every image exists
    distributed=True,
    workdirs=("images",),
    component="decoder_factory",
)


# ---- Phase 3: classifier -----------------------------------------------------------------------------------


def _make_classifier(pipe: Pipeline, images: Path) -> Classifier:
    from dreamood.data.generated import GeneratedImageFolder
    from dreamood.training import train_classifier

    cfg = pipe.config.training
    _check_images(pipe, images)
    generated = GeneratedImageFolder(images, transform=pipe.data.generated_transform)
    model = pipe.new_classifier()
    id_loader = pipe.loader(pipe.data.train, cfg.batch_size, shuffle=True)
    generated_loader = pipe.loader(generated, cfg.outlier_batch_size, shuffle=True)
    seed_global_rngs(pipe.config.seed)  # the image augmentations draw from the global generators
    init = cfg.init_checkpoint
    if init is None and cfg.pretrain_epochs > 0:
        init = str(_pretrained(pipe, id_loader))
    where = pipe.training_run(
        pipe.output_dir / "classifier",
        resume=not pipe.starts_afresh(CLASSIFIER),
        fingerprint=pipe.fingerprint(CLASSIFIER),
    )
    if pipe.config.method == "dream-ood":
        regularizer = _outlier_loss(pipe)
        train_classifier(
            model, id_loader, cfg, outlier_loader=generated_loader, regularizer=regularizer, init_checkpoint=init,
            **where,
        )  # fmt: skip
    else:
        train_classifier(model, id_loader, cfg, synthetic_id_loader=generated_loader, init_checkpoint=init, **where)
    if is_main_process():
        save_checkpoint(pipe.path(CLASSIFIER), {"model": model.state_dict()})
        model.save_pretrained(pipe.output_dir / "classifier")  # Classifier.from_pretrained("run/classifier")
    barrier()
    return model.eval()


def _outlier_loss(pipe: Pipeline) -> nn.Module:
    """The regulariser of ``training.loss``: the energy loss (paper Eq. 7), outlier exposure, or K+1 classes."""
    from dreamood.training import EnergyOODRegularizer
    from dreamood.training.regularizer import OutlierClassLoss, OutlierExposureLoss

    cfg = pipe.config.training
    if cfg.loss == "oe":
        return OutlierExposureLoss()
    if cfg.loss == "outlier-class":
        return OutlierClassLoss(len(pipe.class_names) + 1)
    return EnergyOODRegularizer(cfg.head, cfg.hidden_dim, cfg.energy_temperature, temperature_form=cfg.temperature_form)


def _check_images(pipe: Pipeline, folder: Path) -> None:
    """Refuse to train on a generated folder that does not hold what its manifest and the configuration say."""
    from dreamood.errors import ArtifactError
    from dreamood.pipeline.verify import check_generated_folder

    problems = check_generated_folder(
        folder,
        images_per_class=pipe.config.generation.images_per_class,
        num_classes=len(pipe.class_names),
    )
    if problems:
        more = f" (and {len(problems) - 3} more problems; `dreamood verify` lists them)" if len(problems) > 3 else ""
        raise ArtifactError(
            f"the generated images in {folder} are not what the images stage made: {'; '.join(problems[:3])}{more}. "
            "Redo that stage (force images)"
        )


def _pretrained(pipe: Pipeline, id_loader: Any) -> Path:
    """A cross-entropy classifier to start Phase 3 from (the paper's ImageNet-100 recipe), trained once.

    ``pretrained.json`` records the fingerprint of the classifier stage's settings it was made from (it reads
    no generated image): a pre-training made from other settings is deleted and trained again.
    """
    import json
    import logging
    import shutil

    from dreamood.training import train_classifier

    logger = logging.getLogger("dreamood.pipeline")
    path, record = pipe.output_dir / "pretrained.pt", pipe.output_dir / "pretrained.json"
    fingerprint = pipe.settings_fingerprint(CLASSIFIER)
    if is_main_process():
        pipe.remove_temporaries([path, record])
    recorded = json.loads(record.read_text()).get("fingerprint") if record.is_file() else None
    if path.is_file() and recorded == fingerprint:
        logger.info("[classifier] cross-entropy pre-training skipped: %s exists", path)
        return path
    if recorded != fingerprint and is_main_process():  # made from other settings, or by an older dreamood
        path.unlink(missing_ok=True)
        shutil.rmtree(pipe.output_dir / "pretrain", ignore_errors=True)
        with atomic_write(record, "w") as handle:
            json.dump({"fingerprint": fingerprint}, handle)
    barrier()
    cfg = pipe.config.training
    logger.info("[classifier] cross-entropy pre-training for %d epochs", cfg.pretrain_epochs)
    seed_global_rngs(pipe.config.seed)
    model = pipe.new_classifier()
    recipe = replace(cfg.loop(), epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, beta=0.0)
    where = pipe.training_run(pipe.output_dir / "pretrain", resume=True, fingerprint=fingerprint)
    train_classifier(model, id_loader, recipe, **where)
    if is_main_process():
        save_checkpoint(path, model.state_dict())
    barrier()  # under torchrun, every process then reads the file rank 0 wrote
    return path


def _load_classifier(pipe: Pipeline, path: Path) -> Classifier:
    model = pipe.new_classifier()
    model.load_state_dict(saved_weights(path))
    return model.eval()


CLASSIFIER: Stage[Classifier] = Stage(
    name="classifier",
    artifact="classifier.pt",
    inputs=("images",),
    command="train",
    help="Phase 3: train the classifier with the generated images (torchrun: data parallel)",
    make=_make_classifier,
    load=_load_classifier,
    summary=lambda model: f"classifier: {type(model.backbone).__name__}, {model.num_classes} classes",
    settings=("training", "method", "data", "seed", "benchmark"),
    files=("classifier.pt", *(f"classifier/{name}" for name in PRETRAINED_FILES)),
    distributed=True,
    workdirs=("classifier",),
    component="backbone_factory",
)


# ---- evaluation --------------------------------------------------------------------------------------------


def _make_report(pipe: Pipeline, model: nn.Module) -> OODReport:
    from dreamood.evaluation import OODEvaluator, energy_score, outlier_class_score

    cfg, training = pipe.config.evaluation, pipe.config.training
    outlier_class = training.loss == "outlier-class"
    scorer = (
        partial(outlier_class_score)
        if outlier_class
        else partial(energy_score, temperature=training.energy_temperature, form=training.temperature_form)
    )
    evaluator = OODEvaluator(
        scorer,
        model=model.to(pipe.device),
        protocol=cfg.protocol,
        repeats=cfg.repeats,
        seed=pipe.config.seed,
        device=pipe.device,
        progress=pipe.config.progress,
        accuracy=not outlier_class,
        sample_size=cfg.ood_subsample,
        fpr_rule=cfg.fpr_rule,  # type: ignore[arg-type]
        aupr_trapezoid=cfg.aupr_trapezoid,
    )
    ood = {name: pipe.loader(dataset, cfg.batch_size, shuffle=False) for name, dataset in pipe.data.ood.items()}
    test_loader = pipe.loader(pipe.data.test, cfg.batch_size, shuffle=False)
    report = evaluator.evaluate(test_loader, ood)
    if outlier_class:  # the ID accuracy over the K classes, without the outlier class
        from dreamood.baselines import classification_accuracy

        classes = len(pipe.class_names)
        accuracy = classification_accuracy(
            lambda images: model(images)[:, :classes], test_loader, device=pipe.device, progress_bar=False
        )
        report = replace(report, id_accuracy=accuracy)
    with atomic_write(pipe.output_dir / "report.md", "w") as handle:
        handle.write(report.to_markdown() + "\n")
    report.to_json(pipe.path(REPORT))  # last: its existence marks the stage done
    return report


def _load_report(pipe: Pipeline, path: Path) -> OODReport:
    from dreamood.evaluation import OODReport

    return OODReport.from_json(path)


REPORT: Stage[OODReport] = Stage(
    name="report",
    artifact="report.json",
    inputs=("classifier",),
    command="evaluate",
    help="FPR95, AUROC, AUPR and ID accuracy of the trained classifier on the OOD test sets",
    make=_make_report,
    load=_load_report,
    summary=str,
    settings=("evaluation", "training.energy_temperature", "data", "seed", "benchmark"),
    files=("report.json", "report.md", "generalization.json"),
)


#: The stages of a run, in order.
STAGES: tuple[Stage[Any], ...] = (ANCHORS, ENCODER, BANK, SAMPLES, IMAGES, CLASSIFIER, REPORT)


def stage_named(name: str) -> Stage[Any]:
    """The stage called ``name``.

    Args:
        name: A stage name (``"anchors"``, ``"encoder"``, ...).

    Returns:
        Its record in :data:`STAGES`.

    Raises:
        ValueError: No stage has that name.
    """
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"stage must be one of {', '.join(stage.name for stage in STAGES)}, got {name!r}")
