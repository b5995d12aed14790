"""The alternative outlier embeddings of DREAM-OOD's Table 2, each an :class:`~dreamood.protocols.EmbeddingSampler`.

Du et al., "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023, Table 2 compares
the k-NN boundary sampler with four simpler ways to make outlier token embeddings:

* (I) :class:`GaussianTokenNoiseSampler`: Gaussian noise added to the class token ``T(y)``;
* (II) :class:`LearnableNoiseSampler`: noise on ``T(y)`` optimised to point away from the class's ID embeddings;
* (III) :class:`TokenInterpolationSampler`: ``a * T(y1) + (1 - a) * T(y2)`` for two distinct classes;
* (IV) :class:`DisjointClassSampler`: token embeddings of class names outside the ID label set.

None of them draws around a bank point, so ``anchor_index`` is ``-1`` on every row. The label of a row is the
ID class whose prompt slot the vector fills when it is decoded. When no generator is passed, each sampler uses
a fresh generator seeded with its ``seed``, so repeated calls return the same samples.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import check_positive, check_positive_int
from dreamood.anchors import TokenEmbeddings
from dreamood.feature_bank import FeatureBank
from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "DisjointClassSampler",
    "GaussianTokenNoiseSampler",
    "LearnableNoiseSampler",
    "TokenInterpolationSampler",
    "disjoint_class_names",
]


class GaussianTokenNoiseSampler:
    """Table 2 (I): ``T(y) + noise_std * eps`` with ``eps ~ N(0, I)``.

    The paper's text calls 0.03 a variance, while its public code multiplies ``N(0, I)`` by 0.03, which makes
    0.03 a standard deviation. This class follows the code: ``noise_std`` is the standard deviation of every
    coordinate (in ``m`` dimensions the noise norm is about ``noise_std * sqrt(m)``). The vectors are not
    rescaled.

    Args:
        noise_std: Standard deviation of the per-coordinate Gaussian noise (not a variance).
        seed: Seed of the generator used when :meth:`sample` gets none.
        device: Where to compute; ``None`` means the device of the anchors.

    Raises:
        ValueError: If ``noise_std`` is not a finite positive number.
    """

    def __init__(self, noise_std: float = 0.03, *, seed: int = 0, device: DeviceLike = None) -> None:
        check_positive(noise_std, "noise_std")
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.device = device

    def __repr__(self) -> str:
        return f"GaussianTokenNoiseSampler(noise_std={self.noise_std}, seed={self.seed})"

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Draw ``num_per_class`` noisy copies of every class token.

        Args:
            bank: The ID feature bank (only checked for consistency with ``anchors``; the noise ignores it).
            anchors: The class tokens ``T(y)``.
            num_per_class: Number of vectors per class.
            generator: Source of randomness; ``None`` uses a generator seeded with ``seed``.

        Returns:
            ``C * num_per_class`` vectors, grouped by class (class 0 first), with labels ``y``.

        Raises:
            TypeError: If ``bank`` or ``anchors`` has the wrong type, or ``num_per_class`` is not an int.
            ValueError: If ``num_per_class`` is not positive or the bank and anchors disagree.
        """
        _check_sample_args(bank, anchors, num_per_class)
        device = _compute_device(self.device, anchors)
        tokens = anchors.vectors.to(device)
        labels = torch.arange(anchors.num_classes, device=device).repeat_interleave(num_per_class)
        noise = _standard_normal((len(labels), anchors.dim), _generator(generator, self.seed), device, tokens.dtype)
        vectors = tokens[labels] + self.noise_std * noise
        return EmbeddingSamples(
            vectors,
            labels,
            config={"sampler": type(self).__name__, "noise_std": self.noise_std, "seed": self.seed},
            class_names=anchors.class_names,
        )


class LearnableNoiseSampler:
    """Table 2 (II): noise on ``T(y)`` optimised so that its direction points away from the class's ID embeddings.

    The noise is measured in units of the token norm, so the settings do not depend on the scale of the
    token table: for class ``y`` with unit token ``t = T(y) / ||T(y)||`` and L2-normalised bank embeddings
    ``Z_y``, ``num_per_class`` noise vectors ``r_j`` start at ``init_scale * eps / sqrt(m)``, ``eps ~ N(0, I)``
    (norm about ``init_scale``), and ``steps`` Adam steps (learning rate ``lr``) minimise

        ``L = mean_j [ mean_{z in kNN(u_j)} cos(u_j, z) + norm_penalty * ||r_j||^2 ]``,
        ``u_j = (t + r_j) / ||t + r_j||``,

    where ``kNN(u_j)`` are the ``num_neighbors`` embeddings of ``Z_y`` most similar to ``u_j``. After every
    step each ``r_j`` is projected back onto the ball ``||r_j|| <= max_norm``. For unit vectors
    ``||u - z||^2 = 2 - 2 cos(u, z)``, so the first term maximises the mean squared distance to the nearest ID
    embeddings. The returned vector is ``u_j * ||T(y)||``, i.e. ``T(y) + delta_j`` with
    ``delta_j = ||T(y)|| * r_j``, rescaled to the norm of the class token.

    The paper gives no objective or settings for this variant; the ones here are ours. Without the norm bound
    the optimum is the antipode ``-T(y)``: every sample collapses onto it. ``max_norm = 1`` lets the direction
    turn by at most 90 degrees; a long optimisation (large ``lr * steps``) still drives all samples of a class
    towards one direction, so the defaults stop early enough to keep the random initialisations diverse.

    Args:
        num_neighbors: Number ``k`` of most similar bank embeddings whose cosine similarity is minimised
            (``1`` minimises the maximum similarity).
        max_norm: Bound on ``||r_j||`` (noise norm relative to ``||T(y)||``), or ``None`` for no bound.
        norm_penalty: Weight of ``||r_j||^2`` in the loss.
        init_scale: Norm of the initial noise, relative to ``||T(y)||``.
        lr: Adam learning rate.
        steps: Number of Adam steps per class.
        seed: Seed of the generator used when :meth:`sample` gets none.
        device: Where to compute; ``None`` means the device of the anchors.
        show_progress: Show a progress bar over the classes.

    Raises:
        TypeError: If an integer argument is not an int.
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_neighbors: int = 5,
        max_norm: float | None = 1.0,
        norm_penalty: float = 0.1,
        init_scale: float = 0.5,
        lr: float = 1e-3,
        steps: int = 100,
        *,
        seed: int = 0,
        device: DeviceLike = None,
        show_progress: bool = True,
    ) -> None:
        check_positive_int(num_neighbors, "num_neighbors")
        if max_norm is not None:
            check_positive(max_norm, "max_norm")
        check_positive(norm_penalty, "norm_penalty", allow_zero=True)
        check_positive(init_scale, "init_scale")
        check_positive(lr, "lr")
        check_positive_int(steps, "steps")
        self.num_neighbors = num_neighbors
        self.max_norm = None if max_norm is None else float(max_norm)
        self.norm_penalty = float(norm_penalty)
        self.init_scale = float(init_scale)
        self.lr = float(lr)
        self.steps = steps
        self.seed = int(seed)
        self.device = device
        self.show_progress = show_progress

    def __repr__(self) -> str:
        return (
            f"LearnableNoiseSampler(num_neighbors={self.num_neighbors}, max_norm={self.max_norm}, "
            f"norm_penalty={self.norm_penalty}, init_scale={self.init_scale}, lr={self.lr}, steps={self.steps}, "
            f"seed={self.seed})"
        )

    def objective(self, noise: Tensor, unit_token: Tensor, class_bank: Tensor) -> Tensor:
        """The loss of every noise vector of one class (see the class documentation).

        Args:
            noise: Relative noise vectors ``r`` of shape ``(n, m)``.
            unit_token: The class token divided by its norm, shape ``(m,)``.
            class_bank: The class's L2-normalised bank embeddings, shape ``(n_y, m)``.

        Returns:
            The loss of every noise vector, shape ``(n,)``.
        """
        directions = torch.nn.functional.normalize(unit_token + noise, dim=1)
        similarity = directions @ class_bank.T
        nearest = similarity.topk(self.num_neighbors, dim=1).values.mean(dim=1)
        loss: Tensor = nearest + self.norm_penalty * noise.pow(2).sum(dim=1)
        return loss

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Optimise ``num_per_class`` noise vectors per class and return the noisy tokens.

        Args:
            bank: The ID feature bank, in the anchors' space (normalised here when it is not already).
            anchors: The class tokens ``T(y)``.
            num_per_class: Number of vectors per class.
            generator: Source of randomness for the initial noise; ``None`` uses a generator seeded with ``seed``.

        Returns:
            ``C * num_per_class`` vectors grouped by class, with labels ``y`` and, as ``knn_distance``, the
            Euclidean distance of each learned direction ``u_j`` to its ``num_neighbors``-th nearest
            embedding of the class.

        Raises:
            TypeError: If ``bank`` or ``anchors`` has the wrong type, or ``num_per_class`` is not an int.
            ValueError: If ``num_per_class`` is not positive, the bank and anchors disagree, or a class has
                fewer than ``num_neighbors`` bank embeddings.
        """
        from dreamood.knn import kth_neighbor_distance

        _check_sample_args(bank, anchors, num_per_class)
        smallest = int(bank.class_counts.min())
        if smallest < self.num_neighbors:
            raise ValueError(
                f"num_neighbors={self.num_neighbors} exceeds the size of the smallest class in the bank ({smallest})"
            )
        device = _compute_device(self.device, anchors)
        rng = _generator(generator, self.seed)
        tokens = anchors.vectors.to(device=device, dtype=torch.float32)
        embeddings = torch.nn.functional.normalize(bank.embeddings.to(device=device, dtype=torch.float32), dim=1)
        labels = bank.labels.to(device)
        vectors: list[Tensor] = []
        distances: list[Tensor] = []
        classes = progress(
            range(anchors.num_classes), enabled=self.show_progress, desc="learnable noise", total=anchors.num_classes
        )
        for class_index in classes:
            token, class_bank = tokens[class_index], embeddings[labels == class_index]
            unit_token = token / token.norm()
            scale = self.init_scale / anchors.dim**0.5
            noise = scale * _standard_normal((num_per_class, anchors.dim), rng, device, torch.float32)
            noise.requires_grad_(True)
            optimizer = torch.optim.Adam([noise], lr=self.lr)
            with torch.enable_grad():
                for _ in range(self.steps):
                    optimizer.zero_grad(set_to_none=True)
                    torch.autograd.backward(self.objective(noise, unit_token, class_bank).mean())
                    optimizer.step()
                    if self.max_norm is not None:
                        with torch.no_grad():
                            noise.mul_((self.max_norm / noise.norm(dim=1, keepdim=True)).clamp(max=1.0))
            directions = torch.nn.functional.normalize(unit_token + noise.detach(), dim=1)
            vectors.append(directions * token.norm())
            distances.append(kth_neighbor_distance(directions, class_bank, self.num_neighbors))
        return EmbeddingSamples(
            torch.cat(vectors).to(anchors.vectors.dtype),
            torch.arange(anchors.num_classes, device=device).repeat_interleave(num_per_class),
            knn_distance=torch.cat(distances),
            config={
                "sampler": type(self).__name__,
                "num_neighbors": self.num_neighbors,
                "max_norm": self.max_norm,
                "norm_penalty": self.norm_penalty,
                "init_scale": self.init_scale,
                "lr": self.lr,
                "steps": self.steps,
                "seed": self.seed,
            },
            class_names=anchors.class_names,
        )


class TokenInterpolationSampler:
    """Table 2 (III): ``alpha * T(y1) + (1 - alpha) * T(y2)`` for pairs of distinct classes, labelled ``y1``.

    For every class ``y1`` the partner classes ``y2`` run through a random permutation of the other ``C - 1``
    classes, repeated as often as needed, so each partner is used equally often. With more than ``C - 1``
    samples per class the vectors therefore repeat (decoding them with different seeds still gives different
    images). The vectors are not rescaled.

    Args:
        alpha: Weight of the labelled class ``y1``, in ``(0, 1)`` (the paper uses 0.5).
        seed: Seed of the generator used when :meth:`sample` gets none.
        device: Where to compute; ``None`` means the device of the anchors.

    Raises:
        ValueError: If ``alpha`` is not strictly between 0 and 1.
    """

    def __init__(self, alpha: float = 0.5, *, seed: int = 0, device: DeviceLike = None) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.device = device

    def __repr__(self) -> str:
        return f"TokenInterpolationSampler(alpha={self.alpha}, seed={self.seed})"

    def partners(self, num_classes: int, num_per_class: int, generator: torch.Generator | None = None) -> Tensor:
        """The partner class ``y2`` of every sample, in the order :meth:`sample` returns them.

        Args:
            num_classes: Number of classes ``C`` (at least 2).
            num_per_class: Number of samples per class.
            generator: Source of randomness; ``None`` uses a generator seeded with ``seed``.

        Returns:
            Partner labels of shape ``(C * num_per_class,)`` on the CPU, never equal to the row's own class.

        Raises:
            ValueError: If there are fewer than two classes or ``num_per_class`` is not positive.
        """
        check_positive_int(num_per_class, "num_per_class")
        if num_classes < 2:
            raise ValueError(f"interpolation needs at least 2 classes, got num_classes={num_classes}")
        rng = _generator(generator, self.seed)
        rows: list[Tensor] = []
        repeats = -(-num_per_class // (num_classes - 1))
        for class_index in range(num_classes):
            others = torch.cat([torch.arange(class_index), torch.arange(class_index + 1, num_classes)])
            order = torch.randperm(num_classes - 1, generator=_cpu(rng))
            rows.append(others[order].repeat(repeats)[:num_per_class])
        return torch.cat(rows)

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Interpolate every class token with ``num_per_class`` partner tokens.

        Args:
            bank: The ID feature bank (only checked for consistency with ``anchors``).
            anchors: The class tokens ``T(y)``; at least two classes.
            num_per_class: Number of vectors per class.
            generator: Source of randomness for the partners; ``None`` uses a generator seeded with ``seed``.
                It must be a CPU generator.

        Returns:
            ``C * num_per_class`` vectors grouped by class, labelled with ``y1``.

        Raises:
            TypeError: If ``bank`` or ``anchors`` has the wrong type, or ``num_per_class`` is not an int.
            ValueError: If ``num_per_class`` is not positive, there is only one class, or the bank and anchors
                disagree.
        """
        _check_sample_args(bank, anchors, num_per_class)
        device = _compute_device(self.device, anchors)
        tokens = anchors.vectors.to(device)
        partners = self.partners(anchors.num_classes, num_per_class, generator).to(device)
        labels = torch.arange(anchors.num_classes, device=device).repeat_interleave(num_per_class)
        vectors = self.alpha * tokens[labels] + (1.0 - self.alpha) * tokens[partners]
        return EmbeddingSamples(
            vectors,
            labels,
            config={"sampler": type(self).__name__, "alpha": self.alpha, "seed": self.seed},
            class_names=anchors.class_names,
        )


class DisjointClassSampler:
    """Table 2 (IV): token embeddings of class names that are not in the ID label set.

    The paper uses the ImageNet-1k classes outside ImageNet-100. Build ``disjoint`` from such names with the
    same text encoder as the ID anchors (e.g. ``TokenEmbeddings.from_pretrained``); :func:`disjoint_class_names`
    removes the ID names from a candidate list. Every ID class receives ``num_per_class`` disjoint tokens: the
    disjoint rows are shuffled once and dealt out in turn over all ``C * num_per_class`` slots, so each is used
    equally often (and exactly once when there are enough of them). A row's label only says which ID class's
    prompt slot the vector fills; its content is the disjoint class. The vectors are not rescaled.

    Args:
        disjoint: Token embeddings of the disjoint class names.
        seed: Seed of the generator used when :meth:`sample` gets none.
        device: Where to compute; ``None`` means the device of the anchors.

    Raises:
        TypeError: If ``disjoint`` is not a :class:`~dreamood.anchors.TokenEmbeddings`.
    """

    def __init__(self, disjoint: TokenEmbeddings, *, seed: int = 0, device: DeviceLike = None) -> None:
        if not isinstance(disjoint, TokenEmbeddings):
            raise TypeError(f"disjoint must be a TokenEmbeddings, got {type(disjoint).__name__}")
        self.disjoint = disjoint
        self.seed = int(seed)
        self.device = device

    def __repr__(self) -> str:
        return f"DisjointClassSampler(num_disjoint_classes={self.disjoint.num_classes}, seed={self.seed})"

    def assignment(self, num_slots: int, generator: torch.Generator | None = None) -> Tensor:
        """Which disjoint row fills each of ``num_slots`` sample slots, in the order :meth:`sample` uses.

        Args:
            num_slots: ``C * num_per_class``.
            generator: Source of randomness; ``None`` uses a generator seeded with ``seed``. A CPU generator.

        Returns:
            Row indices into ``disjoint`` of shape ``(num_slots,)`` on the CPU.
        """
        check_positive_int(num_slots, "num_slots")
        count = self.disjoint.num_classes
        order = torch.randperm(count, generator=_cpu(_generator(generator, self.seed)))
        return order.repeat(-(-num_slots // count))[:num_slots]

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Deal the disjoint class tokens out to the ID classes.

        Args:
            bank: The ID feature bank (only checked for consistency with ``anchors``).
            anchors: The ID class tokens; their names must not occur among the disjoint names.
            num_per_class: Number of vectors per ID class.
            generator: Source of randomness for the shuffle (a CPU generator); ``None`` uses one seeded with
                ``seed``.

        Returns:
            ``C * num_per_class`` vectors grouped by ID class.

        Raises:
            TypeError: If ``bank`` or ``anchors`` has the wrong type, or ``num_per_class`` is not an int.
            ValueError: If a disjoint name is also an ID name (compared case-insensitively, ignoring
                underscores and repeated spaces), the dimensions differ, or the bank and anchors disagree.
        """
        _check_sample_args(bank, anchors, num_per_class)
        if self.disjoint.dim != anchors.dim:
            raise ValueError(
                f"disjoint token embeddings have dimension {self.disjoint.dim} but the anchors have {anchors.dim}"
            )
        id_keys = {_name_key(name) for name in anchors.class_names}
        shared = [name for name in self.disjoint.class_names if _name_key(name) in id_keys]
        if shared:
            raise ValueError(
                f"disjoint class names must not be ID class names, but {len(shared)} are: {shared[:10]}"
                f"{'...' if len(shared) > 10 else ''}; remove them with disjoint_class_names()"
            )
        device = _compute_device(self.device, anchors)
        labels = torch.arange(anchors.num_classes, device=device).repeat_interleave(num_per_class)
        rows = self.assignment(len(labels), generator).to(device)
        vectors = self.disjoint.vectors.to(device=device, dtype=anchors.vectors.dtype)[rows]
        return EmbeddingSamples(
            vectors,
            labels,
            config={
                "sampler": type(self).__name__,
                "num_disjoint_classes": self.disjoint.num_classes,
                "disjoint_class_names": self.disjoint.class_names,
                "seed": self.seed,
            },
            class_names=anchors.class_names,
        )


def disjoint_class_names(candidates: Sequence[str], id_class_names: Sequence[str]) -> list[str]:
    """The names of ``candidates`` that are not ID class names, in their original order.

    Names are compared case-insensitively, with underscores read as spaces and repeated spaces collapsed
    (``"Golden_retriever"`` matches ``"golden retriever"``): CLIP's tokenizer lower-cases its input, so names
    that differ only in case have the same token embedding (ImageNet's "Cardigan" dog and "cardigan" sweater).

    Args:
        candidates: Candidate class names (e.g. the ImageNet-1k classes).
        id_class_names: The in-distribution class names.

    Returns:
        The candidates that do not match any ID name.
    """
    id_keys = {_name_key(name) for name in id_class_names}
    return [name for name in candidates if _name_key(name) not in id_keys]


def _name_key(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().casefold()


def _check_sample_args(bank: Any, anchors: Any, num_per_class: int) -> None:
    if not isinstance(bank, FeatureBank):
        raise TypeError(f"bank must be a FeatureBank, got {type(bank).__name__}")
    if not isinstance(anchors, TokenEmbeddings):
        raise TypeError(f"anchors must be a TokenEmbeddings, got {type(anchors).__name__}")
    check_positive_int(num_per_class, "num_per_class")
    if bank.dim != anchors.dim:
        raise ValueError(f"bank has embedding dimension {bank.dim} but anchors have {anchors.dim}")
    if bank.num_classes != anchors.num_classes:
        raise ValueError(f"bank has {bank.num_classes} classes but anchors have {anchors.num_classes}")


def _compute_device(device: DeviceLike, anchors: TokenEmbeddings) -> torch.device:
    return anchors.device if device is None else resolve_device(device)


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(seed)


def _cpu(generator: torch.Generator) -> torch.Generator:
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator for this sampler, got one on {generator.device}")
    return generator


def _standard_normal(
    shape: tuple[int, int], generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``N(0, I)`` drawn on the generator's device (so a CPU generator gives the same numbers everywhere)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
