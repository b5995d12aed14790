"""The :class:`Pipeline`: runs the stage records of a configuration with swappable components."""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast, overload

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dreamood._utils import library_progress_bars, resolve_device
from dreamood._validation import check_choice
from dreamood.config import PipelineConfig
from dreamood.errors import ArtifactError, StaleArtifactError
from dreamood.io import atomic_write
from dreamood.pipeline.baselines import BASELINES, BaselineConfig, BaselineRunner
from dreamood.pipeline.components import (
    BackboneFactory,
    DecoderFactory,
    check_config_anchors,
    config_anchors,
    config_backbone_factory,
    config_decoder,
    config_sampler,
)
from dreamood.pipeline.data import PipelineData, build_data, class_names_of
from dreamood.pipeline.folder import RunFolder
from dreamood.pipeline.records import (
    StageRecord,
    StageStatus,
    changed_settings,
    fingerprint_of,
    settings_of,
)
from dreamood.pipeline.stages import (
    ANCHORS,
    BANK,
    CLASSIFIER,
    ENCODER,
    IMAGES,
    REPORT,
    SAMPLES,
    STAGES,
    Stage,
    barrier,
    is_main_process,
    stage_named,
)

if TYPE_CHECKING:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.encoder import TextConditionedEncoder
    from dreamood.evaluation import DetectorComparison, OODReport
    from dreamood.feature_bank import FeatureBank
    from dreamood.models import Classifier
    from dreamood.protocols import AnchorSource, EmbeddingDecoder, EmbeddingSampler
    from dreamood.sampling.samples import EmbeddingSamples

__all__ = ["BackboneFactory", "DecoderFactory", "Pipeline"]

logger = logging.getLogger("dreamood.pipeline")

T = TypeVar("T")


class TrainingRun(TypedDict):
    """The run-time keyword arguments of :func:`~dreamood.training.train_classifier` for one of a run's trainings."""

    device: str
    seed: int
    output_dir: Path
    resume: bool
    progress: bool
    fingerprint: str


# Where a custom component is said to come from in a fingerprint when none is given.
_FROM_CONFIG = "from the configuration"


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

    Each stage is a record of :data:`~dreamood.pipeline.STAGES`. A stage whose artefact exists in
    ``config.output_dir``, made from the same settings and inputs, loads it (verified against the digests
    recorded when it was written) instead of recomputing it; a stage whose settings or inputs changed is redone,
    and so is everything downstream of it (see :meth:`plan`). :meth:`load` reads a stage's artefact without
    running anything. While a stage runs, the process holds the run folder's lock, so a second process on the
    same folder stops with a clear error instead of mixing results. The components are taken the way a
    diffusers pipeline takes its modules: each defaults to what the configuration describes, and any object that
    fits the interface replaces it.

    Args:
        config: The run's configuration.
        data: The datasets; ``None`` builds them from ``config.data`` when a stage first needs them.
        anchor_source: Gives the class anchors T(y) for the class names (any
            :class:`~dreamood.protocols.AnchorSource`); ``None`` reads the rows of ``anchors.model``'s token
            table with :meth:`~dreamood.anchors.TokenEmbeddings.from_pretrained`.
        sampler: Draws the outlier (DREAM-ID: inlier) embeddings (any
            :class:`~dreamood.protocols.EmbeddingSampler`); ``None`` builds a
            :class:`~dreamood.sampling.knn_boundary.KNNBoundarySampler` from ``config.sampler``.
        decoder_factory: Builds the image decoder (any :class:`~dreamood.protocols.EmbeddingDecoder`) from the
            configuration and the class names; ``None`` loads Stable Diffusion (``generation.model``) with
            :meth:`~dreamood.decoding.stable_diffusion.StableDiffusionDecoder.from_pretrained`.
        backbone_factory: Builds the feature extractor of the encoder, the classifier and the baselines from the
            configuration's backbone name; ``None``: :func:`~dreamood.pipeline.build_backbone` with the 3x3 stem
            for small images.
        force: Stages to redo even when their artefact exists (names from :data:`~dreamood.pipeline.STAGES`),
            and baselines to redo, classifier included, even when their result exists (names from
            :data:`~dreamood.pipeline.BASELINES`). A forced baseline is redone once per ``Pipeline``.
        baselines: Settings of the baselines (``None``: the papers' :class:`~dreamood.pipeline.BaselineConfig`).
        on_change: What to do with a finished stage whose settings or inputs changed: ``"redo"`` it (and what
            follows), or ``"refuse"``: raise :class:`~dreamood.errors.StaleArtifactError` saying what changed.

    Attributes:
        config: The configuration.
        output_dir: Where the artefacts are written.
        folder: The output folder: its lock, records and bookkeeping files.
        device: The device stages run on.
        baselines: The baselines' settings.
        force: The names of the stages and baselines to redo.

    Raises:
        ValueError: A name in ``force`` is neither a stage nor a baseline, or ``on_change`` is unknown.
    """

    def __init__(
        self,
        config: PipelineConfig,
        data: PipelineData | None = None,
        *,
        anchor_source: AnchorSource | None = None,
        sampler: EmbeddingSampler | None = None,
        decoder_factory: DecoderFactory | None = None,
        backbone_factory: BackboneFactory | None = None,
        force: Sequence[str] = (),
        baselines: BaselineConfig | None = None,
        on_change: str = "redo",
    ) -> None:
        stage_names = [stage.name for stage in STAGES]
        unknown = [name for name in force if name not in stage_names and name not in BASELINES]
        if unknown:
            raise ValueError(
                f"force names unknown stages or baselines {unknown}; the stages are {', '.join(stage_names)}, the "
                f"baselines {', '.join(BASELINES)}"
            )
        check_choice(on_change, ("redo", "refuse"), "on_change")
        self.config = config
        self.on_change = on_change
        self.output_dir = Path(config.output_dir).expanduser()
        self.device = resolve_device(config.device)
        self.force = frozenset(force)
        self.baselines = BaselineConfig() if baselines is None else baselines
        self._data = data
        self._data_given = data is not None
        self._anchor_source = anchor_source
        self._sampler = sampler
        self._default_sampler: EmbeddingSampler | None = None
        self._decoder_factory = decoder_factory
        self._backbone_factory = backbone_factory
        self._baseline_runner = BaselineRunner(self, self.baselines)
        self.folder = RunFolder(self.output_dir)
        self._fresh: set[str] = set()  # stages this object started afresh
        self._fingerprints: dict[str, str] = {}

    # ---- components -------------------------------------------------------------------------------------

    @property
    def has_given_data(self) -> bool:
        """Whether the datasets were passed in (rather than built from ``config.data``)."""
        return self._data_given

    @property
    def given_components(self) -> frozenset[str]:
        """The components passed in, by role (``"anchor_source"``, ``"sampler"``, ``"decoder_factory"``,
        ``"backbone_factory"``); the others follow the configuration."""
        roles = ("anchor_source", "sampler", "decoder_factory", "backbone_factory")
        return frozenset(role for role in roles if getattr(self, f"_{role}") is not None)

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

    @property
    def anchor_source(self) -> AnchorSource:
        """The component giving the class anchors: the one passed in, else the configuration's text encoder."""
        if self._anchor_source is None:
            return self._pretrained_anchors
        return self._anchor_source

    def _pretrained_anchors(self, class_names: Sequence[str]) -> TokenEmbeddings:
        return config_anchors(self.config, class_names)

    def check_anchors(self, anchors: TokenEmbeddings) -> None:
        """Check, before any training, that the anchors fit the decoder the run will use.

        With the configuration's Stable Diffusion decoder, the anchors' width and token ids must be those of
        ``generation.model``'s token table(s) (read from its JSON files, no weights loaded); a decoder factory
        passed in is trusted.

        Args:
            anchors: The class anchors.

        Raises:
            AnchorMismatchError: The anchors do not fit ``generation.model``.
        """
        if self._decoder_factory is None and self._anchor_source is None:
            check_config_anchors(self.config, anchors)

    @property
    def sampler(self) -> EmbeddingSampler:
        """The Phase 2 sampler: the one passed in, else the k-NN boundary sampler of ``config.sampler``."""
        if self._sampler is not None:
            return self._sampler
        if self._default_sampler is None:
            self._default_sampler = config_sampler(self.config, self.device)
        return self._default_sampler

    @property
    def backbone_factory(self) -> BackboneFactory:
        """Builds a backbone from a name and a stem: the factory passed in, else
        :func:`~dreamood.pipeline.build_backbone` (``"auto"`` takes the 3x3 stem for images up to 64 px)."""
        return self._backbone_factory or config_backbone_factory(self.config)

    def decoder(self, device: torch.device) -> EmbeddingDecoder:
        """The image decoder: the factory's, else Stable Diffusion from ``generation.model`` on ``device``.

        Args:
            device: Where Stable Diffusion runs (a factory places its decoder itself).

        Returns:
            The decoder.
        """
        with library_progress_bars(["transformers", "diffusers"], enabled=self.config.progress):
            if self._decoder_factory is not None:
                return self._decoder_factory(self.config, self.class_names)
            return config_decoder(self.config, self.class_names, device)

    @contextmanager
    def seeded_init(self) -> Iterator[None]:
        """Draw initial weights from the run's seed, leaving torch's global random state as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            yield

    def new_encoder(self, anchors: TokenEmbeddings) -> TextConditionedEncoder:
        """A freshly initialised text-conditioned encoder on the encoder's backbone (weights from the seed).

        Args:
            anchors: The class anchors it aligns with.

        Returns:
            The encoder.
        """
        from dreamood.encoder import TextConditionedEncoder
        from dreamood.models.classifier import resolve_feature_dim

        cfg = self.config.encoder
        with self.seeded_init():  # every initial weight, the projection's too, from the seed
            backbone = self.backbone_factory(cfg.backbone, cfg.stem)
            return TextConditionedEncoder(backbone, resolve_feature_dim(backbone, None), anchors, cfg.temperature)

    def new_classifier(self) -> Classifier:
        """A freshly initialised classifier on the training backbone (weights from the seed).

        Returns:
            The classifier: one output per class, and one more for the outlier class when ``training.loss`` is
            ``"outlier-class"``.
        """
        from dreamood.models import Classifier

        cfg = self.config.training
        outputs = len(self.class_names) + (cfg.loss == "outlier-class")
        with self.seeded_init():  # every initial weight, the head's too, from the seed
            return Classifier(self.backbone_factory(cfg.backbone, cfg.stem), outputs)

    def training_run(self, output_dir: Path, *, resume: bool, fingerprint: str) -> TrainingRun:
        """The run-time arguments of :func:`~dreamood.training.train_classifier` for a training of this run.

        Args:
            output_dir: The folder of its checkpoints.
            resume: Continue from the checkpoint there.
            fingerprint: What the training is made from (a checkpoint of another fingerprint is not resumed).

        Returns:
            ``device``, ``seed``, ``output_dir``, ``resume``, ``progress`` and ``fingerprint``, to pass as keywords.
        """
        return {
            "device": self.config.device,
            "seed": self.config.seed,
            "output_dir": output_dir,
            "resume": resume,
            "progress": self.config.progress,
            "fingerprint": fingerprint,
        }

    def loader(
        self, dataset: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int | None = None
    ) -> DataLoader[Any]:
        """A loader of ``dataset`` with the run's workers; shuffled by a generator seeded with ``seed``.

        Args:
            dataset: What to load.
            batch_size: Samples per batch.
            shuffle: Shuffle every epoch.
            seed: Seed of the shuffling (default: the run's seed).

        Returns:
            The loader.
        """
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.config.data.num_workers,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    # ---- the runner -------------------------------------------------------------------------------------

    def path(self, stage: str | Stage[Any]) -> Path:
        """The artefact of ``stage``.

        Args:
            stage: A stage record or name from :data:`~dreamood.pipeline.STAGES`.

        Returns:
            Its path inside the output folder.

        Raises:
            ValueError: ``stage`` names no stage.
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        return self.output_dir / record.artifact

    def is_forced(self, stage: Stage[Any]) -> bool:
        """Whether ``stage`` is to be redone even when its artefact exists."""
        return stage.name in self.force

    def starts_afresh(self, stage: Stage[Any]) -> bool:
        """Whether ``stage`` runs from nothing (forced, or redone after a change) rather than resuming."""
        return stage.name in self._fresh

    def is_done(self, stage: str | Stage[Any]) -> bool:
        """Whether ``stage`` is finished and current: its artefact exists and was made from the same settings and
        inputs as this run's (for ``images``: the generation completed).

        Args:
            stage: A stage record or name.

        Returns:
            ``True`` when the stage would be skipped (unless forced).
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        saved = StageRecord.read(self.output_dir, record.name)
        return (
            saved is not None
            and saved.status == "done"
            and saved.fingerprint == self.fingerprint(record)
            and self._artifact_exists(record)
        )

    def _artifact_exists(self, stage: Stage[Any]) -> bool:
        return (self.output_dir / stage.done_marker()).exists()

    # ---- fingerprints -----------------------------------------------------------------------------------

    def components_of(self, stage: Stage[Any]) -> dict[str, str]:
        """The component ``stage`` uses, by role, as its fingerprint names it (``"from the configuration"`` when
        none was passed in, else the class or function's qualified name).

        Args:
            stage: A stage record.

        Returns:
            ``{role: description}``; empty for a stage that uses no component.
        """
        return self._components(stage)

    def _components(self, stage: Stage[Any]) -> dict[str, str]:
        if stage.component is None:
            return {}
        given = getattr(self, f"_{stage.component}")
        if given is None:
            return {stage.component: _FROM_CONFIG}
        kind = given if inspect.isroutine(given) or inspect.isclass(given) else type(given)
        return {stage.component: f"{kind.__module__}.{kind.__qualname__}"}

    def _settings(self, stage: Stage[Any]) -> dict[str, Any]:
        settings = settings_of(self.config.to_dict(), stage.settings)
        if any(key.startswith("data.") for key in settings):
            settings["class names"] = self.class_names  # the bundled lists count, not only an explicit one
        return settings

    def fingerprint(self, stage: str | Stage[Any]) -> str:
        """The SHA-256 identifying what ``stage`` makes: its settings, its component and its inputs' fingerprints.

        Args:
            stage: A stage record or name.

        Returns:
            The hexadecimal fingerprint; it changes whenever a setting the stage or any stage before it
            depends on changes.
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        if record.name not in self._fingerprints:  # the configuration and components never change
            inputs = {name: self.fingerprint(name) for name in record.inputs}
            settings = self._settings(record)
            self._fingerprints[record.name] = fingerprint_of(record.name, settings, self._components(record), inputs)
        return self._fingerprints[record.name]

    def settings_fingerprint(self, stage: str | Stage[Any]) -> str:
        """The SHA-256 of ``stage``'s own settings and component, without its inputs.

        Args:
            stage: A stage record or name.

        Returns:
            The hexadecimal fingerprint (what a part of the stage that reads none of its inputs depends on).
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        return fingerprint_of(record.name, self._settings(record), self._components(record), {})

    def status(self, stage: str | Stage[Any]) -> StageStatus:
        """What :meth:`run` will do with ``stage``, and why.

        Args:
            stage: A stage record or name.

        Returns:
            The stage's :class:`~dreamood.pipeline.records.StageStatus`.

        Raises:
            ArtifactError: The stage's record in ``stages/`` is unreadable.
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        if self.is_forced(record):
            return StageStatus(record.name, "forced", "named in force")
        saved = StageRecord.read(self.output_dir, record.name)
        if saved is None:
            if self._artifact_exists(record):
                return StageStatus(record.name, "to do", "its artefact has no stage record (older dreamood)")
            return StageStatus(record.name, "to do", "not made yet")
        if saved.fingerprint != self.fingerprint(record):
            return StageStatus(record.name, "redo", self._what_changed(record, saved))
        if saved.status == "running":
            return StageStatus(record.name, "resume", "interrupted: continues from its checkpoints")
        if not self._artifact_exists(record):
            return StageStatus(record.name, "to do", f"its artefact {record.done_marker()} is missing")
        return StageStatus(record.name, "done", "made from the same settings and inputs")

    def _what_changed(self, stage: Stage[Any], saved: StageRecord) -> str:
        reasons = [f"{key} changed" for key in changed_settings(saved.settings, self._settings(stage))]
        components = self._components(stage)
        reasons += [f"{name} changed" for name in components if saved.components.get(name) != components[name]]
        reasons += [
            f"input {name} changed" for name in stage.inputs if saved.inputs.get(name) != self.fingerprint(name)
        ]
        return ", ".join(reasons) or "made by another version of its stage"

    def plan(self) -> list[StageStatus]:
        """What :meth:`run` will do with every stage: reuse, make, resume, redo (with the reason) or force.

        A stage after one that runs is redone too when its input changes; the plan says so only once the
        earlier stage has run, so it lists the first cause of every redo.

        Returns:
            One status per stage of :data:`~dreamood.pipeline.STAGES`, in order.
        """
        statuses: list[StageStatus] = []
        running: set[str] = set()
        for stage in STAGES:
            status = self.status(stage)
            if status.state == "done" and running & set(stage.inputs):
                upstream = ", ".join(sorted(running & set(stage.inputs)))
                status = StageStatus(stage.name, "redo", f"after {upstream}, which runs")
            if status.runs:
                running.add(stage.name)
            statuses.append(status)
        return statuses

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder's lock (re-entrant; only rank 0 of a ``torchrun`` run takes it).

        Raises:
            RunFolderLockedError: Another process holds the lock.
        """
        with self.folder.locked():
            yield

    def remove_temporaries(self, paths: Sequence[Path]) -> None:
        """Delete the temporary files that a process killed while writing ``paths`` left behind.

        Args:
            paths: The files whose temporaries to delete.
        """
        self.folder.remove_temporaries(paths)

    def execute(self, stage: Stage[T], *inputs: Any) -> T:
        """Run one stage on its inputs' results, or load its artefact when it is done, current and not forced.

        Holds the run folder's lock. A stage that starts afresh (forced, or redone because its settings or inputs
        changed) first deletes its work folders, so it never resumes from another run's checkpoints. The stage
        record is written when the stage starts (``running``) and when it ends (``done``, with the digests of
        its files).

        Args:
            stage: The stage record.
            *inputs: The results of the stages named in ``stage.inputs``, in that order.

        Returns:
            The stage's result.

        Raises:
            StaleArtifactError: With ``on_change="refuse"``, the stage's settings or inputs changed.
            RunFolderLockedError: Another process holds the run folder's lock.
        """
        with self.locked():
            status = self.status(stage)
            barrier()  # under torchrun every process reads the status before rank 0 changes anything
            if is_main_process():  # only rank 0 writes the stages' files
                self.remove_temporaries([self.output_dir / name for name in stage.written_files()])
            if status.state == "done":
                logger.info("[%s] skipped: %s exists", stage.name, self.path(stage))
                return self.load(stage)
            if status.state == "redo" and self.on_change == "refuse":
                raise StaleArtifactError(
                    f"the {stage.name} artefact {self.path(stage)} was made from other settings or inputs "
                    f"({status.reason}); run with on_change='redo' (dreamood run --on-change redo) to redo it and "
                    "what follows, or use another output folder"
                )
            logger.info("[%s] running (%s: %s)", stage.name, status.state, status.reason)
            if status.fresh:
                self._fresh.add(stage.name)
            if is_main_process():
                if status.fresh:
                    self.folder.delete_state(stage)
                self._write_record(stage, "running")
            barrier()
            start = time.perf_counter()
            result = stage.make(self, *inputs)
            seconds = time.perf_counter() - start
            if is_main_process():
                self._write_record(stage, "done")
                self.folder.record_time(stage.name, seconds)
            logger.info("[%s] done in %.1f s: %s", stage.name, seconds, self.path(stage))
            return result

    def _write_record(self, stage: Stage[Any], status: str) -> None:
        StageRecord(
            stage=stage.name,
            fingerprint=self.fingerprint(stage),
            status=status,
            settings=self._settings(stage),
            components=self._components(stage),
            inputs={name: self.fingerprint(name) for name in stage.inputs},
            files=self.folder.digests(stage) if status == "done" else {},
        ).write(self.output_dir)

    def verify(self, stage: str | Stage[Any]) -> list[str]:
        """Check a finished stage's files against the digests its record holds.

        Args:
            stage: A stage record or name.

        Returns:
            One line per problem (a file missing or changed since the stage wrote it); empty when none.

        Raises:
            ArtifactError: The stage's record is unreadable.
        """
        return self.folder.verify(stage_named(stage) if isinstance(stage, str) else stage)

    def run_stage(self, stage: str | Stage[T]) -> Any:
        """Run one stage, reading its inputs' artefacts from the output folder (what ``dreamood <stage>`` does).

        Args:
            stage: A stage record or name.

        Returns:
            The stage's result.

        Raises:
            FileNotFoundError: An input's artefact does not exist.
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        return self.execute(record, *(self.load(name) for name in record.inputs))

    @overload
    def load(self, stage: Stage[T]) -> T: ...

    @overload
    def load(self, stage: str) -> Any: ...

    def load(self, stage: str | Stage[Any]) -> Any:
        """Read the artefact of ``stage`` without running anything.

        Args:
            stage: A stage record (the result is typed by it) or a name from :data:`~dreamood.pipeline.STAGES`.

        Returns:
            ``TokenEmbeddings``, ``TextConditionedEncoder`` (eval mode), ``FeatureBank``, ``EmbeddingSamples``,
            the images folder, the ``Classifier`` (eval mode) or the ``OODReport``.

        Raises:
            FileNotFoundError: The artefact does not exist (the message names the command that makes it).
        """
        record = stage_named(stage) if isinstance(stage, str) else stage
        if not self._artifact_exists(record):
            raise FileNotFoundError(
                f"the {record.name} artefact {self.path(record)} does not exist: run its stage first "
                f"(`dreamood {record.command}` or `dreamood run`)"
            )
        problems = self.verify(record)
        if problems:
            raise ArtifactError(f"{'; '.join(problems)}: redo the stage (force {record.name}) or restore the file")
        return record.load(self, self.path(record))

    def write_config(self) -> Path:
        """Write the configuration to ``output_dir/config.json``, warning when it differs from the one there.

        Returns:
            The path written.
        """
        return self.folder.write_config(self.config.to_dict())

    # ---- the stages -------------------------------------------------------------------------------------

    def anchors(self) -> TokenEmbeddings:
        """Stage 1: the class anchors T(y), by default rows of the text encoder's input token-embedding table.

        Returns:
            The anchors, saved to ``anchors.safetensors``.
        """
        return self.execute(ANCHORS)

    def fit_encoder(self, anchors: TokenEmbeddings) -> TextConditionedEncoder:
        """Stage 2 (Phase 1): train the text-conditioned image encoder (paper Eq. 2).

        Resumes from ``encoder/encoder_checkpoint.pt`` (written after every epoch) unless forced.

        Args:
            anchors: The class anchors.

        Returns:
            The trained encoder in eval mode, saved to ``encoder.pt``.
        """
        return self.execute(ENCODER, anchors)

    def feature_bank(self, encoder: TextConditionedEncoder) -> FeatureBank:
        """Stage 3: the L2-normalised training embeddings of the encoder, ``bank.per_class`` per class.

        Args:
            encoder: The trained encoder.

        Returns:
            The bank, saved to ``feature_bank.safetensors``.
        """
        return self.execute(BANK, encoder)

    def sample(self, bank: FeatureBank, anchors: TokenEmbeddings) -> EmbeddingSamples:
        """Stage 4 (Phase 2): outlier embeddings around each class's low-density boundary (paper Eq. 5).

        With ``method = "dream-id"`` the default sampler works in inlier mode (densest anchors, smallest
        distances).

        Args:
            bank: The feature bank.
            anchors: The class anchors (the samples are rescaled to their norms).

        Returns:
            The samples, saved to ``samples.safetensors``.
        """
        return self.execute(SAMPLES, bank, anchors)

    def generate(self, samples: EmbeddingSamples) -> Path:
        """Stage 5: render the first ``generation.images_per_class`` samples of each class (paper Eq. 6).

        Args:
            samples: The sampled embeddings.

        Returns:
            The folder of generated images.
        """
        return self.execute(IMAGES, samples)

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
        return self.execute(CLASSIFIER, Path(images))

    def evaluate(self, model: nn.Module) -> OODReport:
        """Stage 7: FPR95, AUROC, AUPR of the negative energy and the ID accuracy, per OOD test set.

        Args:
            model: The trained classifier.

        Returns:
            The report, saved to ``report.json`` and ``report.md``.
        """
        return self.execute(REPORT, model)

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
        if not (self.is_forced(REPORT) or self.starts_afresh(REPORT)) and path.is_file():
            logger.info("[generalization] skipped: %s exists", path)
            return cast(dict[str, float], json.loads(path.read_text()))
        return self.accuracy_table(model.to(self.device), path, "generalization")

    def compare_detectors(self, model: nn.Module, detectors: str | Sequence[str] = "all") -> DetectorComparison:
        """Evaluate the trained classifier under post-hoc detectors on the run's ID and OOD test sets.

        The detectors are fitted on the ID training images without augmentation; the network's logits and
        features are computed once and shared (:func:`~dreamood.evaluation.evaluate_detectors`). The table is
        written to ``detectors/detectors.md`` and ``detectors/detectors.json``.

        Args:
            model: The trained classifier.
            detectors: ``"all"`` (every applicable detector; one that cannot run on this model or data is listed
                as skipped) or names from :data:`~dreamood.evaluation.DETECTORS`.

        Returns:
            The comparison.
        """
        from dreamood.evaluation import ModelParts, evaluate_detectors
        from dreamood.pipeline.data import normalization_of

        cfg = self.config.evaluation
        ood = {name: self.loader(dataset, cfg.batch_size, shuffle=False) for name, dataset in self.data.ood.items()}
        _, std = normalization_of(self.config.benchmark)
        return evaluate_detectors(
            model.to(self.device),
            self.loader(self.data.test, cfg.batch_size, shuffle=False),
            ood,
            fit_loader=self.loader(self.data.bank, cfg.batch_size, shuffle=False),
            detectors=detectors,
            parts=ModelParts.from_classifier(model, input_std=std),
            protocol=cfg.protocol,
            repeats=cfg.repeats,
            seed=self.config.seed,
            fpr_rule=cfg.fpr_rule,  # type: ignore[arg-type]
            aupr_trapezoid=cfg.aupr_trapezoid,
            device=self.device,
            progress_bar=self.config.progress,
            output_dir=self.output_dir / "detectors" if is_main_process() else None,
            errors="skip" if detectors == "all" else "raise",
        )

    def accuracy_table(self, model: Callable[[Tensor], Tensor], path: Path, name: str) -> dict[str, float]:
        """Top-1 accuracy of ``model`` on the ID test set and each generalisation set, written to ``path``.

        Args:
            model: Maps a batch of images to logits.
            path: The JSON file to write (by rank 0).
            name: How the log lines name the model.

        Returns:
            Accuracy (a fraction) by set name.
        """
        from dreamood.baselines import classification_accuracy

        sets = {"ID test": self.data.test, **self.data.generalization}
        accuracy: dict[str, float] = {}
        for set_name, dataset in sets.items():
            loader = self.loader(dataset, self.config.evaluation.batch_size, shuffle=False)
            accuracy[set_name] = classification_accuracy(
                model, loader, device=self.device, progress_bar=self.config.progress
            )
            logger.info("[%s] %s: top-1 accuracy %.2f%%", name, set_name, 100 * accuracy[set_name])
        if is_main_process():
            with atomic_write(path, "w") as handle:
                handle.write(json.dumps(accuracy, indent=2))
        return accuracy

    def run(self) -> OODReport:
        """Run every stage in order (skipping those already done) and return the evaluation report.

        Returns:
            The OOD report.
        """
        with self.locked():
            self.write_config()
            for status in self.plan():
                logger.info("[%s] plan: %s (%s)", status.stage, status.state, status.reason)
            results: dict[str, Any] = {}
            for stage in STAGES:
                results[stage.name] = self.execute(stage, *(results[name] for name in stage.inputs))
            if self.config.method == "dream-id":
                self.generalization(results[CLASSIFIER.name])
        return cast("OODReport", results[REPORT.name])

    # ---- the baselines ----------------------------------------------------------------------------------

    def baseline_dir(self, name: str) -> Path:
        """The folder of a baseline's artefacts: ``output_dir/baselines/<name>``.

        Args:
            name: A name from :data:`~dreamood.pipeline.BASELINES`.

        Returns:
            The folder.

        Raises:
            ValueError: ``name`` is not a baseline.
        """
        return self._baseline_runner.baseline_dir(name)

    def baseline_path(self, name: str) -> Path:
        """The result file of a baseline, whose existence marks it done (and makes it be skipped).

        Args:
            name: A name from :data:`~dreamood.pipeline.BASELINES`.

        Returns:
            ``baselines/<name>/report.json`` for an OOD baseline, ``baselines/<name>/generalization.json`` for a
            generalisation baseline.

        Raises:
            ValueError: ``name`` is not a baseline.
        """
        return self._baseline_runner.baseline_path(name)

    def baseline_is_done(self, name: str) -> bool:
        """Whether a baseline's result exists and was made from the run's current settings.

        Args:
            name: A name from :data:`~dreamood.pipeline.BASELINES`.

        Returns:
            ``True`` when the baseline would be skipped (unless forced).
        """
        return self._baseline_runner.is_done(name)

    def ood_baseline(self, name: str) -> OODReport:
        """Train (or load) an OOD-detection baseline and evaluate it on the run's OOD test sets.

        See :meth:`BaselineRunner.ood_baseline <dreamood.pipeline.BaselineRunner.ood_baseline>`.

        Args:
            name: ``"godin"`` or ``"gan"``.

        Returns:
            The report, saved to ``baselines/<name>/report.json`` and ``report.md``.
        """
        return self._baseline_runner.ood_baseline(name)

    def generalization_baseline(self, name: str) -> dict[str, float]:
        """Train (or load) a generalisation baseline of DREAM-ID and measure its top-1 accuracy.

        See :meth:`BaselineRunner.generalization_baseline <dreamood.pipeline.BaselineRunner.generalization_baseline>`.

        Args:
            name: A name from :data:`~dreamood.pipeline.GENERALIZATION_BASELINES`.

        Returns:
            Accuracy (a fraction) on the ID test set and each generalisation set.
        """
        return self._baseline_runner.generalization_baseline(name)
