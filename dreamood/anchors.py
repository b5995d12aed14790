"""Class anchors T(y): one token embedding per in-distribution class (DREAM-OOD step 1).

For Stable Diffusion v1.x the anchor of a class is the class name's row of the CLIP ViT-L/14 *input*
token-embedding table (768-d), not the text encoder's output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import as_tensor, check_class_names, check_finite, check_floating, check_rank
from dreamood.errors import ArtifactError
from dreamood.io import load_artifact, save_artifact

__all__ = ["TokenEmbeddings"]


class TokenEmbeddings:
    """The anchors T(y): a named table of one embedding vector per class.

    Args:
        class_names: Class names, indexed by label; non-empty, unique, no empty strings.
        vectors: Anchor vectors of shape ``(C, m)``, one row per class, floating point and finite.
        token_ids: The tokenizer ids each anchor was taken from (one list per class), when known.
        policy: How multi-token names were reduced to one vector (``"mean"``, ``"first"``), or
            ``"given"`` for vectors supplied directly.

    Attributes:
        class_names: The class names.
        vectors: The ``(C, m)`` tensor of anchors.
        token_ids: Per-class token ids (empty lists when unknown).
        policy: The sub-word policy used.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        vectors: Tensor,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
        policy: str = "given",
    ) -> None:
        names = check_class_names(class_names)
        table = as_tensor(vectors, "vectors")
        check_rank(table, 2, "vectors", "(num_classes, embedding_dim)")
        check_floating(table, "vectors")
        check_finite(table, "vectors")
        if table.shape[0] != len(names):
            raise ValueError(f"vectors has {table.shape[0]} rows but there are {len(names)} class names")
        if table.shape[1] == 0:
            raise ValueError("vectors has embedding dimension 0")
        ids = [list(map(int, t)) for t in token_ids] if token_ids is not None else [[] for _ in names]
        if len(ids) != len(names):
            raise ValueError(f"token_ids has {len(ids)} entries but there are {len(names)} class names")
        self.class_names: list[str] = names
        self.vectors: Tensor = table.detach()
        self.token_ids: list[list[int]] = ids
        self.policy: str = policy

    @property
    def norms(self) -> Tensor:
        """L2 norm of each anchor, shape ``(C,)``."""
        norms: Tensor = self.vectors.norm(dim=1)
        return norms

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_names)

    @property
    def dim(self) -> int:
        """Embedding dimension ``m``."""
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        """Device the vectors live on."""
        return self.vectors.device

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return f"TokenEmbeddings(num_classes={self.num_classes}, dim={self.dim}, policy={self.policy!r})"

    def to(self, device: DeviceLike = None, dtype: torch.dtype | None = None) -> TokenEmbeddings:
        """Return a copy with the vectors on ``device`` (and in ``dtype`` when given)."""
        return TokenEmbeddings(
            self.class_names,
            self.vectors.to(device=device, dtype=dtype),
            token_ids=self.token_ids,
            policy=self.policy,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as ``path`` (safetensors) plus a JSON sidecar; returns the tensor file's path."""
        metadata: dict[str, Any] = {
            "class_names": self.class_names,
            "token_ids": self.token_ids,
            "policy": self.policy,
        }
        return save_artifact(path, {"vectors": self.vectors}, metadata, kind="TokenEmbeddings")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: DeviceLike = "cpu") -> TokenEmbeddings:
        """Load anchors written by :meth:`save`.

        Raises:
            FileNotFoundError: The file or its sidecar is missing.
            ArtifactError: The files are corrupt or hold another kind of artefact.
        """
        tensors, metadata = load_artifact(path, kind="TokenEmbeddings")
        try:
            return cls(
                metadata["class_names"],
                tensors["vectors"].to(device),
                token_ids=metadata.get("token_ids"),
                policy=str(metadata.get("policy", "given")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"TokenEmbeddings artefact {path} is inconsistent: {error}") from error
