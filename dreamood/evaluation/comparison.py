"""Evaluate a trained classifier under many post-hoc detectors in one call, and compare them in one table.

:func:`evaluate_detectors` runs the network once over the ID fit data, the ID test set and every OOD set to
get logits and penultimate features, fits every detector that reads logits or features on the shared fit
data and scores the shared test outputs. Detectors that need the network itself (input gradients, several
stochastic passes, intermediate feature maps) run over the loaders as they must. :data:`DETECTORS` names every
detector the call knows and what it needs; :class:`ModelParts` holds the parts of the network they use.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import check_choice
from dreamood.evaluation.metrics import FprRule
from dreamood.evaluation.report import OODReport, metric_headers
from dreamood.io import atomic_write

if TYPE_CHECKING:
    from dreamood.detectors import Detector

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTORS",
    "DetectorComparison",
    "DetectorSpec",
    "ModelParts",
    "applicable_detectors",
    "evaluate_detectors",
]

# What a detector can need, besides the model: the names of ModelParts fields, and "fit" for ID fit data.
Requirement = str


@dataclass(frozen=True)
class ModelParts:
    """The parts of a trained classifier that post-hoc detectors use.

    Attributes:
        model: Images ``(N, ...)`` -> logits ``(N, C)``.
        features: Images -> penultimate features ``(N, D)`` (``None``: feature detectors are not applicable).
        head: The last layer, ``logits = head(features)`` (``None``: detectors that reshape it are not
            applicable).
        feature_map: Images -> the last convolutional feature map ``(N, C', H, W)`` (RankFeat).
        map_head: That feature map -> logits (pooling and the last layer).
        layers: Modules whose outputs ``(N, C_l, ...)`` are the intermediate feature maps of the multi-layer
            detectors (multi-layer Mahalanobis, Gram matrices); empty: those are not applicable.
        input_std: Per-channel standard deviations of the input normalisation, when the model is fed
            normalised images (ODIN and multi-layer Mahalanobis divide their input step by it); ``None``
            when the model normalises itself or takes raw inputs.
    """

    model: Callable[[Tensor], Tensor]
    features: Callable[[Tensor], Tensor] | None = None
    head: nn.Linear | None = None
    feature_map: Callable[[Tensor], Tensor] | None = None
    map_head: Callable[[Tensor], Tensor] | None = None
    layers: tuple[nn.Module, ...] = ()
    input_std: tuple[float, ...] | None = None

    @classmethod
    def from_classifier(cls, model: nn.Module, *, input_std: Sequence[float] | None = None) -> ModelParts:
        """The parts of a :class:`~dreamood.models.Classifier` (or any module with ``features`` and ``head``).

        For a :class:`~dreamood.models.resnet.ResNetFeatures` backbone the feature map is the output of
        ``layer4``, the layers are ``layer1`` to ``layer4``; for a
        :class:`~dreamood.models.small.SmallConvNet` the feature map is the last convolutional block's output
        and the layers are its three blocks. Other backbones give no feature map and no layers.

        Args:
            model: The classifier.
            input_std: Per-channel standard deviations of the input normalisation (see the attribute).

        Returns:
            The parts.

        Raises:
            TypeError: If ``model`` is not an ``nn.Module``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        features = getattr(model, "features", None)
        head = getattr(model, "head", None)
        parts: dict[str, Any] = {
            "model": model,
            "features": features if callable(features) else None,
            "head": head if isinstance(head, nn.Linear) else None,
            "input_std": None if input_std is None else tuple(float(s) for s in input_std),
        }
        backbone = getattr(model, "backbone", None)
        if parts["head"] is not None and backbone is not None:
            parts.update(_backbone_maps(backbone, parts["head"]))
        return cls(**parts)


def _backbone_maps(backbone: nn.Module, head: nn.Linear) -> dict[str, Any]:
    """Feature map, map head and layers of dreamood's own backbones (empty for any other backbone)."""
    from dreamood.models.resnet import ResNetFeatures
    from dreamood.models.small import SmallConvNet

    if isinstance(backbone, ResNetFeatures):
        stem = nn.Sequential(
            backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
            backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4,
        )  # fmt: skip
        pool: nn.Module = nn.Sequential(backbone.avgpool, nn.Flatten(), head)
        return {
            "feature_map": stem,
            "map_head": pool,
            "layers": (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4),
        }
    if isinstance(backbone, SmallConvNet):
        body = backbone.body
        return {
            "feature_map": body[:4],
            "map_head": nn.Sequential(body[4], body[5], head),
            "layers": (body[0], body[1], body[3]),
        }
    return {}


@dataclass(frozen=True)
class DetectorSpec:
    """How :func:`evaluate_detectors` builds one detector.

    Attributes:
        name: The detector's name in tables and in ``detectors=[...]``.
        inputs: What its ``score`` consumes: ``"logits"``, ``"features"`` or ``"images"``.
        needs: The :class:`ModelParts` fields it needs (``"fit"``: ID fit data; ``"dropout"``: a dropout
            layer in the model).
        build: ``build(parts, n_fit, options)`` returns the unfitted detector; ``n_fit`` is the number of fit
            samples (0 without fit data) and ``options`` the user's keyword arguments for this detector.
        paper: Short paper reference for the docs.
        held_out: The paper fits it on held-out ID data rather than the training set (temperature scaling,
            KL-Matching): :func:`evaluate_detectors` fits it on ``validation_loader`` when one is given.
    """

    name: str
    inputs: str
    needs: tuple[Requirement, ...]
    build: Callable[[ModelParts, int, Mapping[str, Any]], Detector]
    paper: str
    held_out: bool = False


def _logit(cls_name: str, **defaults: Any) -> Callable[[ModelParts, int, Mapping[str, Any]], Detector]:
    def build(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
        import dreamood.detectors as detectors

        detector: Detector = getattr(detectors, cls_name)(**{**defaults, **options})
        return detector

    return build


def _head(cls_name: str, **defaults: Any) -> Callable[[ModelParts, int, Mapping[str, Any]], Detector]:
    def build(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
        import dreamood.detectors as detectors

        assert parts.head is not None
        settings = {**defaults, **options}
        for key in ("k",):  # neighbour counts cannot exceed the fit set
            if key in defaults and key not in options and n_fit:
                settings[key] = min(settings[key], n_fit)
        detector: Detector = getattr(detectors, cls_name)(parts.head, **settings)
        return detector

    return build


def _features_only(cls_name: str, **defaults: Any) -> Callable[[ModelParts, int, Mapping[str, Any]], Detector]:
    def build(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
        import dreamood.detectors as detectors

        settings = {**defaults, **options}
        if "k" in defaults and "k" not in options and n_fit:
            settings["k"] = min(settings["k"], n_fit)
        detector: Detector = getattr(detectors, cls_name)(**settings)
        return detector

    return build


def _odin(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
    from dreamood.detectors import ODIN

    return ODIN(parts.model, **{"std": parts.input_std, **options})


def _rankfeat(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
    from dreamood.detectors import RankFeat

    assert parts.feature_map is not None and parts.map_head is not None
    return RankFeat(parts.feature_map, parts.map_head, **options)


def _mc_dropout(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
    from dreamood.detectors import MCDropout

    assert isinstance(parts.model, nn.Module)
    return MCDropout(parts.model, **options)


def _multilayer_mahalanobis(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
    from dreamood.detectors import MultiLayerMahalanobis

    assert isinstance(parts.model, nn.Module)
    return MultiLayerMahalanobis(parts.model, parts.layers, **{"std": parts.input_std, **options})


def _gram(parts: ModelParts, n_fit: int, options: Mapping[str, Any]) -> Detector:
    from dreamood.detectors import Gram

    assert isinstance(parts.model, nn.Module)
    return Gram(parts.model, parts.layers, **options)


_SPECS: tuple[DetectorSpec, ...] = (
    DetectorSpec("MSP", "logits", (), _logit("MSP"), "Hendrycks & Gimpel, ICLR 2017"),
    DetectorSpec("MaxLogit", "logits", (), _logit("MaxLogit"), "Hendrycks et al., ICML 2022"),
    DetectorSpec("Energy", "logits", (), _logit("Energy"), "Liu et al., NeurIPS 2020"),
    DetectorSpec("Entropy", "logits", (), _logit("Entropy"), "Shannon 1948; Hendrycks et al., ICLR 2019"),
    DetectorSpec("GEN", "logits", (), _logit("GEN"), "Liu et al., CVPR 2023"),
    DetectorSpec(
        "TempScaling", "logits", ("fit",), _logit("TemperatureScaling"), "Guo et al., ICML 2017", held_out=True
    ),
    DetectorSpec("KLMatching", "logits", ("fit",), _logit("KLMatching"), "Hendrycks et al., ICML 2022", held_out=True),
    DetectorSpec("OpenMax", "logits", ("fit",), _logit("OpenMax"), "Bendale & Boult, CVPR 2016"),
    DetectorSpec("ODIN", "images", (), _odin, "Liang et al., ICLR 2018"),
    DetectorSpec("GradNorm", "features", ("features", "head"), _head("GradNorm"), "Huang et al., NeurIPS 2021"),
    DetectorSpec(
        "Mahalanobis", "features", ("features", "fit"), _features_only("Mahalanobis"), "Lee et al., NeurIPS 2018"
    ),
    DetectorSpec("RMDS", "features", ("features", "fit"), _features_only("RMDS"), "Ren et al., 2021"),
    DetectorSpec("KNN", "features", ("features", "fit"), _features_only("KNN", k=50), "Sun et al., ICML 2022"),
    DetectorSpec("ReAct", "features", ("features", "head", "fit"), _head("ReAct"), "Sun et al., NeurIPS 2021"),
    DetectorSpec("DICE", "features", ("features", "head", "fit"), _head("DICE"), "Sun & Li, ECCV 2022"),
    DetectorSpec("ViM", "features", ("features", "head", "fit"), _head("ViM"), "Wang et al., CVPR 2022"),
    DetectorSpec(
        "ASH-P",
        "features",
        ("features", "head"),
        _head("ASH", variant="p", percentile=60.0),
        "Djurisic et al., ICLR 2023",
    ),
    DetectorSpec(
        "ASH-B",
        "features",
        ("features", "head"),
        _head("ASH", variant="b", percentile=65.0),
        "Djurisic et al., ICLR 2023",
    ),
    DetectorSpec(
        "ASH-S",
        "features",
        ("features", "head"),
        _head("ASH", variant="s", percentile=90.0),
        "Djurisic et al., ICLR 2023",
    ),
    DetectorSpec("SCALE", "features", ("features", "head"), _head("SCALE"), "Xu et al., ICLR 2024"),
    DetectorSpec("SHE", "features", ("features", "head", "fit"), _head("SHE"), "Zhang et al., ICLR 2023"),
    DetectorSpec("NNGuide", "features", ("features", "head", "fit"), _head("NNGuide", k=100), "Park et al., ICCV 2023"),
    DetectorSpec("fDBD", "features", ("features", "head", "fit"), _head("FDBD"), "Liu & Qin, ICML 2024"),
    DetectorSpec("RankFeat", "images", ("feature_map", "map_head"), _rankfeat, "Song et al., NeurIPS 2022"),
    DetectorSpec("MCDropout", "images", ("dropout",), _mc_dropout, "Gal & Ghahramani, ICML 2016"),
    DetectorSpec(
        "MahalanobisMultiLayer", "images", ("layers", "fit"), _multilayer_mahalanobis, "Lee et al., NeurIPS 2018"
    ),
    DetectorSpec("Gram", "images", ("layers", "fit"), _gram, "Sastry & Oore, ICML 2020"),
)

DETECTORS: dict[str, DetectorSpec] = {spec.name: spec for spec in _SPECS}
"""Every detector :func:`evaluate_detectors` knows, by name, in table order."""


def _has_dropout(model: Callable[[Tensor], Tensor]) -> bool:
    return isinstance(model, nn.Module) and any(
        isinstance(module, nn.modules.dropout._DropoutNd) for module in model.modules()
    )


def _missing(spec: DetectorSpec, parts: ModelParts, has_fit: bool) -> list[str]:
    missing = []
    for need in spec.needs:
        if need == "fit":
            ok = has_fit
        elif need == "dropout":
            ok = _has_dropout(parts.model)
        else:
            value = getattr(parts, need)
            ok = bool(value) if isinstance(value, tuple) else value is not None
        if not ok:
            missing.append("fit_loader" if need == "fit" else need)
    return missing


def applicable_detectors(parts: ModelParts, *, has_fit_data: bool) -> list[str]:
    """Names of the detectors of :data:`DETECTORS` that ``parts`` (and fit data, if any) make possible.

    Args:
        parts: The model's parts.
        has_fit_data: Whether ID fit data is available.

    Returns:
        The names, in :data:`DETECTORS` order.
    """
    return [name for name, spec in DETECTORS.items() if not _missing(spec, parts, has_fit_data)]


def _resolve_names(detectors: str | Sequence[str], parts: ModelParts, has_fit: bool) -> list[str]:
    if isinstance(detectors, str):
        if detectors != "all":
            raise ValueError(f"detectors must be 'all' or a list of names from {list(DETECTORS)}, got {detectors!r}")
        return applicable_detectors(parts, has_fit_data=has_fit)
    names = list(detectors)
    if not names:
        raise ValueError("detectors is empty: give 'all' or at least one name")
    lookup = {name.lower(): name for name in DETECTORS}
    resolved = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in lookup:
            raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(DETECTORS)}")
        canonical = lookup[name.lower()]
        missing = _missing(DETECTORS[canonical], parts, has_fit)
        if missing:
            raise ValueError(f"detector {canonical!r} needs {', '.join(missing)}, which the call does not provide")
        if canonical in resolved:
            raise ValueError(f"detector {canonical!r} is listed twice")
        resolved.append(canonical)
    return resolved


@dataclass(frozen=True)
class DetectorComparison:
    """The OOD reports of one classifier under several detectors.

    Attributes:
        reports: One :class:`~dreamood.evaluation.OODReport` per detector, by name, in evaluation order.
        id_accuracy: Top-1 accuracy on the ID test set (from the shared logits), or ``None`` without labels.
        detectors: Each detector's ``repr`` (its hyperparameters), by name.
        skipped: The error of each detector that was skipped (``errors="skip"``), by name.
    """

    reports: dict[str, OODReport]
    id_accuracy: float | None = None
    detectors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> OODReport:
        """The report of detector ``name``.

        Raises:
            KeyError: No detector of that name was evaluated.
        """
        if name not in self.reports:
            raise KeyError(f"no detector named {name!r}; evaluated: {list(self.reports)}")
        return self.reports[name]

    @property
    def names(self) -> list[str]:
        """The detector names, in evaluation order."""
        return list(self.reports)

    def to_markdown(self, *, per_set: bool = False) -> str:
        """One markdown table (percentages): a row per detector with its mean over the OOD sets.

        Args:
            per_set: Also give one row per detector and OOD set (before that detector's mean row).

        Returns:
            The markdown text.
        """
        first = next(iter(self.reports.values()))
        names = first.metric_names
        headers = metric_headers(first.tpr)
        header = ["Detector"] + (["OOD set"] if per_set else []) + [headers[name] for name in names]
        lines = [
            f"OOD detection by detector, protocol {first.protocol!r}, {first.n_id} ID test samples, values in %"
            + ("" if first.fpr_rule == "exact" else f", FPR threshold rule {first.fpr_rule!r}")
            + ("" if self.id_accuracy is None else f"; ID accuracy {100 * self.id_accuracy:.2f}%")
            + ".",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        for detector, report in self.reports.items():
            rows = [*report.rows, report.mean] if per_set else [report.mean]
            for row in rows:
                cells = [detector] + ([row.name] if per_set else [])
                for name in names:
                    cell = f"{100 * row.metrics[name]:.2f}"
                    if row.std is not None:
                        cell += f" ± {100 * row.std[name]:.2f}"
                    cells.append(cell)
                lines.append("| " + " | ".join(cells) + " |")
        if self.skipped:
            lines += ["", "Skipped: " + "; ".join(f"{name} ({error})" for name, error in self.skipped.items())]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The comparison as a JSON-serialisable dict (values as fractions).

        Returns:
            A dict with ``id_accuracy``, ``detectors`` (the reprs), ``skipped`` and ``reports`` (each report's
            ``to_dict``).
        """
        return {
            "id_accuracy": self.id_accuracy,
            "detectors": dict(self.detectors),
            "skipped": dict(self.skipped),
            "reports": {name: report.to_dict() for name, report in self.reports.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorComparison:
        """Rebuild a comparison from :meth:`to_dict` output.

        Raises:
            ArtifactError: ``data`` is not a comparison.
        """
        from dreamood.errors import ArtifactError

        try:
            accuracy = data["id_accuracy"]
            return cls(
                reports={str(name): OODReport.from_dict(report) for name, report in data["reports"].items()},
                id_accuracy=None if accuracy is None else float(accuracy),
                detectors={str(k): str(v) for k, v in data["detectors"].items()},
                skipped={str(k): str(v) for k, v in data.get("skipped", {}).items()},
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ArtifactError(f"not a detector comparison ({type(error).__name__}: {error})") from error

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``detectors.md`` (the per-set table) and ``detectors.json`` into ``directory``, atomically.

        Args:
            directory: The output folder (created if needed).

        Returns:
            The paths of the markdown and JSON files.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        markdown, data = folder / "detectors.md", folder / "detectors.json"
        with atomic_write(markdown, "w") as handle:
            handle.write(self.to_markdown(per_set=True))
        with atomic_write(data, "w") as handle:
            handle.write(json.dumps(self.to_dict(), indent=2))
        return markdown, data


@dataclass
class _Outputs:
    logits: Tensor
    features: Tensor | None
    labels: Tensor | None


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    from dreamood.evaluation.evaluator import _split_batch

    inputs, labels = _split_batch(batch)
    return inputs, None if labels is None else torch.as_tensor(labels)


def _forward(parts: ModelParts, loader: Iterable[Any], device: torch.device, desc: str, show: bool) -> _Outputs:
    """Logits, features (when available) and labels (when given) of every sample, on ``device``, in order."""
    logits, features, labels = [], [], []
    with_features = getattr(parts.model, "forward_with_features", None)
    for batch in progress(loader, enabled=show, desc=desc):
        images, batch_labels = _split(batch)
        images = images.to(device)
        if callable(with_features) and parts.features is not None:
            batch_logits, batch_features = with_features(images)
        else:
            batch_logits = parts.model(images)
            batch_features = None if parts.features is None else parts.features(images)
        logits.append(batch_logits.detach())
        if batch_features is not None:
            features.append(batch_features.detach())
        if batch_labels is not None:
            labels.append(batch_labels.to(device))
    if not logits:
        raise ValueError(f"the loader for {desc!r} yielded no batches")
    return _Outputs(
        logits=torch.cat(logits),
        features=torch.cat(features) if features else None,
        labels=torch.cat(labels) if len(labels) == len(logits) else None,
    )


def evaluate_detectors(
    model: nn.Module | Callable[[Tensor], Tensor],
    id_loader: Iterable[Any],
    ood_loaders: Mapping[str, Iterable[Any]],
    *,
    fit_loader: Iterable[Any] | None = None,
    validation_loader: Iterable[Any] | None = None,
    detectors: str | Sequence[str] = "all",
    parts: ModelParts | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    protocol: str = "full",
    repeats: int = 5,
    seed: int = 0,
    tpr: float = 0.95,
    fpr_rule: FprRule = "exact",
    aupr_trapezoid: bool = False,
    device: DeviceLike = None,
    progress_bar: bool = True,
    output_dir: str | os.PathLike[str] | None = None,
    errors: Literal["raise", "skip"] = "raise",
) -> DetectorComparison:
    """Evaluate a trained classifier under every applicable post-hoc detector (or the named ones).

    The network runs once over ``fit_loader``, ``id_loader`` and each OOD loader (in eval mode, without
    gradients) to collect logits and penultimate features; every logit and feature detector is fitted on the
    fit outputs (with their labels) and scores the shared test outputs. Detectors that consume images (ODIN,
    and the multi-layer ones) run over the loaders themselves. Every report uses the same protocol, TPR level,
    FPR rule and subsampling seed, so the rows are comparable.

    Args:
        model: The classifier (images -> logits); a :class:`~dreamood.models.Classifier` gives every part.
        id_loader: ID test batches, ``images`` or ``(images, labels)`` (labels give the ID accuracy).
        ood_loaders: OOD test loaders by name.
        fit_loader: ID data to fit detectors on, ``(images, labels)`` batches (usually the training set, without
            augmentation). Without it only detectors that learn nothing are applicable.
        validation_loader: Held-out ID ``(images, labels)`` batches (not the test set). When given, the detectors
            their papers fit on held-out data (temperature scaling, KL-Matching) are fitted on it instead of
            ``fit_loader``, and ``Gram`` normalises each layer's deviation by its mean on it.
        detectors: ``"all"`` (every applicable detector of :data:`DETECTORS`) or a list of names
            (case-insensitive); a named detector whose needs are not met is an error.
        parts: The model's parts; default :meth:`ModelParts.from_classifier` of ``model`` (or only the model
            itself when it is not a module).
        options: Keyword arguments per detector name overriding the defaults, e.g. ``{"ReAct": {"percentile":
            95}}``.
        protocol: ``"full"`` or ``"paper"``, as in :class:`~dreamood.evaluation.OODEvaluator`.
        repeats: Subsamples per OOD set for the ``"paper"`` protocol.
        seed: Seed of the ``"paper"`` protocol's subsampling.
        tpr: TPR level of the FPR metrics.
        fpr_rule: ``"exact"`` or ``"nearest"`` (see :func:`~dreamood.evaluation.ood_metrics`).
        aupr_trapezoid: Also report the trapezoid-rule AUPRs.
        device: Where the network runs (``None``: the device of the model's first parameter, else CUDA when
            available).
        progress_bar: Show progress bars.
        output_dir: When given, ``detectors.md`` and ``detectors.json`` are written there.
        errors: ``"raise"`` (default): a detector that fails to fit or score stops the call; ``"skip"``: it is
            left out of the table and its error recorded in ``DetectorComparison.skipped`` (useful with
            ``"all"``, e.g. OpenMax on a class with too few correctly classified fit samples).

    Returns:
        The comparison: one report per detector, in :data:`DETECTORS` order (or the order given).

    Raises:
        TypeError: ``ood_loaders`` is not a mapping, or a batch has an unexpected form.
        ValueError: ``detectors`` names an unknown detector, one whose needs are not met, or one twice;
            ``options`` names a detector not evaluated; a loader is empty; a detector's fit fails.
    """
    from dreamood.detectors.base import eval_mode
    from dreamood.evaluation.evaluator import OODEvaluator, _check_names, _module_device

    _check_names(ood_loaders, "ood_loaders")
    check_choice(errors, ("raise", "skip"), "errors")
    if parts is None:
        parts = ModelParts.from_classifier(model) if isinstance(model, nn.Module) else ModelParts(model=model)
    has_fit = fit_loader is not None
    names = _resolve_names(detectors, parts, has_fit)
    options = dict(options or {})
    unknown = [name for name in options if name not in names]
    if unknown:
        raise ValueError(f"options name detectors that are not evaluated: {unknown}; evaluated: {names}")
    if device is None:
        inferred = _module_device(parts.model)
        target = inferred if inferred is not None else resolve_device(None)
    else:
        target = resolve_device(device)
    settings: dict[str, Any] = {
        "protocol": protocol,
        "repeats": repeats,
        "seed": seed,
        "tpr": tpr,
        "fpr_rule": fpr_rule,
        "aupr_trapezoid": aupr_trapezoid,
        "progress": progress_bar,
        "device": target,
    }
    evaluator = OODEvaluator(lambda x: x, **settings)  # validates the settings before any pass over the data

    shared = [DETECTORS[name] for name in names if DETECTORS[name].inputs != "images"]
    need_fit_outputs = any("fit" in spec.needs for spec in shared)
    with torch.no_grad(), eval_mode(parts.model):
        fit = None
        if fit_loader is not None and need_fit_outputs:
            fit = _forward(parts, fit_loader, target, "fit data", progress_bar)
        held_out = None
        if validation_loader is not None and any(spec.held_out for spec in shared):
            held_out = _forward(parts, validation_loader, target, "validation data", progress_bar)
        test = _forward(parts, id_loader, target, "ID test", progress_bar)
        ood = {name: _forward(parts, loader, target, name, progress_bar) for name, loader in ood_loaders.items()}

    id_accuracy = None
    if test.labels is not None:
        id_accuracy = float((test.logits.argmax(dim=1) == test.labels).to(torch.float64).mean())
    n_fit = 0 if fit is None else fit.logits.shape[0]

    def run(name: str) -> tuple[OODReport, str]:
        spec = DETECTORS[name]
        detector = spec.build(parts, n_fit, options.get(name, {}))
        logger.info("[detectors] evaluating %s", name)
        if spec.inputs == "images":
            if "fit" in spec.needs:
                assert fit_loader is not None
                fit_images = getattr(detector, "fit_loader", None)
                if not callable(fit_images):
                    raise TypeError(f"{name} consumes images and must have a fit_loader method")
                with eval_mode(parts.model):
                    fit_images(fit_loader)
                    normalizer = getattr(detector, "fit_normalizer", None)
                    if validation_loader is not None and callable(normalizer):
                        normalizer(validation_loader)
            with eval_mode(parts.model):
                report = OODEvaluator(detector, accuracy=False, **settings).evaluate(id_loader, ood_loaders)
        else:
            key = "logits" if spec.inputs == "logits" else "features"
            if "fit" in spec.needs:
                source = held_out if spec.held_out and held_out is not None else fit
                assert source is not None
                detector.fit(getattr(source, key), source.labels)
            id_scores = detector.score(getattr(test, key)).cpu()
            ood_scores = {set_name: detector.score(getattr(out, key)).cpu() for set_name, out in ood.items()}
            report = evaluator.evaluate_scores(id_scores, ood_scores)
        return report, repr(detector)

    reports: dict[str, OODReport] = {}
    reprs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            report, reprs[name] = run(name)
        except (ValueError, TypeError, RuntimeError) as error:
            if errors == "raise":
                raise
            skipped[name] = f"{type(error).__name__}: {error}"
            logger.warning("[detectors] %s skipped: %s", name, skipped[name])
            continue
        reports[name] = replace(report, id_accuracy=id_accuracy)
    if not reports:
        raise ValueError(f"every detector failed: {skipped}")
    comparison = DetectorComparison(reports=reports, id_accuracy=id_accuracy, detectors=reprs, skipped=skipped)
    if output_dir is not None:
        comparison.write(output_dir)
    return comparison
