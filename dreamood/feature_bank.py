"""The feature bank: L2-normalised in-distribution embeddings with their labels (DREAM-OOD step 2).

Phase 2 samplers read it to find the low-density boundary of each class.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import as_tensor, check_finite, check_floating, check_positive_int, check_rank
from dreamood.errors import ArtifactError
from dreamood.io import load_artifact, save_artifact

if TYPE_CHECKING:
    from dreamood.protocols import Embedder

__all__ = ["FeatureBank"]


class FeatureBank:
    """In-distribution embeddings ``(N, m)`` and their class labels ``(N,)``.

    Args:
        embeddings: Floating-point, finite embeddings of shape ``(N, m)``. Samplers expect them
            L2-normalised (see :attr:`is_normalized` and :meth:`normalized`).
        labels: Integer class labels of shape ``(N,)`` in ``[0, num_classes)``.
        num_classes: Number of classes; defaults to ``labels.max() + 1``. Every class must have at least
            one embedding.

    Raises:
        ValueError: Shapes disagree, labels are out of range, or a class has no embedding.
        NonFiniteError: An embedding contains NaN or infinity.
    """

    def __init__(self, embeddings: Tensor, labels: Tensor, *, num_classes: int | None = None) -> None:
        features = as_tensor(embeddings, "embeddings")
        targets = as_tensor(labels, "labels")
        check_rank(features, 2, "embeddings", "(num_samples, embedding_dim)")
        check_floating(features, "embeddings")
        check_rank(targets, 1, "labels", "(num_samples,)")
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {targets.dtype}")
        if features.shape[0] == 0:
            raise ValueError("embeddings is empty: a feature bank needs at least one embedding")
        if features.shape[0] != targets.shape[0]:
            raise ValueError(f"embeddings has {features.shape[0]} rows but labels has {targets.shape[0]}")
        check_finite(features, "embeddings")
        targets = targets.to(device=features.device, dtype=torch.long)
        low, high = int(targets.min()), int(targets.max())
        classes = high + 1 if num_classes is None else num_classes
        check_positive_int(classes, "num_classes")
        if low < 0 or high >= classes:
            raise ValueError(f"labels must lie in [0, {classes}), got values from {low} to {high}")
        counts = torch.bincount(targets, minlength=classes)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no embedding in the bank")
        self.embeddings: Tensor = features.detach()
        self.labels: Tensor = targets
        self.num_classes: int = classes

    @property
    def dim(self) -> int:
        """Embedding dimension ``m``."""
        return int(self.embeddings.shape[1])

    @property
    def device(self) -> torch.device:
        """Device the embeddings live on."""
        return self.embeddings.device

    @property
    def class_counts(self) -> Tensor:
        """Number of embeddings of each class, shape ``(num_classes,)``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def is_normalized(self, atol: float = 1e-4) -> bool:
        """Whether every embedding has unit L2 norm within ``atol``."""
        norms = self.embeddings.double().norm(dim=1)
        return bool(torch.all((norms - 1.0).abs() <= atol))

    def normalized(self) -> FeatureBank:
        """Return a bank with every embedding scaled to unit L2 norm."""
        return FeatureBank(
            torch.nn.functional.normalize(self.embeddings, dim=1), self.labels, num_classes=self.num_classes
        )

    def indices_of(self, class_index: int) -> Tensor:
        """Global row indices of the embeddings of class ``class_index``."""
        if not 0 <= class_index < self.num_classes:
            raise ValueError(f"class_index must lie in [0, {self.num_classes}), got {class_index}")
        return torch.nonzero(self.labels == class_index).flatten()

    def per_class(self, class_index: int) -> Tensor:
        """The embeddings of class ``class_index``, shape ``(n_c, m)``."""
        return self.embeddings[self.indices_of(class_index)]

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        return f"FeatureBank(num_samples={len(self)}, dim={self.dim}, num_classes={self.num_classes})"

    def to(self, device: DeviceLike = None, dtype: torch.dtype | None = None) -> FeatureBank:
        """Return a copy on ``device`` (and in ``dtype`` when given)."""
        return FeatureBank(
            self.embeddings.to(device=device, dtype=dtype), self.labels.to(device), num_classes=self.num_classes
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as safetensors plus a JSON sidecar; returns the tensor file's path."""
        metadata: dict[str, Any] = {"num_classes": self.num_classes, "num_samples": len(self), "dim": self.dim}
        return save_artifact(path, {"embeddings": self.embeddings, "labels": self.labels}, metadata, kind="FeatureBank")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: DeviceLike = "cpu") -> FeatureBank:
        """Load a bank written by :meth:`save`.

        Raises:
            FileNotFoundError: The file or its sidecar is missing.
            ArtifactError: The files are corrupt or hold another kind of artefact.
        """
        tensors, metadata = load_artifact(path, kind="FeatureBank")
        try:
            return cls(
                tensors["embeddings"].to(device),
                tensors["labels"].to(device),
                num_classes=int(metadata["num_classes"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"FeatureBank artefact {path} is inconsistent: {error}") from error

    @classmethod
    @torch.no_grad()
    def from_encoder(
        cls,
        encoder: Embedder,
        loader: Iterable[Any],
        *,
        num_classes: int | None = None,
        max_per_class: int | None = None,
        device: DeviceLike = None,
        show_progress: bool = True,
    ) -> FeatureBank:
        """Embed a dataset with ``encoder`` and keep the L2-normalised embeddings with their labels.

        The encoder runs in eval mode (its previous mode is restored afterwards). dreamood's pipelines pass
        the un-augmented training images in dataset order; the authors' code embeds augmented (random crop and
        flip), shuffled training images instead (the ``bank.augment`` and ``bank.shuffle`` options). The paper
        does not say which.

        Args:
            encoder: Any object with ``embed(images) -> (N, m)``, e.g. a ``TextConditionedEncoder``.
            loader: Iterable of ``(images, labels)`` batches.
            num_classes: Number of classes (defaults to the largest label + 1).
            max_per_class: Keep at most this many embeddings per class (the first ones seen).
            device: Device to run the encoder on (default: CUDA when available).
            show_progress: Show a progress bar.
        """
        if max_per_class is not None:
            check_positive_int(max_per_class, "max_per_class")
        run_device = resolve_device(device)
        module = encoder if isinstance(encoder, torch.nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        chunks: list[Tensor] = []
        label_chunks: list[Tensor] = []
        kept: dict[int, int] = {}
        try:
            for batch in progress(loader, enabled=show_progress, desc="feature bank"):
                images, labels = batch[0], batch[1]
                labels = torch.as_tensor(labels).long()
                z = torch.nn.functional.normalize(encoder.embed(images.to(run_device)).float(), dim=1).cpu()
                if max_per_class is not None:
                    keep = torch.zeros(len(labels), dtype=torch.bool)
                    for row, label in enumerate(labels.tolist()):
                        if kept.get(label, 0) < max_per_class:
                            kept[label] = kept.get(label, 0) + 1
                            keep[row] = True
                    z, labels = z[keep], labels[keep]
                chunks.append(z)
                label_chunks.append(labels)
        finally:
            if module is not None:
                module.train(was_training)
        if not chunks:
            raise ValueError("loader yielded no batch: cannot build an empty feature bank")
        return cls(torch.cat(chunks), torch.cat(label_chunks), num_classes=num_classes)
