"""Outlier synthesis in a classifier's feature space during training: VOS and NPOS.

Both keep a FIFO queue of the most recent penultimate features of every class and, once every queue is full,
draw virtual outliers from them. They satisfy :class:`~dreamood.protocols.FeatureOutlierSampler`, so a
training loop only calls::

    sampler.update(features, labels)      # every step
    if sampler.ready:
        outliers = sampler.sample()       # regularise the classifier with these

* :class:`VOSSampler`: Du et al., "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR 2022.
* :class:`NPOSSampler`: Tao et al., "Non-Parametric Outlier Synthesis", ICLR 2023.

Both have ``state_dict()`` / ``load_state_dict()`` (queues, fill counts, internal generator), which
:func:`~dreamood.training.train_classifier` stores in its checkpoints so that a resumed run is exact.

Queues live on the device of the first batch of features. Without an explicit generator, ``sample`` draws
from an internal generator seeded with ``seed`` (created on the queues' device) that advances with every
call, so a training run is reproducible and each step still gets new outliers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dreamood._validation import (
    as_tensor,
    check_finite,
    check_floating,
    check_positive,
    check_positive_int,
    check_rank,
)

__all__ = ["ClassQueues", "NPOSSampler", "VOSSampler"]


class ClassQueues:
    """One FIFO queue of at most ``queue_size`` feature vectors per class.

    Storage is a ring buffer ``(num_classes, queue_size, d)`` allocated on the first :meth:`push`, on the
    device of those features and in their dtype (half precision is stored as float32). When a queue is full
    the oldest vectors are dropped first.

    Args:
        num_classes: Number of classes.
        queue_size: Capacity of every queue.

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If an argument is not positive.
    """

    def __init__(self, num_classes: int, queue_size: int) -> None:
        check_positive_int(num_classes, "num_classes")
        check_positive_int(queue_size, "queue_size")
        self.num_classes = num_classes
        self.queue_size = queue_size
        self._buffer: Tensor | None = None
        self._counts = torch.zeros(num_classes, dtype=torch.long)
        self._next = torch.zeros(num_classes, dtype=torch.long)

    @property
    def counts(self) -> Tensor:
        """Number of vectors held by each queue (at most ``queue_size``), shape ``(num_classes,)``, on the CPU."""
        return self._counts.clone()

    @property
    def full(self) -> bool:
        """Whether every queue holds ``queue_size`` vectors."""
        return bool((self._counts == self.queue_size).all())

    @property
    def device(self) -> torch.device | None:
        """Device of the stored vectors, or ``None`` before the first push."""
        return None if self._buffer is None else self._buffer.device

    @property
    def dim(self) -> int | None:
        """Feature dimension, or ``None`` before the first push."""
        return None if self._buffer is None else int(self._buffer.shape[2])

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor) -> None:
        """Append a batch (a detached copy) to the queues of its classes, in batch order.

        Args:
            features: Features ``(N, d)``, floating point and finite.
            labels: Integer labels ``(N,)`` in ``[0, num_classes)``.

        Raises:
            TypeError: If ``features`` is not floating point or ``labels`` is not integer.
            ValueError: If shapes disagree, the dimension changed, or a label is out of range.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        features, labels = _check_batch(features, labels, self.num_classes)
        if self._buffer is None:
            dtype = torch.promote_types(features.dtype, torch.float32)
            self._buffer = torch.zeros(
                self.num_classes, self.queue_size, features.shape[1], dtype=dtype, device=features.device
            )
        elif features.shape[1] != self._buffer.shape[2]:
            raise ValueError(
                f"features have dimension {features.shape[1]} but the queues hold dimension {self._buffer.shape[2]}"
            )
        features = features.detach().to(device=self._buffer.device, dtype=self._buffer.dtype)
        labels = labels.to(self._buffer.device)
        for class_index in torch.unique(labels).tolist():
            rows = features[labels == class_index][-self.queue_size :]
            start = int(self._next[class_index])
            slots = (start + torch.arange(len(rows), device=self._buffer.device)) % self.queue_size
            self._buffer[class_index, slots] = rows
            self._next[class_index] = (start + len(rows)) % self.queue_size
            self._counts[class_index] = min(self.queue_size, int(self._counts[class_index]) + len(rows))

    def get(self, class_index: int) -> Tensor:
        """The vectors of one class, oldest first, shape ``(counts[class_index], d)``.

        Raises:
            ValueError: If ``class_index`` is out of range or nothing was pushed yet.
        """
        if not 0 <= class_index < self.num_classes:
            raise ValueError(f"class_index must lie in [0, {self.num_classes}), got {class_index}")
        if self._buffer is None:
            raise ValueError("the queues are empty: push features first")
        count, start = int(self._counts[class_index]), int(self._next[class_index])
        if count < self.queue_size:
            return self._buffer[class_index, :count].clone()
        return torch.roll(self._buffer[class_index], shifts=-start, dims=0)

    def state_dict(self) -> dict[str, Any]:
        """The queues' contents as tensors and plain values (loadable with ``torch.load(weights_only=True)``).

        Returns:
            A dict with the storage (``None`` before the first push), the fill counts, the next write positions,
            the storage's device and the queue configuration.
        """
        return {
            "num_classes": self.num_classes,
            "queue_size": self.queue_size,
            "buffer": None if self._buffer is None else self._buffer.clone(),
            "device": None if self._buffer is None else str(self._buffer.device),
            "counts": self._counts.clone(),
            "next": self._next.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the contents saved by :meth:`state_dict`.

        The storage goes back to the device it was saved from when that device exists here, else to the CPU.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ValueError: The state was saved from queues of another ``num_classes`` or ``queue_size``, or is
                malformed.
        """
        for key in ("num_classes", "queue_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot load queue state: it was saved with {key}={state.get(key)!r}, these queues have "
                    f"{key}={getattr(self, key)!r}"
                )
        try:
            buffer, counts, positions = state["buffer"], state["counts"], state["next"]
        except KeyError as error:
            raise ValueError(f"queue state lacks the entry {error}") from None
        expected = (self.num_classes,)
        for name, value in (("counts", counts), ("next", positions)):
            if not isinstance(value, Tensor) or tuple(value.shape) != expected:
                raise ValueError(f"queue state entry {name!r} must be a tensor of shape {expected}, got {value!r:.80}")
        if buffer is not None:
            if (
                not isinstance(buffer, Tensor)
                or buffer.dim() != 3
                or tuple(buffer.shape[:2])
                != (
                    self.num_classes,
                    self.queue_size,
                )
            ):
                raise ValueError(
                    f"queue state entry 'buffer' must be a ({self.num_classes}, {self.queue_size}, d) tensor, "
                    f"got {buffer!r:.80}"
                )
            buffer = buffer.clone().to(_saved_device(state.get("device")))
        self._buffer = buffer
        self._counts = counts.to("cpu", torch.long).clone()
        self._next = positions.to("cpu", torch.long).clone()

    def stacked(self) -> Tensor:
        """The storage ``(num_classes, queue_size, d)`` itself (order within a queue unspecified); needs :attr:`full`.

        Raises:
            ValueError: If a queue is not full.
        """
        if self._buffer is None or not self.full:
            raise ValueError(f"the queues are not full: they hold {self._counts.tolist()} of {self.queue_size}")
        return self._buffer


class _QueueSampler:
    """State shared by the feature-space samplers: class queues and an internal generator."""

    def __init__(self, num_classes: int, queue_size: int, seed: int) -> None:
        self.queues = ClassQueues(num_classes, queue_size)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.queues.num_classes

    @property
    def queue_size(self) -> int:
        """Capacity of every class queue."""
        return self.queues.queue_size

    @property
    def ready(self) -> bool:
        """Whether every class queue is full, so that :meth:`sample` can run."""
        return self.queues.full

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of penultimate features (a detached copy) to the queues of their classes.

        Args:
            features: ID features ``(N, d)``.
            labels: Their classes ``(N,)``.

        Raises:
            TypeError: If ``features`` is not floating point or ``labels`` is not integer.
            ValueError: If shapes disagree or a label is out of range.
            NonFiniteError: If ``features`` contains NaN or infinity.
        """
        self.queues.push(features, labels)

    def _rng(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
        if generator is not None:
            return generator
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: the queues and the internal generator's state.

        Returns:
            A dict of tensors and plain values (loadable with ``torch.load(weights_only=True)``).
        """
        generator = self._generator
        return {
            "sampler": type(self).__name__,
            "seed": self.seed,
            "queues": self.queues.state_dict(),
            "generator": None if generator is None else generator.get_state(),
            "generator_device": None if generator is None else str(generator.device),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (the queues and the internal generator).

        Args:
            state: A dict from :meth:`state_dict` of a sampler of the same type and queue configuration.

        Raises:
            ValueError: The state comes from another sampler type or queue configuration, or is malformed.
        """
        name = type(self).__name__
        if state.get("sampler") != name:
            raise ValueError(f"cannot load the state of {state.get('sampler')!r} into a {name}")
        if "queues" not in state:
            raise ValueError(f"{name} state lacks the entry 'queues'")
        self.queues.load_state_dict(state["queues"])
        self.seed = int(state.get("seed", self.seed))
        generator_state = state.get("generator")
        if generator_state is None:
            self._generator = None
            return
        generator = torch.Generator(device=_saved_device(state.get("generator_device")))
        generator.set_state(generator_state)
        self._generator = generator

    def _check_ready(self) -> None:
        if not self.ready:
            raise RuntimeError(
                f"{type(self).__name__} is not ready: the class queues hold {self.queues.counts.tolist()} of "
                f"{self.queue_size} features; keep calling update() until ready is True"
            )


class VOSSampler(_QueueSampler):
    """Virtual outlier synthesis from class-conditional Gaussians with a tied covariance.

    Du et al., "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR 2022. From the full
    queues ``X_c`` (``queue_size`` features per class) it estimates the class means ``mu_c`` and the shared
    covariance ``Sigma = (1 / (C * Q)) * sum_c (X_c - mu_c)^T (X_c - mu_c) + jitter * I`` in float64 (the
    maximum-likelihood estimate, as in the VOS code). For every class it draws ``sample_from`` points from
    ``N(mu_c, Sigma)`` and keeps the ``select`` with the lowest likelihood.

    A draw is ``x = mu_c + L e`` with ``Sigma = L L^T`` (Cholesky) and ``e ~ N(0, I)``, so its log-likelihood is
    ``const - ||e||^2 / 2``; the lowest-likelihood draws are those with the largest ``||e||``, which is what is
    ranked (the same selection as evaluating the density, without transforming all ``sample_from`` draws).

    Args:
        num_classes: Number of ID classes.
        queue_size: Features kept per class (VOS: 1000).
        sample_from: Gaussian draws per class (VOS: 10000).
        select: Lowest-likelihood draws kept per class (VOS: 1).
        jitter: Multiple of the identity added to the covariance (VOS: 1e-4).
        seed: Seed of the internal generator.

    Raises:
        TypeError: If an integer argument is not an int.
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_classes: int,
        queue_size: int = 1000,
        sample_from: int = 10000,
        select: int = 1,
        jitter: float = 1e-4,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, queue_size, seed)
        check_positive_int(sample_from, "sample_from")
        check_positive_int(select, "select")
        check_positive(jitter, "jitter", allow_zero=True)
        if select > sample_from:
            raise ValueError(f"select must be <= sample_from={sample_from}, got {select}")
        self.sample_from = sample_from
        self.select = select
        self.jitter = float(jitter)

    def __repr__(self) -> str:
        return (
            f"VOSSampler(num_classes={self.num_classes}, queue_size={self.queue_size}, "
            f"sample_from={self.sample_from}, select={self.select}, jitter={self.jitter})"
        )

    @torch.no_grad()
    def class_gaussians(self) -> tuple[Tensor, Tensor]:
        """The class means and the tied covariance estimated from the queues, in float64.

        Returns:
            ``(means, covariance)`` of shapes ``(C, d)`` and ``(d, d)``; the covariance includes the jitter.

        Raises:
            RuntimeError: If the queues are not full yet.
        """
        self._check_ready()
        features = self.queues.stacked().double()
        means = features.mean(dim=1)
        centered = (features - means.unsqueeze(1)).reshape(-1, features.shape[2])
        covariance = centered.T @ centered / centered.shape[0]
        covariance += self.jitter * torch.eye(covariance.shape[0], dtype=torch.float64, device=covariance.device)
        return means, covariance

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw the virtual outliers of every class.

        Args:
            generator: Source of randomness on the queues' device; ``None`` uses the internal generator.

        Returns:
            Outlier features ``(C * select, d)`` grouped by class, in the queues' dtype and device.

        Raises:
            RuntimeError: If the queues are not full yet.
        """
        return self.sample_with_labels(generator)[0]

    @torch.no_grad()
    def sample_with_labels(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Like :meth:`sample`, also returning the class each outlier was drawn from.

        Args:
            generator: Source of randomness on the queues' device; ``None`` uses the internal generator.

        Returns:
            ``(outliers, labels)`` of shapes ``(C * select, d)`` and ``(C * select,)``.

        Raises:
            RuntimeError: If the queues are not full yet.
            torch.linalg.LinAlgError: If the covariance is not positive definite (possible only with
                ``jitter=0``).
        """
        means, covariance = self.class_gaussians()
        device = means.device
        rng = self._rng(generator, device)
        cholesky = torch.linalg.cholesky(covariance)
        dim = means.shape[1]
        outliers: list[Tensor] = []
        for class_index in range(self.num_classes):
            noise = torch.randn(self.sample_from, dim, generator=rng, device=rng.device).to(device)
            farthest = noise.pow(2).sum(dim=1).topk(self.select).indices
            outliers.append(means[class_index] + noise[farthest].double() @ cholesky.T)
        labels = torch.arange(self.num_classes, device=device).repeat_interleave(self.select)
        return torch.cat(outliers).to(self.queues.stacked().dtype), labels


class NPOSSampler(_QueueSampler):
    """Non-parametric outlier synthesis around the low-density boundary of every class.

    Tao et al., "Non-Parametric Outlier Synthesis", ICLR 2023 (the procedure DREAM-OOD applies to its
    text-conditioned space). The queues hold raw penultimate features; all k-NN distances are Euclidean
    distances between L2-normalised vectors, as in the NPOS code. For every class:

    1. the ``k``-th nearest-neighbour distance of each queued feature to the other features of its queue;
    2. the ``num_boundary`` features with the largest distance form the boundary;
    3. ``num_anchors`` of them, chosen at random without replacement, are the anchors;
    4. around each anchor ``x``: ``candidates_per_anchor`` candidates ``x + sigma * eps``, ``eps ~ N(0, I)``
       (``sigma`` is a standard deviation, in the raw feature scale);
    5. per anchor, the ``keep_per_anchor`` candidates whose normalised vectors have the largest ``k``-th NN
       distance to the normalised queue are kept.

    The outliers are returned in the raw feature space (not normalised), like the queued features, so they can
    be fed to the layers that follow the penultimate features. Unlike the NPOS code, which lets a queued
    feature count as its own nearest neighbour in step 1, a feature is never its own neighbour here.

    Args:
        num_classes: Number of ID classes.
        queue_size: Features kept per class (NPOS: 1000).
        k: Neighbour whose distance is used (NPOS CIFAR: 100); at most ``queue_size - 1``.
        num_boundary: Size of the boundary set per class (NPOS: 50).
        num_anchors: Boundary anchors per class per call (NPOS: 2).
        candidates_per_anchor: Gaussian candidates per anchor (NPOS: 600).
        keep_per_anchor: Candidates kept per anchor (NPOS: 2).
        sigma: Standard deviation of the candidates around their anchor (NPOS: 0.1).
        seed: Seed of the internal generator.

    Raises:
        TypeError: If an integer argument is not an int.
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_classes: int,
        queue_size: int = 1000,
        k: int = 100,
        num_boundary: int = 50,
        num_anchors: int = 2,
        candidates_per_anchor: int = 600,
        keep_per_anchor: int = 2,
        sigma: float = 0.1,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, queue_size, seed)
        for value, name in (
            (k, "k"),
            (num_boundary, "num_boundary"),
            (num_anchors, "num_anchors"),
            (candidates_per_anchor, "candidates_per_anchor"),
            (keep_per_anchor, "keep_per_anchor"),
        ):
            check_positive_int(value, name)
        check_positive(sigma, "sigma")
        if k > queue_size - 1:
            raise ValueError(f"k must be <= queue_size - 1 = {queue_size - 1}, got {k}")
        if num_boundary > queue_size:
            raise ValueError(f"num_boundary must be <= queue_size = {queue_size}, got {num_boundary}")
        if num_anchors > num_boundary:
            raise ValueError(f"num_anchors must be <= num_boundary = {num_boundary}, got {num_anchors}")
        if keep_per_anchor > candidates_per_anchor:
            raise ValueError(
                f"keep_per_anchor must be <= candidates_per_anchor = {candidates_per_anchor}, got {keep_per_anchor}"
            )
        self.k = k
        self.num_boundary = num_boundary
        self.num_anchors = num_anchors
        self.candidates_per_anchor = candidates_per_anchor
        self.keep_per_anchor = keep_per_anchor
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return (
            f"NPOSSampler(num_classes={self.num_classes}, queue_size={self.queue_size}, k={self.k}, "
            f"num_boundary={self.num_boundary}, num_anchors={self.num_anchors}, "
            f"candidates_per_anchor={self.candidates_per_anchor}, keep_per_anchor={self.keep_per_anchor}, "
            f"sigma={self.sigma})"
        )

    def boundary(self, class_index: int) -> tuple[Tensor, Tensor]:
        """The boundary of one class: queue positions with the largest k-NN distance, and those distances.

        Args:
            class_index: The class.

        Returns:
            ``(positions, distances)``, each ``(num_boundary,)``, positions into :meth:`ClassQueues.get`'s
            order (oldest first), distances in decreasing order.

        Raises:
            RuntimeError: If the queues are not full yet.
        """
        self._check_ready()
        return self._boundary(torch.nn.functional.normalize(self.queues.get(class_index), dim=1))

    def _boundary(self, unit_queue: Tensor) -> tuple[Tensor, Tensor]:
        from dreamood.knn import kth_neighbor_distance

        distances = kth_neighbor_distance(unit_queue, unit_queue, self.k, exclude_self=True)
        top = distances.topk(self.num_boundary)
        return top.indices, top.values

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw the boundary outliers of every class.

        Args:
            generator: Source of randomness on the queues' device; ``None`` uses the internal generator.

        Returns:
            Outlier features ``(C * num_anchors * keep_per_anchor, d)`` grouped by class, in the raw feature
            space, the queues' dtype and device.

        Raises:
            RuntimeError: If the queues are not full yet.
        """
        return self.sample_with_labels(generator)[0]

    @torch.no_grad()
    def sample_with_labels(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Like :meth:`sample`, also returning the class each outlier was drawn from.

        Args:
            generator: Source of randomness on the queues' device; ``None`` uses the internal generator.

        Returns:
            ``(outliers, labels)`` of shapes ``(M, d)`` and ``(M,)`` with ``M = C * num_anchors * keep_per_anchor``.

        Raises:
            RuntimeError: If the queues are not full yet.
        """
        from dreamood.knn import kth_neighbor_distance

        self._check_ready()
        device = self.queues.device
        assert device is not None
        rng = self._rng(generator, device)
        outliers: list[Tensor] = []
        for class_index in range(self.num_classes):
            queue = self.queues.get(class_index)
            unit_queue = torch.nn.functional.normalize(queue, dim=1)
            boundary, _ = self._boundary(unit_queue)
            chosen = torch.randperm(self.num_boundary, generator=rng, device=rng.device)[: self.num_anchors]
            anchors = queue[boundary[chosen.to(device)]]
            noise = torch.randn(
                self.num_anchors, self.candidates_per_anchor, queue.shape[1], generator=rng, device=rng.device
            ).to(device=device, dtype=queue.dtype)
            candidates = anchors.unsqueeze(1) + self.sigma * noise
            distances = kth_neighbor_distance(
                torch.nn.functional.normalize(candidates.flatten(0, 1), dim=1), unit_queue, self.k
            ).view(self.num_anchors, self.candidates_per_anchor)
            keep = distances.topk(self.keep_per_anchor, dim=1).indices
            outliers.append(candidates.gather(1, keep.unsqueeze(2).expand(-1, -1, queue.shape[1])).flatten(0, 1))
        labels = torch.arange(self.num_classes, device=device).repeat_interleave(
            self.num_anchors * self.keep_per_anchor
        )
        return torch.cat(outliers), labels


def _saved_device(name: Any) -> torch.device:
    """The device a state was saved from, or the CPU when it is unknown or absent on this machine."""
    if not isinstance(name, str):
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        return torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        return torch.device("cpu")
    return device


def _check_batch(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    features = as_tensor(features, "features")
    labels = as_tensor(labels, "labels")
    check_rank(features, 2, "features", "(batch, feature_dim)")
    check_floating(features, "features")
    check_rank(labels, 1, "labels", "(batch,)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but labels has {labels.shape[0]}")
    check_finite(features, "features")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values from {int(labels.min())} to {int(labels.max())}"
        )
    return features, labels.long()
