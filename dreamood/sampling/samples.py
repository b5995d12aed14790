"""EmbeddingSamples: the embeddings a Phase 2 sampler produced, with where each one came from."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import as_tensor, check_finite, check_floating, check_positive_int, check_rank
from dreamood.errors import ArtifactError
from dreamood.io import load_artifact, save_artifact

__all__ = ["EmbeddingSamples"]


class EmbeddingSamples:
    """Sampled embeddings ``(M, m)``, their class labels, and per-row provenance.

    The whole set lives in memory once (load it once, then index or iterate in batches); nothing is
    re-read from disk per batch.

    Args:
        vectors: Sampled embeddings, shape ``(M, m)``, finite.
        labels: Class of each row (the class whose anchor and bank it was sampled from), shape ``(M,)``.
        anchor_index: Global row index into the feature bank of the anchor each vector was drawn
            around, or ``-1`` where there is none (e.g. noise around T(y)). Defaults to all ``-1``.
        knn_distance: k-th nearest-neighbour distance of each (normalised) candidate to the bank, as
            measured by the sampler, or ``None`` when the sampler does not measure one.
        config: The sampler's name and parameters (JSON-serialisable), kept as provenance.
        class_names: Names of the classes, when known.
    """

    def __init__(
        self,
        vectors: Tensor,
        labels: Tensor,
        *,
        anchor_index: Tensor | None = None,
        knn_distance: Tensor | None = None,
        config: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        table = as_tensor(vectors, "vectors")
        check_rank(table, 2, "vectors", "(num_samples, embedding_dim)")
        check_floating(table, "vectors")
        check_finite(table, "vectors")
        rows = int(table.shape[0])
        targets = as_tensor(labels, "labels")
        check_rank(targets, 1, "labels", "(num_samples,)")
        if targets.is_floating_point():
            raise TypeError(f"labels must be an integer tensor, got {targets.dtype}")
        if targets.shape[0] != rows:
            raise ValueError(f"labels has {targets.shape[0]} entries but vectors has {rows} rows")
        if rows and int(targets.min()) < 0:
            raise ValueError(f"labels must be class indices >= 0, got {int(targets.min())}")
        if class_names is not None and rows and int(targets.max()) >= len(class_names):
            raise ValueError(
                f"labels must be below the number of class names ({len(class_names)}), got label {int(targets.max())}"
            )
        if anchor_index is None:
            anchors = torch.full((rows,), -1, dtype=torch.long, device=table.device)
        else:
            anchors = as_tensor(anchor_index, "anchor_index").to(device=table.device, dtype=torch.long)
            if anchors.shape != (rows,):
                raise ValueError(f"anchor_index must have shape ({rows},), got {tuple(anchors.shape)}")
        distances: Tensor | None = None
        if knn_distance is not None:
            distances = as_tensor(knn_distance, "knn_distance").to(table.device)
            if distances.shape != (rows,):
                raise ValueError(f"knn_distance must have shape ({rows},), got {tuple(distances.shape)}")
            check_finite(distances, "knn_distance")
        self.vectors: Tensor = table.detach()
        self.labels: Tensor = targets.to(device=table.device, dtype=torch.long)
        self.anchor_index: Tensor = anchors
        self.knn_distance: Tensor | None = distances
        self.config: dict[str, Any] = dict(config or {})
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None

    @property
    def dim(self) -> int:
        """Embedding dimension ``m``."""
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        """Device the vectors live on."""
        return self.vectors.device

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def __repr__(self) -> str:
        sampler = self.config.get("sampler", "unknown")
        return f"EmbeddingSamples(num_samples={len(self)}, dim={self.dim}, sampler={sampler!r})"

    def __getitem__(self, index: int | slice | Tensor) -> EmbeddingSamples:
        """Rows selected by an int, a slice, an index tensor or a boolean mask, as a new EmbeddingSamples."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return EmbeddingSamples(
            self.vectors[index],
            self.labels[index],
            anchor_index=self.anchor_index[index],
            knn_distance=None if self.knn_distance is None else self.knn_distance[index],
            config=self.config,
            class_names=self.class_names,
        )

    def for_class(self, class_index: int) -> EmbeddingSamples:
        """The rows sampled for class ``class_index``."""
        return self[self.labels == class_index]

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate over ``(vectors, labels)`` in consecutive batches of at most ``batch_size`` rows."""
        check_positive_int(batch_size, "batch_size")
        for start in range(0, len(self), batch_size):
            yield self.vectors[start : start + batch_size], self.labels[start : start + batch_size]

    def to(self, device: DeviceLike = None, dtype: torch.dtype | None = None) -> EmbeddingSamples:
        """Return a copy on ``device`` (and with vectors in ``dtype`` when given)."""
        return EmbeddingSamples(
            self.vectors.to(device=device, dtype=dtype),
            self.labels.to(device),
            anchor_index=self.anchor_index.to(device),
            knn_distance=None if self.knn_distance is None else self.knn_distance.to(device),
            config=self.config,
            class_names=self.class_names,
        )

    @classmethod
    def concat(cls, parts: Sequence[EmbeddingSamples]) -> EmbeddingSamples:
        """Concatenate several sample sets (the config and class names of the first are kept)."""
        if not parts:
            raise ValueError("parts is empty: nothing to concatenate")
        distances = None
        if all(p.knn_distance is not None for p in parts):
            distances = torch.cat([p.knn_distance for p in parts if p.knn_distance is not None])
        return cls(
            torch.cat([p.vectors for p in parts]),
            torch.cat([p.labels for p in parts]),
            anchor_index=torch.cat([p.anchor_index for p in parts]),
            knn_distance=distances,
            config=parts[0].config,
            class_names=parts[0].class_names,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as safetensors plus a JSON sidecar (config, class names); returns the tensor file's path."""
        tensors = {"vectors": self.vectors, "labels": self.labels, "anchor_index": self.anchor_index}
        if self.knn_distance is not None:
            tensors["knn_distance"] = self.knn_distance
        metadata = {"config": self.config, "class_names": self.class_names, "num_samples": len(self)}
        return save_artifact(path, tensors, metadata, kind="EmbeddingSamples")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: DeviceLike = "cpu") -> EmbeddingSamples:
        """Load samples written by :meth:`save` (once; index or iterate the result in memory).

        Raises:
            FileNotFoundError: The file or its sidecar is missing.
            ArtifactError: The files are corrupt or hold another kind of artefact.
        """
        tensors, metadata = load_artifact(path, kind="EmbeddingSamples")
        try:
            distances = tensors.get("knn_distance")
            return cls(
                tensors["vectors"].to(device),
                tensors["labels"].to(device),
                anchor_index=tensors["anchor_index"].to(device),
                knn_distance=None if distances is None else distances.to(device),
                config=metadata.get("config") or {},
                class_names=metadata.get("class_names"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"EmbeddingSamples artefact {path} is inconsistent: {error}") from error
