"""The classifier training loop of DREAM-OOD, DREAM-ID, VOS and NPOS, in one process or under ``torchrun``.

One step draws an in-distribution (ID) batch, optionally generated inliers with their labels (DREAM-ID) and
outlier images (DREAM-OOD), runs all images through the network in one shuffled forward pass (so BatchNorm
normalises ID and outliers together), and minimises ``CE + beta * L_ood``. Feature-space baselines (VOS,
NPOS) instead draw virtual outliers from a :class:`~dreamood.protocols.FeatureOutlierSampler` fed with the
penultimate features, and pass them through the classifier head inside the same forward pass.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._utils import make_generator
from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.io import atomic_write, load_checkpoint, remove_temporaries
from dreamood.protocols import FeatureOutlierSampler
from dreamood.training.checkpoint import CHECKPOINT_FORMAT, TrainingCheckpoint
from dreamood.training.config import EpochMetrics, TrainingConfig, TrainingResult, _LoopSettings
from dreamood.training.distributed import (
    all_reduce_sum,
    distributed_loader,
    gather_objects,
    gather_rows,
    setup_distributed,
)
from dreamood.training.losses import bad_distribution_rows, distribution_cross_entropy
from dreamood.training.precision import autocast, autocast_dtype, grad_scaler
from dreamood.training.rng import loader_generators
from dreamood.training.schedule import cosine_schedule

__all__ = ["CHECKPOINT_FORMAT", "train_classifier"]

CHECKPOINT_NAME = "checkpoint.pt"
# The settings a resumed run must share with the checkpoint: each one changes the trained model.
_RESULT_SETTINGS = ("lr", "beta", "momentum", "nesterov", "weight_decay", "min_lr", "ood_start_epoch", "amp", "seed")
# Values a step leaves on the device (see _PendingStep).
_STEP_VALUES = 9
METRICS_NAME = "metrics.json"


def train_classifier(
    model: nn.Module,
    id_loader: Iterable[Any],
    config: TrainingConfig,
    *,
    outlier_loader: Iterable[Any] | None = None,
    synthetic_id_loader: Iterable[Any] | None = None,
    regularizer: nn.Module | None = None,
    feature_sampler: FeatureOutlierSampler | None = None,
    feature_extractor: Callable[[Tensor], Tensor] | None = None,
    classifier_head: Callable[[Tensor], Tensor] | None = None,
    no_weight_decay: Iterable[nn.Parameter] = (),
    extra_state: Mapping[str, Any] | None = None,
    device: str | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    init_checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fingerprint: str | None = None,
) -> TrainingResult:
    """Train ``model`` in place with cross-entropy plus, optionally, the energy outlier loss.

    The loss of a step is ``CE(ID and generated inliers) + beta * L_ood(ID, outliers)`` (DREAM-OOD, Du et al.,
    NeurIPS 2023, Eq. 7; VOS, Du et al., ICLR 2022; NPOS, Tao et al., ICLR 2023), optimised by SGD with
    Nesterov momentum and a cosine learning rate updated every step (:class:`TrainingConfig`).

    * **DREAM-OOD**: ``outlier_loader`` yields generated outlier images (or ``(images, labels)`` batches whose
      labels are ignored) and ``regularizer`` is an :class:`~dreamood.training.EnergyOODRegularizer`.
    * **DREAM-ID**: ``synthetic_id_loader`` yields generated ``(images, labels)`` inliers that join the
      cross-entropy. Augmented copies (RandAugment, CutMix, ...) join the same way.
    * **Mixed labels**: ``id_loader`` and ``synthetic_id_loader`` may yield target distributions ``(N, C)``
      (floats, rows summing to 1; CutMix) instead of integer labels; the cross-entropy of such a row is
      ``-sum_c t_c log softmax(f(x))_c`` (:func:`~dreamood.training.soft_cross_entropy`), integer labels of the
      other loader count as one-hot rows, and the accuracy compares with the most likely class.
    * **VOS / NPOS**: ``feature_sampler`` receives the penultimate features of every labelled batch
      (``feature_extractor``) and, from epoch ``ood_start_epoch`` on, returns virtual outlier features that
      ``classifier_head`` maps to logits for the regulariser. The sampler is drawn from before it sees the
      current batch's features (the forward pass that computes them also scores the virtual outliers).

    One epoch is one pass over ``id_loader``. The outlier and generated-inlier loaders are restarted at every
    epoch and cycled when shorter. Under ``torchrun --nproc_per_node=N`` every loader is sharded with a
    ``DistributedSampler`` (its ``batch_size`` is the per-process batch), the network and the regulariser are
    wrapped in ``DistributedDataParallel``, virtual outliers are split across processes, and only rank 0
    writes files; with equal shards this is the single-process run on the ``N``-times larger global batch,
    except for BatchNorm, whose statistics stay per process unless you convert the model with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` first.

    After every epoch ``output_dir/checkpoint.pt`` (model, regulariser, optimiser, scheduler, loss scaler,
    feature sampler if it has a ``state_dict``, the ``extra_state`` objects, every random state, history) and
    ``output_dir/metrics.json`` are written atomically; ``resume=True`` continues from the checkpoint and
    reproduces the uninterrupted run exactly (same device and number of processes).

    The host reads the step statistics back from the device every ``sync_every`` steps (and at the end of
    every epoch) rather than at every step, so a step does not wait for the previous one to finish. Label values
    (the range of integer labels, target distributions that are not distributions) are checked where the
    labels are and reported at the same read-backs, by every process at the same step under ``torchrun``.

    Args:
        model: The classifier, an ``nn.Module`` mapping images to logits ``(N, C)``; it holds every trained
            parameter of the classifier (including those ``feature_extractor`` and ``classifier_head`` use).
        id_loader: ``(images, labels)`` batches of the ID training set; must have a length.
        config: The hyper-parameters (:class:`TrainingConfig`; a :class:`~dreamood.config.TrainConfig`
            contributes only these fields). ``dataclasses.replace(config, lr=0.01)`` gives a copy with others.
        outlier_loader: Outlier image batches, or ``(images, labels)`` batches (labels ignored).
        synthetic_id_loader: Generated inliers as ``(images, labels)`` batches.
        regularizer: Module computing ``L_ood`` from ``(logits_id, logits_ood)``, trained with the model;
            required with outliers.
        feature_sampler: A feature-space outlier sampler (VOS, NPOS); needs ``feature_extractor`` and
            ``classifier_head``.
        feature_extractor: Callable mapping images to penultimate features ``(N, d)``, e.g. ``model.features``.
        classifier_head: Callable mapping features to logits, e.g. ``model.fc``;
            ``classifier_head(feature_extractor(x))`` must equal ``model(x)``.
        no_weight_decay: Parameters of ``model`` trained with weight decay 0 (e.g. GODIN's class weights);
            every other parameter gets ``weight_decay``.
        extra_state: Named objects with ``state_dict()`` and ``load_state_dict(state)`` that change during
            training beside the model, such as the GAN of :class:`~dreamood.baselines.GANOutlierLoader`; their
            states are saved in every checkpoint and loaded on resume. Their states must hold only tensors and
            plain Python values (the checkpoint is read with ``weights_only=True``).
        device: Device to train on; ``None``/``"auto"`` picks CUDA when available (under ``torchrun``, the
            process's ``LOCAL_RANK`` GPU).
        seed: Seed of the loop's own randomness (the order of the mixed ID/outlier batch, the feature
            sampler's draws, the ``DistributedSampler`` shuffling). Your loaders' shuffling follows their own
            ``generator`` or, without one, torch's global random state.
        output_dir: Folder for ``checkpoint.pt`` (written atomically after every epoch) and ``metrics.json``
            (the per-epoch history); ``None`` writes nothing.
        resume: Continue from ``output_dir/checkpoint.pt`` when it exists (start from scratch otherwise).
        init_checkpoint: Weights to start from when not resuming: a checkpoint of this loop or a plain model
            state dict (a ``module.`` prefix left by ``DataParallel`` is removed).
        progress: Show a tqdm progress bar with the running loss and accuracy (on rank 0 only).
        fingerprint: What identifies the data and settings of this training beyond ``config`` (the pipeline
            passes its stage's fingerprint). Stored in every checkpoint; a checkpoint is resumed only when it
            was written with the same fingerprint, the same result-changing settings of ``config`` and the same
            seed, number of epochs, steps per epoch and number of processes.

    Returns:
        The per-epoch history and the paths written.

    Raises:
        TypeError: An argument has the wrong type (``config`` is not a :class:`TrainingConfig`, ``seed`` is not
            an int, ...) or a loader yields malformed batches.
        ValueError: The arguments do not fit together (outliers without a regulariser, a sampler without the
            model parts, a head or a ``no_weight_decay`` parameter that is not in ``model``, ``resume`` without
            ``output_dir``), labels are out of range or are not distributions, or a checkpoint to resume belongs
            to a different run.
        NonFiniteError: The loss became NaN or infinite; the message names the epoch and step.
        ArtifactError: A checkpoint cannot be read safely.
    """
    settings = _loop_settings(config, device, seed, output_dir, resume, init_checkpoint, progress, fingerprint)
    _check_arguments(
        model,
        id_loader,
        outlier_loader,
        synthetic_id_loader,
        regularizer,
        feature_sampler,
        feature_extractor,
        classifier_head,
        settings,
    )
    excluded = _check_no_weight_decay(model, no_weight_decay)
    extras = _check_extra_state(extra_state)
    previous_benchmark = torch.backends.cudnn.benchmark
    if settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    try:
        run = _TrainingRun(
            model=model,
            id_loader=id_loader,
            outlier_loader=outlier_loader,
            synthetic_id_loader=synthetic_id_loader,
            regularizer=regularizer,
            feature_sampler=feature_sampler,
            feature_extractor=feature_extractor,
            classifier_head=classifier_head,
            no_decay_ids=excluded,
            extra_state=extras,
            config=settings,
        )
        return run.train()
    finally:
        torch.backends.cudnn.benchmark = previous_benchmark


def _loop_settings(
    config: TrainingConfig,
    device: str | None,
    seed: int,
    output_dir: str | os.PathLike[str] | None,
    resume: bool,
    init_checkpoint: str | os.PathLike[str] | None,
    progress: bool,
    fingerprint: str | None,
) -> _LoopSettings:
    """``config``'s TrainingConfig fields (a subclass's own fields are left out) and the run-time arguments."""
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if resume and output_dir is None:
        raise ValueError("resume=True needs output_dir (the folder holding checkpoint.pt)")
    options = {item.name: getattr(config, item.name) for item in fields(TrainingConfig)}
    return _LoopSettings(
        **options,
        device=device,
        seed=seed,
        output_dir=output_dir,
        resume=resume,
        init_checkpoint=init_checkpoint,
        progress=progress,
        fingerprint=fingerprint,
    )


def _check_no_weight_decay(model: nn.Module, parameters: Iterable[nn.Parameter]) -> set[int]:
    """The ids of the ``no_weight_decay`` parameters, all of which must be parameters of ``model``."""
    if isinstance(parameters, Tensor) or not isinstance(parameters, Iterable):
        raise TypeError(f"no_weight_decay must be an iterable of parameters, got {type(parameters).__name__}")
    parameters = list(parameters)
    for parameter in parameters:
        if not isinstance(parameter, nn.Parameter):
            raise TypeError(f"no_weight_decay must hold nn.Parameter objects, got a {type(parameter).__name__}")
    model_parameters = {id(p) for p in model.parameters()}
    unknown = sum(id(p) not in model_parameters for p in parameters)
    if unknown:
        raise ValueError(
            f"no_weight_decay holds {unknown} parameter(s) that are not parameters of model; pass parameters of "
            "the model being trained (e.g. model.head.h_parameters())"
        )
    return {id(p) for p in parameters}


def _owner_module(part: Callable[[Tensor], Tensor]) -> nn.Module | None:
    """The module whose parameters a callable uses: the module itself or a bound method's module."""
    if isinstance(part, nn.Module):
        return part
    owner = getattr(part, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _check_arguments(
    model: nn.Module,
    id_loader: Iterable[Any],
    outlier_loader: Iterable[Any] | None,
    synthetic_id_loader: Iterable[Any] | None,
    regularizer: nn.Module | None,
    feature_sampler: FeatureOutlierSampler | None,
    feature_extractor: Callable[[Tensor], Tensor] | None,
    classifier_head: Callable[[Tensor], Tensor] | None,
    config: TrainingConfig,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if regularizer is not None and not isinstance(regularizer, nn.Module):
        raise TypeError(f"regularizer must be a torch.nn.Module, got {type(regularizer).__name__}")
    if feature_sampler is not None and not isinstance(feature_sampler, FeatureOutlierSampler):
        raise TypeError(
            f"feature_sampler must have ready, update(features, labels) and sample(generator), "
            f"got {type(feature_sampler).__name__}"
        )
    has_outliers = outlier_loader is not None or feature_sampler is not None
    if has_outliers and regularizer is None:
        raise ValueError("outliers were given but regularizer is None; pass regularizer=EnergyOODRegularizer(...)")
    if regularizer is not None and not has_outliers:
        raise ValueError("regularizer was given without outliers; pass outlier_loader or feature_sampler")
    if has_outliers and config.ood_start_epoch >= config.epochs:
        raise ValueError(
            f"ood_start_epoch={config.ood_start_epoch} is not below epochs={config.epochs}: the outliers would "
            "never be used"
        )
    if (feature_extractor is None) != (classifier_head is None):
        raise ValueError("feature_extractor and classifier_head must be given together")
    if feature_sampler is not None and feature_extractor is None:
        raise ValueError("feature_sampler needs feature_extractor (images -> features) and classifier_head")
    model_parameters = {id(p) for p in model.parameters()}
    for name, part in (("feature_extractor", feature_extractor), ("classifier_head", classifier_head)):
        if part is None:
            continue
        if not callable(part):
            raise TypeError(f"{name} must be callable, got {type(part).__name__}")
        owner = _owner_module(part)
        if owner is not None and any(id(p) not in model_parameters for p in owner.parameters()):
            raise ValueError(
                f"{name} uses parameters that are not part of model, so they would not be trained or saved; "
                "pass parts of model (e.g. model.fc) or a model that contains them"
            )
    for name, loader in (
        ("id_loader", id_loader),
        ("outlier_loader", outlier_loader),
        ("synthetic_id_loader", synthetic_id_loader),
    ):
        if loader is not None and not isinstance(loader, Iterable):
            raise TypeError(f"{name} must be an iterable of batches (e.g. a DataLoader), got {type(loader).__name__}")


def _check_extra_state(extra_state: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra_state is None:
        return {}
    if not isinstance(extra_state, Mapping):
        raise TypeError(f"extra_state must map names to objects with state_dict(), got {type(extra_state).__name__}")
    for name, value in extra_state.items():
        if not isinstance(name, str):
            raise TypeError(f"extra_state names must be strings, got {name!r}")
        if not (callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))):
            raise TypeError(
                f"extra_state[{name!r}] must have state_dict() and load_state_dict(state), got {type(value).__name__}"
            )
    return dict(extra_state)


class _Network(nn.Module):
    """The classifier's forward pass, with features and virtual-outlier logits when the model parts are given.

    Computing everything in one ``forward`` lets ``DistributedDataParallel`` see each parameter's gradient once.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_extractor: Callable[[Tensor], Tensor] | None,
        classifier_head: Callable[[Tensor], Tensor] | None,
    ) -> None:
        super().__init__()
        self.model = model
        # A tuple keeps the callables out of the module tree (they share model's parameters).
        self._parts = (feature_extractor, classifier_head)

    def forward(self, images: Tensor, virtual: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor | None]:
        feature_extractor, classifier_head = self._parts
        if feature_extractor is None or classifier_head is None:
            return None, self.model(images), None
        features = feature_extractor(images)
        logits = classifier_head(features)
        virtual_logits = None if virtual is None else classifier_head(virtual.to(features.dtype))
        return features, logits, virtual_logits


class _Cycle:
    """Endless iterator over a loader, restarted when exhausted (with a fresh ``DistributedSampler`` epoch)."""

    def __init__(self, loader: Iterable[Any], name: str, epoch_base: int) -> None:
        self.loader = loader
        self.name = name
        self.epoch_base = epoch_base
        self.restarts = 0
        self.iterator = self._start()

    def _start(self) -> Iterator[Any]:
        _set_sampler_epoch(self.loader, self.epoch_base + self.restarts)
        return iter(self.loader)

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.restarts += 1
            self.iterator = self._start()
            try:
                return next(self.iterator)
            except StopIteration:
                raise ValueError(f"{self.name} yielded no batch") from None


def _set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def _labelled_batch(batch: Any, name: str) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of a batch; labels are integers ``(N,)`` or target distributions ``(N, C)``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2])):
        raise TypeError(f"{name} must yield (images, labels) tensor pairs, got a {type(batch).__name__}")
    images, labels = batch[0], batch[1]
    hard = labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool
    soft = labels.dim() == 2 and labels.is_floating_point() and labels.shape[1] > 0
    if not (hard or soft):
        raise TypeError(
            f"{name} labels must be a 1-D integer tensor or (N, C) floating-point target distributions, got dtype "
            f"{labels.dtype}, shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} yielded {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _combine_targets(targets: list[Tensor], names: list[str]) -> tuple[Tensor, Tensor]:
    """Concatenate a step's labels: integers ``(N,)``, or distributions ``(N, C)`` if any loader yields them.

    With a target distribution among them, integer labels become one-hot rows (clamped to the columns). Also
    returns ``[lowest integer label, highest integer label, rows that are not distributions]``, computed where
    the labels are without waiting for them; the values are checked at the next read-back (see
    ``_TrainingRun._step``), so labels that are already on the GPU never stall a step.
    """
    hard = [t for t in targets if t.dim() == 1]
    soft = [t for t in targets if t.dim() == 2]
    labels = torch.cat(hard) if hard else None
    if not soft:
        assert labels is not None
        return labels, torch.stack([labels.min(), labels.max(), labels.new_zeros(())]).double()

    widths = {t.shape[1] for t in soft}
    if len(widths) > 1:
        found = ", ".join(f"{name}: {t.shape[1]}" for t, name in zip(targets, names) if t.dim() == 2)
        raise ValueError(f"the target distributions must all have one column per class, got {found} columns")
    num_classes = widths.pop()
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in soft])
    bad = torch.stack([bad_distribution_rows(t) for t in soft]).sum()
    extremes = [bad.new_zeros(()), bad.new_zeros(())] if labels is None else [labels.min(), labels.max()]
    checks = torch.stack([e.to(bad.device) for e in extremes] + [bad]).double()
    rows = [t if t.dim() == 2 else F.one_hot(t.clamp(0, num_classes - 1), num_classes) for t in targets]
    return torch.cat([row.to(dtype) for row in rows]), checks


def _image_batch(batch: Any, name: str) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"{name} must yield image tensors or (images, labels) pairs, got a {type(batch).__name__}")


def _check_same_kind(images: Tensor, reference: Tensor, name: str) -> None:
    if images.shape[1:] != reference.shape[1:] or images.dtype != reference.dtype:
        raise ValueError(
            f"{name} yielded images of shape {tuple(images.shape[1:])} and dtype {images.dtype}, but id_loader "
            f"yields {tuple(reference.shape[1:])} and {reference.dtype}"
        )


def _check_labels(checks: list[float], item: _PendingStep) -> None:
    """Raise for a step whose labels some process found invalid; ``checks`` are this process's
    ``[lowest label, highest label, bad rows]``."""
    low, high, bad_rows = checks
    where = f" (epoch {item.epoch + 1}, step {item.step + 1})"
    if low < 0 or high >= item.num_outputs:
        raise ValueError(
            f"labels must lie in [0, {item.num_outputs}) for a model with {item.num_outputs} outputs, got labels "
            f"from {low:.0f} to {high:.0f}{where}"
        )
    if bad_rows:
        raise ValueError(
            f"target distributions must have non-negative rows summing to 1, got {bad_rows:.0f} other row(s){where}"
        )
    raise ValueError(f"another process found labels out of range or rows that are not distributions{where}")


def _model_weights(state: dict[str, Any], path: Any) -> dict[str, Tensor]:
    """The model state dict inside a checkpoint of this loop, or the plain state dict ``state``."""
    weights = state["model"] if state.get("format") == CHECKPOINT_FORMAT else state
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ArtifactError(
            f"{path} is neither a training checkpoint nor a model state dict (keys: {sorted(state)[:8]})"
        )
    if weights and all(key.startswith("module.") for key in weights):
        weights = {key.removeprefix("module."): value for key, value in weights.items()}
    return weights


@dataclass(frozen=True)
class _Batch:
    """One step's images on the device (shuffled), with what is needed to undo the shuffle and split them."""

    inputs: Tensor
    inverse: Tensor | None
    target: Tensor  # integer labels (N,) or target distributions (N, C)
    label_checks: Tensor  # [lowest integer label, highest integer label, bad rows], checked at the read-back
    n_id: int
    n_labelled: int
    has_outliers: bool


@dataclass(frozen=True)
class _PendingStep:
    """A step whose statistics are still on the device: ``values`` holds the sums over processes of
    ``[loss, ce, ood, correct, count, processes with invalid labels]``, then this process's label checks
    ``[lowest label, highest label, bad rows]``."""

    epoch: int
    step: int
    has_ood: bool
    num_outputs: int
    values: Tensor


@dataclass
class _StepStats:
    """A step's losses (averaged over processes) and accuracy counts (summed over processes)."""

    loss: float
    ce: float
    ood: float | None
    correct: float
    count: float

    def add(self, other: _StepStats) -> None:
        self.loss += other.loss
        self.ce += other.ce
        self.correct += other.correct
        self.count += other.count
        if other.ood is not None and self.ood is not None:
            self.ood += other.ood


class _TrainingRun:
    """Everything one call of :func:`train_classifier` holds: loaders, optimiser, generators, state on disk."""

    def __init__(
        self,
        *,
        model: nn.Module,
        id_loader: Iterable[Any],
        outlier_loader: Iterable[Any] | None,
        synthetic_id_loader: Iterable[Any] | None,
        regularizer: nn.Module | None,
        feature_sampler: FeatureOutlierSampler | None,
        feature_extractor: Callable[[Tensor], Tensor] | None,
        classifier_head: Callable[[Tensor], Tensor] | None,
        no_decay_ids: set[int],
        extra_state: dict[str, Any],
        config: _LoopSettings,
    ) -> None:
        import numpy as np

        self.config = config
        self.context, self.device = setup_distributed(config.device)
        context = self.context
        self.id_loader = distributed_loader(id_loader, context, seed=config.seed, name="id_loader")
        self.outlier_loader = None
        if outlier_loader is not None:
            self.outlier_loader = distributed_loader(outlier_loader, context, seed=config.seed, name="outlier_loader")
        self.synthetic_id_loader = None
        if synthetic_id_loader is not None:
            self.synthetic_id_loader = distributed_loader(
                synthetic_id_loader, context, seed=config.seed, name="synthetic_id_loader"
            )
        try:
            self.steps_per_epoch = len(self.id_loader)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("id_loader must have a length (e.g. a DataLoader over a map-style dataset)") from None
        if self.steps_per_epoch == 0:
            raise ValueError("id_loader is empty: it yields no batch")

        self.model = model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.regularizer = None if regularizer is None else regularizer.to(self.device)
        self.feature_sampler = feature_sampler
        self.extra_state = extra_state

        parameters = list(self.model.parameters())
        if self.regularizer is not None:
            seen = {id(p) for p in parameters}
            parameters += [p for p in self.regularizer.parameters() if id(p) not in seen]
        groups: list[dict[str, Any]] = [{"params": [p for p in parameters if id(p) not in no_decay_ids]}]
        if no_decay_ids:
            groups.append({"params": [p for p in parameters if id(p) in no_decay_ids], "weight_decay": 0.0})
        self.optimizer = torch.optim.SGD(
            [group for group in groups if group["params"]],
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        self.scheduler = cosine_schedule(self.optimizer, config.epochs * self.steps_per_epoch, config.min_lr)
        self.amp_dtype = autocast_dtype(config.amp)
        self.scaler = grad_scaler(self.device, self.amp_dtype)
        shuffle_seed, sample_seed = (int(s) for s in np.random.SeedSequence(config.seed).generate_state(2))
        self.shuffle_generator = cast(torch.Generator, make_generator(shuffle_seed, "cpu"))
        self.sample_generator = cast(torch.Generator, make_generator(sample_seed, self.device))
        self.generators = {
            "id_loader": loader_generators(self.id_loader),
            "outlier_loader": loader_generators(self.outlier_loader),
            "synthetic_id_loader": loader_generators(self.synthetic_id_loader),
            "loop": [self.shuffle_generator, self.sample_generator],
        }

        self.output_dir = None if config.output_dir is None else Path(config.output_dir)
        self.checkpoint_path = None if self.output_dir is None else self.output_dir / CHECKPOINT_NAME
        self.metrics_path = None if self.output_dir is None else self.output_dir / METRICS_NAME
        objects: dict[str, Any] = {"model": self.model}
        if self.regularizer is not None:
            objects["regularizer"] = self.regularizer
        objects.update(optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        self.checkpoint = TrainingCheckpoint(
            self.checkpoint_path,
            "train_classifier",
            objects=objects,
            run={
                "epochs": config.epochs,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": context.world_size,
                "has_regularizer": self.regularizer is not None,
                "settings": {key: getattr(config, key) for key in _RESULT_SETTINGS},
                "fingerprint": config.fingerprint,
            },
            generators=self.generators,
            rank=context.rank,
        )
        self.history: list[EpochMetrics] = []
        self.start_epoch = 0
        if context.is_main and self.metrics_path is not None:
            # Left by a process killed while writing; only this process writes these files.
            self.checkpoint.remove_temporaries()
            remove_temporaries(self.metrics_path)
        resumed = self._load_initial_state()

        self.plain_network = _Network(self.model, feature_extractor, classifier_head)
        # What the steps call: the plain modules, wrapped for the duration of train() (see _wrap_modules).
        self.network: nn.Module = self.plain_network
        self.loss_module = self.regularizer
        # Restored last, so nothing above draws from the restored states.
        if resumed is not None:
            self.checkpoint.restore_rng(resumed)

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _load_initial_state(self) -> dict[str, Any] | None:
        """Resume from the checkpoint or load the initial weights; return the checkpoint resumed from."""
        config = self.config
        if config.resume and self.checkpoint.exists():
            state = self.checkpoint.load()
            self._load_sampler_state(state.get("feature_sampler", {}))
            self._load_extra_state(state.get("extra_state", {}))
            self.history = [EpochMetrics.from_dict(item) for item in state["history"]]
            self.start_epoch = int(state["epoch"])
            return state
        if config.init_checkpoint is not None:
            state = load_checkpoint(config.init_checkpoint, map_location="cpu")
            self.model.load_state_dict(_model_weights(state, config.init_checkpoint))
        return None

    def _load_sampler_state(self, sampler_state: dict[str, Any]) -> None:
        sampler = self.feature_sampler
        if sampler is None:
            return
        load = getattr(sampler, "load_state_dict", None)
        if callable(load) and sampler_state:
            load(sampler_state)
        else:
            warnings.warn(
                f"{type(sampler).__name__} has no saved state (it needs state_dict()/load_state_dict()); it "
                "restarts empty, so the resumed run differs from an uninterrupted one",
                stacklevel=4,
            )

    def _load_extra_state(self, saved: dict[str, Any]) -> None:
        for name, value in self.extra_state.items():
            if name in saved:
                value.load_state_dict(saved[name])
            else:
                warnings.warn(
                    f"{self.checkpoint_path} holds no state of extra_state[{name!r}]; it continues from its current "
                    "state, so the resumed run differs from an uninterrupted one",
                    stacklevel=4,
                )
        unused = sorted(set(saved) - set(self.extra_state))
        if unused:
            warnings.warn(
                f"{self.checkpoint_path} holds states of {unused}, which this run's extra_state does not name; "
                "they are not restored",
                stacklevel=4,
            )

    def _save(self, epoch: int) -> None:
        rng_states = gather_objects(self.checkpoint.capture_rng(), self.context)
        if not self.context.is_main or self.checkpoint_path is None or self.metrics_path is None:
            return
        sampler_state_dict = getattr(self.feature_sampler, "state_dict", None)
        self.checkpoint.save(
            epoch + 1,
            [item.to_dict() for item in self.history],
            rng=rng_states,
            extra={
                "config": self.config.to_dict(),
                "feature_sampler": sampler_state_dict() if callable(sampler_state_dict) else {},
                "extra_state": {name: value.state_dict() for name, value in self.extra_state.items()},
            },
        )
        log = {
            "config": self.config.to_dict(),
            "world_size": self.context.world_size,
            "history": [item.to_dict() for item in self.history],
        }
        with atomic_write(self.metrics_path, "w") as handle:
            json.dump(log, handle, indent=2)

    # ---- training --------------------------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        try:
            self._wrap_modules()
            for epoch in range(self.start_epoch, self.config.epochs):
                self.history.append(self._run_epoch(epoch))
                self._save(epoch)
        finally:
            # DistributedDataParallel keeps hooks on the model's parameters and a handle on the process group.
            # Drop the wrappers now, also on error, rather than whenever the garbage collector frees them: a
            # wrapper torn down at interpreter exit, after the process group, can abort a gloo process.
            self.network, self.loss_module = self.plain_network, self.regularizer
        return TrainingResult(
            history=list(self.history),
            checkpoint_path=self.checkpoint_path if self.context.is_main else None,
            metrics_path=self.metrics_path if self.context.is_main else None,
        )

    def _wrap_modules(self) -> None:
        """Wrap the network (and the regularizer) in DistributedDataParallel under torchrun; compile if asked."""
        if self.context.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.plain_network, device_ids=device_ids)
            if self.regularizer is not None:
                self.loss_module = DistributedDataParallel(self.regularizer, device_ids=device_ids)
        if self.config.compile:
            self.network = cast(nn.Module, torch.compile(self.network, mode=self.config.compile_mode))

    def _run_epoch(self, epoch: int) -> EpochMetrics:
        config = self.config
        start = time.perf_counter()
        self.model.train()
        if self.regularizer is not None:
            self.regularizer.train()
        use_ood = self.regularizer is not None and epoch >= config.ood_start_epoch
        base = epoch * self.steps_per_epoch
        outliers = None
        if use_ood and self.outlier_loader is not None:
            outliers = _Cycle(self.outlier_loader, "outlier_loader", base)
        synthetic = None
        if self.synthetic_id_loader is not None:
            synthetic = _Cycle(self.synthetic_id_loader, "synthetic_id_loader", base)
        _set_sampler_epoch(self.id_loader, epoch)

        bar = None
        if config.progress and self.context.is_main:
            from tqdm.auto import tqdm

            # disable=None: tqdm draws nothing when stderr is not a terminal (no carriage returns in log files).
            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=True, disable=None)
        totals = _StepStats(loss=0.0, ce=0.0, ood=0.0, correct=0.0, count=0.0)
        steps = ood_steps = 0
        lr = self.optimizer.param_groups[0]["lr"]
        pending: list[_PendingStep] = []

        def read_back() -> None:
            nonlocal steps, ood_steps
            # Summed on the host step by step, in order, as if every step had been read at once.
            for stats in self._read_back(pending):
                steps += 1
                totals.add(stats)
                ood_steps += stats.ood is not None
            if bar is not None and pending:
                accuracy = totals.correct / max(totals.count, 1.0)
                bar.set_postfix(loss=f"{totals.loss / steps:.4f}", acc=f"{accuracy:.3f}", refresh=False)
                bar.update(len(pending))
            pending.clear()

        def record(item: _PendingStep) -> None:
            pending.append(item)
            if len(pending) >= config.sync_every:
                read_back()  # before the step's update: with sync_every=1 a non-finite step is never applied

        try:
            for step, batch in enumerate(self.id_loader):
                lr = self.optimizer.param_groups[0]["lr"]
                self._step(batch, outliers, synthetic, use_ood, epoch, step, record)
            read_back()
        finally:
            if bar is not None:
                bar.close()
        return EpochMetrics(
            epoch=epoch + 1,
            loss=totals.loss / max(steps, 1),
            ce_loss=totals.ce / max(steps, 1),
            ood_loss=totals.ood / ood_steps if ood_steps and totals.ood is not None else None,
            accuracy=totals.correct / max(totals.count, 1.0),
            lr=float(lr),
            steps=steps,
            ood_steps=ood_steps,
            seconds=time.perf_counter() - start,
        )

    def _read_back(self, pending: list[_PendingStep]) -> list[_StepStats]:
        """Copy the pending steps' statistics to the host at once and check them in step order.

        Every process holds the same sums over processes, so all of them raise at the same step, also when only
        one of them saw invalid labels.
        """
        if not pending:
            return []
        values = torch.cat([item.values for item in pending]).tolist()
        world = self.context.world_size
        results = []
        offset = 0
        for item in pending:
            row = values[offset : offset + _STEP_VALUES]
            offset += _STEP_VALUES
            total_loss, total_ce, total_ood, n_correct, n_seen, invalid = row[:6]
            if invalid:
                _check_labels(row[6:], item)
            result = _StepStats(
                loss=total_loss / world,
                ce=total_ce / world,
                ood=total_ood / world if item.has_ood else None,
                correct=n_correct,
                count=n_seen,
            )
            if not math.isfinite(result.loss):
                raise NonFiniteError(
                    f"the training loss is {result.loss} at epoch {item.epoch + 1}/{self.config.epochs}, step "
                    f"{item.step + 1}/{self.steps_per_epoch} (cross-entropy {result.ce}, outlier loss "
                    f"{'not computed' if result.ood is None else result.ood}); check the inputs for NaN or "
                    "infinity, lower the learning rate, or train in full precision"
                )
            results.append(result)
        return results

    def _virtual_outliers(self) -> Tensor:
        """Draw virtual outlier features; under ``torchrun`` this process keeps every ``world_size``-th row."""
        assert self.feature_sampler is not None
        virtual = self.feature_sampler.sample(self.sample_generator)
        if not isinstance(virtual, Tensor) or virtual.dim() != 2:
            raise TypeError(f"feature_sampler.sample() must return a (M, d) tensor, got {virtual!r:.80}")
        context = self.context
        virtual = virtual[context.rank :: context.world_size]
        if virtual.shape[0] == 0:
            raise ValueError(
                f"feature_sampler.sample() returned too few outliers to give each of {context.world_size} processes one"
            )
        return virtual.detach().to(self.device, torch.float32)

    def _assemble(self, batch: Any, outliers: _Cycle | None, synthetic: _Cycle | None) -> _Batch:
        """Concatenate ID, generated-inlier and outlier images, shuffle them, and move them to the device."""
        images, labels = _labelled_batch(batch, "id_loader")
        parts, targets, names = [images], [labels], ["id_loader"]
        if synthetic is not None:
            synthetic_images, synthetic_labels = _labelled_batch(next(synthetic), "synthetic_id_loader")
            _check_same_kind(synthetic_images, images, "synthetic_id_loader")
            parts.append(synthetic_images)
            targets.append(synthetic_labels)
            names.append("synthetic_id_loader")
        if outliers is not None:
            outlier_images = _image_batch(next(outliers), "outlier_loader")
            _check_same_kind(outlier_images, images, "outlier_loader")
            parts.append(outlier_images)
        if self.feature_sampler is not None and any(t.dim() == 2 for t in targets):
            raise ValueError(
                "feature_sampler needs integer labels (it models each class), but a loader yields target "
                "distributions (N, C)"
            )
        target, label_checks = _combine_targets(targets, names)

        inputs, inverse = images, None
        if len(parts) > 1:
            inputs = torch.cat(parts)
            order = torch.randperm(inputs.shape[0], generator=self.shuffle_generator)
            # Indexing a device tensor with a host index would wait for the device; copy the index over first.
            inputs = inputs[order.to(inputs.device, non_blocking=True)]
            inverse = torch.argsort(order).to(self.device, non_blocking=True)
        inputs = inputs.to(self.device, non_blocking=True)
        if self.config.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return _Batch(
            inputs=inputs,
            inverse=inverse,
            target=target.to(self.device, non_blocking=True),
            label_checks=label_checks.to(self.device, non_blocking=True),
            n_id=images.shape[0],
            n_labelled=target.shape[0],
            has_outliers=outliers is not None,
        )

    def _losses(self, batch: _Batch, virtual: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
        """Forward pass and losses: ``(features, logits, cross-entropy, outlier loss or None)``, in input order."""
        features, logits, virtual_logits = self.network(batch.inputs, virtual)
        if batch.inverse is not None:
            logits = logits[batch.inverse]
            features = None if features is None else features[batch.inverse]
        num_outputs = logits.shape[1]
        labelled = logits[: batch.n_labelled]
        target = batch.target
        if target.dim() == 2:
            if target.shape[1] != num_outputs:
                raise ValueError(
                    f"the target distributions have {target.shape[1]} columns, but the model has {num_outputs} outputs"
                )
            ce = distribution_cross_entropy(labelled, target)
        else:  # checked at the read-back; clamped so the device never indexes outside the logits
            ce = F.cross_entropy(labelled, target.clamp(0, num_outputs - 1))
        ood_logits = [logits[batch.n_labelled :]] if batch.has_outliers else []
        if virtual_logits is not None:
            ood_logits.append(virtual_logits)
        if not ood_logits:
            return features, logits, ce, None
        assert self.loss_module is not None
        return features, logits, ce, self.loss_module(labelled, torch.cat(ood_logits))

    def _step(
        self,
        batch: Any,
        outliers: _Cycle | None,
        synthetic: _Cycle | None,
        use_ood: bool,
        epoch: int,
        step: int,
        record: Callable[[_PendingStep], None],
    ) -> None:
        """One optimisation step; ``record`` receives its statistics (still on the device) before the update."""
        config = self.config
        assembled = self._assemble(batch, outliers, synthetic)
        virtual = None
        if use_ood and self.feature_sampler is not None and self.feature_sampler.ready:
            virtual = self._virtual_outliers()
        with autocast(self.device, self.amp_dtype):
            features, logits, ce, ood = self._losses(assembled, virtual)
            loss = ce if ood is None else ce + config.beta * ood

        # One reduction per step gives every process the global numbers, so all of them stop together. They stay
        # on the device until the next read-back (every sync_every steps), so the host does not wait here.
        n_id = assembled.n_id
        id_target = assembled.target[:n_id]
        id_labels = id_target if id_target.dim() == 1 else id_target.argmax(dim=1)
        correct = (logits[:n_id].argmax(dim=1) == id_labels).sum()
        num_outputs = logits.shape[1]
        low, high, bad_rows = assembled.label_checks
        invalid = (low < 0) | (high >= num_outputs) | (bad_rows > 0)
        stats = torch.stack(
            [
                loss.detach().double(),
                ce.detach().double(),
                (ood.detach() if ood is not None else torch.zeros_like(ce)).double(),
                correct.double(),
                torch.full_like(correct, n_id).double(),
                invalid.double(),
            ]
        )
        values = torch.cat([all_reduce_sum(stats, self.context), assembled.label_checks])
        record(_PendingStep(epoch=epoch, step=step, has_ood=ood is not None, num_outputs=num_outputs, values=values))

        torch.autograd.backward(self.scaler.scale(loss))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

        if self.feature_sampler is not None and features is not None:
            self.feature_sampler.update(
                gather_rows(features[: assembled.n_labelled].detach().float(), self.context),
                gather_rows(assembled.target.clamp(0, num_outputs - 1), self.context),
            )
