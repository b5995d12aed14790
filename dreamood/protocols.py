"""The interfaces through which dreamood's parts meet, so any of them can be swapped for your own.

These are :class:`typing.Protocol` classes: a class satisfies one by having the methods, with no need to
inherit from anything. ``isinstance(obj, EmbeddingSampler)`` works at run time (it checks the method names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.feature_bank import FeatureBank
    from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "AnchorSource",
    "Embedder",
    "EmbeddingDecoder",
    "EmbeddingSampler",
    "FeatureOutlierSampler",
    "Scorer",
]


@runtime_checkable
class Embedder(Protocol):
    """Maps a batch of images to L2-normalised embeddings ``(N, m)`` (for example a TextConditionedEncoder)."""

    def embed(self, images: Tensor) -> Tensor:
        """Return the L2-normalised embeddings of ``images``."""
        ...


@runtime_checkable
class AnchorSource(Protocol):
    """Gives the class anchors T(y) for a list of class names (step 1 of DREAM-OOD).

    A callable: for example the rows of a text encoder's token table
    (:meth:`~dreamood.anchors.TokenEmbeddings.from_pretrained` with the names filled in), or a decoder's learned
    class embeddings (``lambda names: decoder.token_embeddings``).
    """

    def __call__(self, class_names: Sequence[str]) -> TokenEmbeddings:
        """Return one anchor per name of ``class_names``, in that order."""
        ...


@runtime_checkable
class EmbeddingSampler(Protocol):
    """Draws new embeddings (outliers or inliers) from a feature bank and the class anchors (Phase 2)."""

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Return ``num_per_class`` sampled embeddings for every class of ``anchors``."""
        ...


@runtime_checkable
class EmbeddingDecoder(Protocol):
    """Renders sampled embeddings as images (step 4 of DREAM-OOD).

    ``decode`` returns images in ``[0, 1]`` of shape ``(B, 3, H, W)``. One seed per image: the same
    ``(vector, label, seed)`` must give the same image whatever batch it is decoded in.
    """

    @property
    def embedding_dim(self) -> int:
        """Dimension ``m`` of the vectors the decoder accepts."""
        ...

    @property
    def class_names(self) -> Sequence[str]:
        """Names of the classes, indexed by label."""
        ...

    def decode(self, vectors: Tensor, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """Decode ``vectors`` ``(B, m)`` of classes ``labels`` ``(B,)`` with one seed per image."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Any callable mapping a batch to OOD scores of shape ``(N,)``, higher = more in-distribution."""

    def __call__(self, batch: Tensor) -> Tensor:
        """Score ``batch``."""
        ...


@runtime_checkable
class FeatureOutlierSampler(Protocol):
    """A step-wise outlier synthesiser in a network's feature space (VOS, NPOS), usable in any training loop.

    Call ``update`` with each batch's penultimate features and labels; once ``ready`` is true, ``sample``
    returns virtual outlier features to regularise the classifier with.
    """

    @property
    def ready(self) -> bool:
        """Whether enough features have been seen to draw outliers."""
        ...

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of in-distribution features ``(N, d)`` with their labels ``(N,)``."""
        ...

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Return outlier features ``(M, d)``."""
        ...
