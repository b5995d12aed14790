"""The k-NN boundary sampler of DREAM-OOD Phase 2 (outliers) and its DREAM-ID mirror (inliers).

Du et al., "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023, Sec. 3.2 and
Eq. 5. Per class, on the L2-normalised feature bank:

1. the k-th nearest-neighbour (k-NN) distance of every bank embedding of the class, measured to the class's
   own embeddings (``scope="class"``, the paper) or to the whole bank (``scope="all"``); a point is never its
   own neighbour;
2. the anchor set: the ``boundary_size`` embeddings with the largest k-NN distance (outliers: the low-density
   boundary) or the smallest (inliers: the densest points);
3. each round draws ``anchors_per_round`` distinct anchors from that set; the candidates of anchor ``z`` are
   ``v = (z + sigma * eps) / ||z + sigma * eps||`` with ``eps ~ N(0, I)``, ``candidates_per_anchor`` of them;
4. per anchor the ``keep_per_anchor`` candidates with the largest k-NN distance to the bank are kept (the
   smallest in inlier mode);
5. rounds repeat until ``num_per_class`` vectors exist (the last round is truncated), and every vector is
   scaled to the norm of its class token ``T(y)``.

How the candidates are scored (exactly, at a fraction of the brute-force cost): with unit keys ``b`` the
similarity of candidate ``(i, j)`` is ``(z_i.b + sigma * eps_j.b) / ||z_i + sigma * eps_j||`` and its k-NN
distance is ``sqrt(2 - 2 t / ||z_i + sigma * eps_j||)``, ``t`` being the k-th largest of ``z_i.b + sigma *
eps_j.b`` over the keys. ``z_i.b`` and ``eps_j.b`` are two matrix products (with shared noise one
``(candidates x m) @ (m x keys)`` product serves all anchors of a round), and the norm needs only ``z_i.eps_j``
and ``||eps_j||``. The costly part is the k-th largest value, one selection over the keys per candidate; only
a few candidates per anchor need it:

* a cheap estimate of every candidate's similarity (the anchor's own k-th largest similarity shifted by the
  noise's projection on the keys ranked around ``k``) picks a few pilot candidates per anchor, whose exact
  similarities give a threshold ``theta`` that ``keep_per_anchor`` candidates already reach;
* every candidate is then tested against ``theta`` by *counting* keys above ``theta * norm`` (an addition, a
  comparison and a sum, several times cheaper than a selection): a candidate with at least ``k`` keys above
  it has a similarity beyond ``theta`` and cannot be kept;
* the exact k-th largest similarity is computed for the candidates that pass, and the best are kept.

What remains is dominated by the noise-key product, ``candidates x m x keys`` multiply-adds per round.

The test is exact up to a margin of ``1e-5`` in similarity (float32 rounding is about ``1e-7``) that only
lets more candidates through, so the kept candidates are exactly the ``keep_per_anchor`` best of every
anchor. :meth:`KNNBoundarySampler.trace` records every candidate's distance so that this can be checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import (
    as_tensor,
    check_choice,
    check_finite,
    check_floating,
    check_positive,
    check_positive_int,
)
from dreamood.anchors import TokenEmbeddings
from dreamood.feature_bank import FeatureBank
from dreamood.knn import Backend
from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "DEFAULT_SIGMA",
    "KNNBoundarySampler",
    "SamplingTrace",
    "candidate_knn_distance",
    "select_candidates",
]

Mode = Literal["outlier", "inlier"]
Scope = Literal["class", "all"]
NoiseScheme = Literal["shared", "independent"]

DEFAULT_SIGMA: dict[str, float] = {"outlier": 0.03, "inlier": 0.01}
"""Noise standard deviation used when ``sigma=None``: the paper's ImageNet-100 outlier and DREAM-ID values."""

# Similarity margin of the counting test; float32 rounding of the similarities is about 1e-7.
_SLACK = 1e-5
# Pilot candidates per anchor scored exactly (at least 2 * keep); the estimate ranks the best ones first.
_PILOT = 4
# Scratch elements of one counting step on the CPU: near the cache size, large enough to amortise the calls.
_COUNT_STEP_ELEMENTS = 2**22
_NORM_ATOL = 1e-4


def candidate_knn_distance(
    anchors: Tensor,
    noise: Tensor,
    keys: Tensor,
    k: int,
    sigma: float,
    *,
    memory_budget_mb: float = 512.0,
) -> Tensor:
    """k-th nearest-neighbour distance of every candidate ``normalize(z_i + sigma * eps_j)`` to the keys.

    This is the exact scoring step of DREAM-OOD Phase 2 (Du et al., NeurIPS 2023, Eq. 5), computed with the
    batched kernel of :class:`KNNBoundarySampler` for every candidate (no pruning).

    Args:
        anchors: Anchor embeddings ``(a, m)``, or ``(G, a, m)`` for ``G`` groups that each share one noise set.
        noise: Standard-normal noise ``(P, m)``, or ``(G, P, m)`` (one set per group).
        keys: Unit-norm key rows ``(n, m)`` (checked to ``1e-4`` and renormalised), e.g. a class's bank.
        k: Which neighbour, ``1 <= k <= n``. Keys are never excluded (a candidate is not a key).
        sigma: Standard deviation of the noise, ``> 0``.
        memory_budget_mb: Bound on the scratch memory.

    Returns:
        Distances ``(a, P)`` (or ``(G, a, P)``): entry ``[i, j]`` belongs to candidate ``z_i + sigma * eps_j``.
        float32, or float64 when an input is float64.

    Raises:
        TypeError: If an input is not a floating-point tensor or ``k`` is not an int.
        ValueError: If shapes disagree, ``k`` is out of range, ``sigma`` is not positive or the keys are not
            unit-norm.
        NonFiniteError: If an input contains NaN or infinity.
    """
    z, eps, unit_keys, grouped = _check_candidate_inputs(anchors, noise, keys, k, sigma, memory_budget_mb)
    scorer = _CandidateScorer(z, eps, unit_keys, k, sigma, _budget_elements(memory_budget_mb))
    distances = scorer.all_distances()
    return distances if grouped else distances[0]


def select_candidates(
    anchors: Tensor,
    noise: Tensor,
    keys: Tensor,
    k: int,
    sigma: float,
    keep: int,
    *,
    largest: bool = True,
    memory_budget_mb: float = 512.0,
) -> tuple[Tensor, Tensor]:
    """Per anchor, the ``keep`` candidates with the largest (or smallest) k-NN distance to the keys.

    The selection step of DREAM-OOD Phase 2 (Du et al., NeurIPS 2023): the result equals sorting
    :func:`candidate_knn_distance` per anchor, but only a few candidates per anchor get an exact k-NN
    distance (see the module documentation).

    Args:
        anchors: Anchor embeddings ``(a, m)`` or ``(G, a, m)``.
        noise: Standard-normal noise ``(P, m)`` or ``(G, P, m)``, shared by the anchors of a group.
        keys: Unit-norm key rows ``(n, m)``.
        k: Which neighbour, ``1 <= k <= n``.
        sigma: Standard deviation of the noise, ``> 0``.
        keep: Candidates kept per anchor, ``1 <= keep <= P``.
        largest: Keep the largest distances (outliers); ``False`` keeps the smallest (inliers).
        memory_budget_mb: Bound on the scratch memory.

    Returns:
        ``(index, distance)``, each ``(a, keep)`` (or ``(G, a, keep)``): the kept candidates' noise rows, best
        first, and their k-NN distances.

    Raises:
        TypeError: If an input is not a floating-point tensor or ``k``/``keep`` is not an int.
        ValueError: If shapes disagree, ``k`` or ``keep`` is out of range, ``sigma`` is not positive or the keys
            are not unit-norm.
        NonFiniteError: If an input contains NaN or infinity.
    """
    z, eps, unit_keys, grouped = _check_candidate_inputs(anchors, noise, keys, k, sigma, memory_budget_mb)
    check_positive_int(keep, "keep")
    if keep > eps.shape[1]:
        raise ValueError(f"keep must be <= the number of candidates per anchor ({eps.shape[1]}), got {keep}")
    scorer = _CandidateScorer(z, eps, unit_keys, k, sigma, _budget_elements(memory_budget_mb))
    index, distance = scorer.select(keep, largest)
    return (index, distance) if grouped else (index[0], distance[0])


@dataclass(frozen=True)
class SamplingTrace:
    """Every candidate of a :meth:`KNNBoundarySampler.trace` run, to check or plot the selection.

    Rounds of all classes are stacked in class order (``R`` rounds in total).

    Attributes:
        samples: The samples, identical to what :meth:`KNNBoundarySampler.sample` returns for the same inputs.
        candidate_distance: Exact k-NN distance of every candidate, ``(R, anchors_per_round,
            candidates_per_anchor)``.
        kept: Indices of the kept candidates of each anchor, best first, ``(R, anchors_per_round,
            keep_per_anchor)``. The last round of a class may contribute only part of them to ``samples``.
        anchor_index: Global bank row of each round's anchors, ``(R, anchors_per_round)``.
        labels: Class of each round, ``(R,)``.
    """

    samples: EmbeddingSamples
    candidate_distance: Tensor
    kept: Tensor
    anchor_index: Tensor
    labels: Tensor


class KNNBoundarySampler:
    """Outlier (or inlier) embeddings around the low-density boundary of each class (DREAM-OOD Phase 2).

    Du et al., "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023, Eq. 5;
    ``mode="inlier"`` is the DREAM-ID variant of the same paper. The procedure is described in the module
    documentation. Improvements over the public reference code: the kept candidates truly are the ones with
    the largest k-NN distance of their anchor (the reference ranks one set of candidates and returns another),
    and in inlier mode every anchor of a round contributes (the reference draws a round from one anchor).

    The defaults are the paper's ImageNet-100 settings. For CIFAR-100 the paper uses ``boundary_size=50`` and
    ``sigma=0.07``; its DREAM-ID run uses ``boundary_size=1000``, ``anchors_per_round=100``,
    ``keep_per_anchor=1``.

    Args:
        k: The k of the k-NN distance (300 in the paper).
        boundary_size: Size of the anchor set per class: the largest k-NN distances (outliers) or the
            smallest (inliers).
        anchors_per_round: Distinct anchors drawn from the anchor set per round.
        candidates_per_anchor: Candidates drawn around each anchor per round.
        sigma: Standard deviation of the Gaussian noise (not a variance; the noise norm is about
            ``sigma * sqrt(m)``). ``None`` uses the mode's default from :data:`DEFAULT_SIGMA`: 0.03 for
            outliers, 0.01 for inliers.
        keep_per_anchor: Candidates kept per anchor per round.
        scope: ``"class"`` measures every k-NN distance within the class's own bank embeddings (the paper);
            ``"all"`` measures it to the whole bank, so an outlier of one class cannot sit inside another
            class. ``"all"`` costs about ``num_classes`` times more.
        mode: ``"outlier"`` (DREAM-OOD) or ``"inlier"`` (DREAM-ID).
        noise: ``"shared"``: the anchors of a round share one set of ``candidates_per_anchor`` noise vectors,
            drawn fresh every round (the reference scheme). ``"independent"``: every anchor gets its own noise.
            Each candidate is an exact draw from ``N(z, sigma^2 I)`` either way; ``"shared"`` is the default
            because one noise-bank product then serves a whole round, which makes it about
            ``anchors_per_round`` times cheaper, and because the kept candidates of different anchors are
            still different vectors around different anchors.
        knn_backend: Backend of the bank's own k-NN search (:func:`dreamood.knn.kth_neighbor_distance`);
            the candidates are always scored by the batched torch kernel. Results do not depend on it.
        seed: Seed of the generator used when :meth:`sample` gets none, so repeated calls repeat.
        device: Where the computation runs (``None``: CUDA when available, else CPU). The samples are
            returned on the bank's device.
        memory_budget_mb: Bound on the scratch memory of the candidate scoring and of the k-NN search.
        show_progress: Show a progress bar over the classes.

    Raises:
        TypeError: If an integer parameter is not an int.
        ValueError: If a parameter is out of range (e.g. ``sigma <= 0``, ``anchors_per_round >
            boundary_size``, ``keep_per_anchor > candidates_per_anchor``) or a choice is unknown.
    """

    def __init__(
        self,
        k: int = 300,
        boundary_size: int = 200,
        anchors_per_round: int = 50,
        candidates_per_anchor: int = 1500,
        sigma: float | None = None,
        keep_per_anchor: int = 2,
        *,
        scope: Scope = "class",
        mode: Mode = "outlier",
        noise: NoiseScheme = "shared",
        knn_backend: Backend = "auto",
        seed: int = 0,
        device: DeviceLike = None,
        memory_budget_mb: float = 512.0,
        show_progress: bool = True,
    ) -> None:
        for value, name in (
            (k, "k"),
            (boundary_size, "boundary_size"),
            (anchors_per_round, "anchors_per_round"),
            (candidates_per_anchor, "candidates_per_anchor"),
            (keep_per_anchor, "keep_per_anchor"),
        ):
            check_positive_int(value, name)
        if sigma is not None:
            check_positive(sigma, "sigma")
        check_choice(scope, ("class", "all"), "scope")
        check_choice(mode, ("outlier", "inlier"), "mode")
        check_choice(noise, ("shared", "independent"), "noise")
        check_choice(knn_backend, ("auto", "torch", "faiss"), "knn_backend")
        check_positive(memory_budget_mb, "memory_budget_mb")
        if anchors_per_round > boundary_size:
            raise ValueError(
                f"anchors_per_round ({anchors_per_round}) must be <= boundary_size ({boundary_size}): the anchors "
                "of a round are distinct members of the anchor set"
            )
        if keep_per_anchor > candidates_per_anchor:
            raise ValueError(
                f"keep_per_anchor ({keep_per_anchor}) must be <= candidates_per_anchor ({candidates_per_anchor})"
            )
        self.k = k
        self.boundary_size = boundary_size
        self.anchors_per_round = anchors_per_round
        self.candidates_per_anchor = candidates_per_anchor
        self.sigma = sigma
        self.keep_per_anchor = keep_per_anchor
        self.scope: Scope = scope
        self.mode: Mode = mode
        self.noise: NoiseScheme = noise
        self.knn_backend: Backend = knn_backend
        self.seed = int(seed)
        self.device = device
        self.memory_budget_mb = float(memory_budget_mb)
        self.show_progress = show_progress

    @property
    def effective_sigma(self) -> float:
        """The noise standard deviation in use: ``sigma``, or the mode's default when ``sigma`` is ``None``."""
        return DEFAULT_SIGMA[self.mode] if self.sigma is None else float(self.sigma)

    def __repr__(self) -> str:
        return (
            f"KNNBoundarySampler(k={self.k}, boundary_size={self.boundary_size}, "
            f"anchors_per_round={self.anchors_per_round}, candidates_per_anchor={self.candidates_per_anchor}, "
            f"sigma={self.effective_sigma}, keep_per_anchor={self.keep_per_anchor}, scope={self.scope!r}, "
            f"mode={self.mode!r}, noise={self.noise!r})"
        )

    def config(self) -> dict[str, object]:
        """The sampler's name and parameters, as stored in the ``config`` of its samples.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "sampler": "KNNBoundarySampler",
            "k": self.k,
            "boundary_size": self.boundary_size,
            "anchors_per_round": self.anchors_per_round,
            "candidates_per_anchor": self.candidates_per_anchor,
            "sigma": self.effective_sigma,
            "keep_per_anchor": self.keep_per_anchor,
            "scope": self.scope,
            "mode": self.mode,
            "noise": self.noise,
            "knn_backend": self.knn_backend,
            "seed": self.seed,
        }

    def anchor_set(self, bank: FeatureBank, class_index: int) -> tuple[Tensor, Tensor]:
        """The anchor set of one class: its boundary (outliers) or densest (inliers) bank embeddings.

        Args:
            bank: L2-normalised feature bank.
            class_index: The class.

        Returns:
            ``(index, distance)``, each ``(boundary_size,)`` on the bank's device: global bank rows, sorted by
            k-NN distance (largest first for outliers, smallest first for inliers), and those distances.

        Raises:
            ValueError: If the bank is not normalised or the class is too small for ``k`` or ``boundary_size``.
        """
        embeddings = self._checked_embeddings(bank, resolve_device(self.device))
        if not 0 <= class_index < bank.num_classes:
            raise ValueError(f"class_index must lie in [0, {bank.num_classes}), got {class_index}")
        rows = bank.indices_of(class_index).to(embeddings.device)
        self._check_class_size(class_index, len(rows), len(embeddings), None)
        local, distance = self._anchor_set(embeddings, rows)
        return rows[local].to(bank.device), distance.to(bank.device)

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Draw ``num_per_class`` outlier (or inlier) embeddings for every class.

        Args:
            bank: L2-normalised feature bank with the same classes and dimension as ``anchors``.
            anchors: The class tokens ``T(y)``; each class's samples are scaled to its token's norm.
            num_per_class: Samples per class (10,000 in the paper).
            generator: Source of randomness; the noise is drawn on its device. A CPU generator gives the same
                draws on every device; on a GPU, a generator on the sampler's device
                (``torch.Generator("cuda").manual_seed(0)``) avoids drawing millions of noise vectors on the CPU
                and is much faster. ``None`` uses a CPU generator seeded with ``seed``.

        Returns:
            Samples in class order, within a class by round, anchor and rank (best first), with labels,
            ``anchor_index`` (global bank row of the anchor), ``knn_distance`` (of the unit-norm candidate,
            before scaling), ``config`` and the anchors' class names.

        Raises:
            TypeError: If ``bank`` or ``anchors`` has the wrong type or ``num_per_class`` is not an int.
            ValueError: If the bank is not normalised or not finite, its classes or dimension differ from the
                anchors', or a class is too small for ``k`` or ``boundary_size``.
        """
        samples, _ = self._run(bank, anchors, num_per_class, generator, record=False)
        return samples

    def trace(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> SamplingTrace:
        """Run :meth:`sample` and also record every candidate's exact k-NN distance.

        Scoring every candidate exactly is what the sampler avoids, and the record holds
        ``num_classes * rounds * anchors_per_round * candidates_per_anchor`` distances: use it on small
        problems, to check or plot the selection.

        Args:
            bank: See :meth:`sample`.
            anchors: See :meth:`sample`.
            num_per_class: See :meth:`sample`.
            generator: See :meth:`sample`.

        Returns:
            The samples (identical to :meth:`sample`'s) and every candidate of every round.

        Raises:
            TypeError: See :meth:`sample`.
            ValueError: See :meth:`sample`.
        """
        samples, record = self._run(bank, anchors, num_per_class, generator, record=True)
        assert record is not None
        return SamplingTrace(samples, *record)

    def _run(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None,
        *,
        record: bool,
    ) -> tuple[EmbeddingSamples, tuple[Tensor, Tensor, Tensor, Tensor] | None]:
        if not isinstance(bank, FeatureBank):
            raise TypeError(f"bank must be a FeatureBank, got {type(bank).__name__}")
        if not isinstance(anchors, TokenEmbeddings):
            raise TypeError(f"anchors must be TokenEmbeddings, got {type(anchors).__name__}")
        check_positive_int(num_per_class, "num_per_class")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}"
            )
        if bank.dim != anchors.dim:
            raise ValueError(f"bank embedding dimension {bank.dim} differs from the anchors' dimension {anchors.dim}")
        if bank.num_classes != anchors.num_classes:
            raise ValueError(
                f"bank has {bank.num_classes} classes but anchors has {anchors.num_classes} "
                f"({anchors.class_names[:3]}...)"
            )
        device = resolve_device(self.device)
        embeddings = self._checked_embeddings(bank, device)
        labels = bank.labels.to(device)
        rows_of = [torch.nonzero(labels == c).flatten() for c in range(bank.num_classes)]
        for c, rows in enumerate(rows_of):
            self._check_class_size(c, len(rows), len(embeddings), anchors.class_names[c])
        token_norms = anchors.vectors.detach().to(device=device, dtype=torch.float64).norm(dim=1)
        rng = generator if generator is not None else torch.Generator().manual_seed(self.seed)

        parts: list[EmbeddingSamples] = []
        records: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        desc = "outlier embeddings" if self.mode == "outlier" else "inlier embeddings"
        for c in progress(range(bank.num_classes), enabled=self.show_progress, desc=desc):
            vectors, anchor_rows, distance, class_record = self._sample_class(
                embeddings, rows_of[c], num_per_class, rng, record
            )
            parts.append(
                EmbeddingSamples(
                    (vectors.double() * token_norms[c]).to(device=bank.device, dtype=vectors.dtype),
                    torch.full((len(vectors),), c, dtype=torch.long, device=bank.device),
                    anchor_index=anchor_rows.to(bank.device),
                    knn_distance=distance.to(bank.device),
                )
            )
            if class_record is not None:
                records.append((*class_record, torch.full((len(class_record[0]),), c, dtype=torch.long)))
        merged = EmbeddingSamples.concat(parts)
        samples = EmbeddingSamples(
            merged.vectors,
            merged.labels,
            anchor_index=merged.anchor_index,
            knn_distance=merged.knn_distance,
            config={**self.config(), "num_per_class": num_per_class},
            class_names=anchors.class_names,
        )
        if not record:
            return samples, None
        stacked = tuple(torch.cat([r[i] for r in records]).to(bank.device) for i in range(4))
        return samples, (stacked[0], stacked[1], stacked[2], stacked[3])

    def _sample_class(
        self, embeddings: Tensor, rows: Tensor, num: int, rng: torch.Generator, record: bool
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """Unit-norm samples of one class with their anchors' global rows, distances and optional record."""
        members = embeddings[rows]
        keys = members if self.scope == "class" else embeddings
        anchor_local, _ = self._anchor_set(embeddings, rows)
        sigma = self.effective_sigma
        per_round = self.anchors_per_round * self.keep_per_anchor
        rounds = math.ceil(num / per_round)
        budget = _budget_elements(self.memory_budget_mb)
        vectors: list[Tensor] = []
        anchor_rows: list[Tensor] = []
        distances: list[Tensor] = []
        recorded: list[tuple[Tensor, Tensor, Tensor]] = []
        for chosen, noise in self._chunks(anchor_local, rounds, members.shape[1], keys.shape[0], rng, budget):
            z = members[chosen.to(members.device)]
            eps = noise.to(members.device, members.dtype)
            scorer = _CandidateScorer(z, eps, keys, self.k, sigma, budget)
            kept, distance = scorer.select(self.keep_per_anchor, largest=self.mode == "outlier")
            group = torch.arange(len(eps), device=eps.device)[:, None, None]
            picked = z[:, :, None, :] + sigma * eps[group, kept]
            vectors.append(torch.nn.functional.normalize(picked, dim=-1).flatten(0, 2))
            anchor_rows.append(rows[chosen].to(members.device)[:, :, None].expand_as(kept).flatten())
            distances.append(distance.flatten())
            if record:
                recorded.append(
                    (scorer.all_distances().flatten(0, 1).cpu(), kept.flatten(0, 1).cpu(), rows[chosen].flatten().cpu())
                )
        class_record = None
        if record:
            # Rows are (round, anchor) pairs in order, whatever the grouping: regroup them by round.
            a = self.anchors_per_round
            class_record = (
                torch.cat([r[0] for r in recorded]).view(rounds, a, self.candidates_per_anchor),
                torch.cat([r[1] for r in recorded]).view(rounds, a, self.keep_per_anchor),
                torch.cat([r[2] for r in recorded]).view(rounds, a),
            )
        return torch.cat(vectors)[:num], torch.cat(anchor_rows)[:num], torch.cat(distances)[:num], class_record

    def _chunks(
        self, anchor_local: Tensor, rounds: int, dim: int, num_keys: int, rng: torch.Generator, budget: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(anchors (G, a), noise (G, P, m))`` for consecutive groups of rounds, within the budget.

        A group shares one noise set: a round with shared noise, one anchor with independent noise. The random
        draws happen in the same order whatever the chunking: per round a permutation of the anchor set, then
        the noise (one set, or one per anchor in anchor order).
        """
        a, p = self.anchors_per_round, self.candidates_per_anchor
        group_anchors = a if self.noise == "shared" else 1
        per_group = p * (num_keys + dim) + group_anchors * (2 * num_keys + 6 * p)
        max_groups = max(1, budget // (2 * per_group))
        chosen: list[Tensor] = []
        noises: list[Tensor] = []
        for _ in range(rounds):
            order = torch.randperm(len(anchor_local), generator=rng, device=rng.device)[:a]
            picked = anchor_local[order.to(anchor_local.device)]
            for start in range(0, a, group_anchors):
                chosen.append(picked[start : start + group_anchors])
                noises.append(torch.randn(p, dim, generator=rng, device=rng.device))
                if len(chosen) == max_groups:
                    yield torch.stack(chosen), torch.stack(noises)
                    chosen, noises = [], []
        if chosen:
            yield torch.stack(chosen), torch.stack(noises)

    def _anchor_set(self, embeddings: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Local indices (into ``rows``) of the anchor set and their k-NN distances, best first."""
        from dreamood.knn import kth_neighbor_distance

        members = embeddings[rows]
        if self.scope == "class":
            distance = kth_neighbor_distance(
                members,
                members,
                self.k,
                exclude_self=True,
                backend=self.knn_backend,
                memory_budget_mb=self.memory_budget_mb,
            )
        else:
            # The point itself is its nearest bank row (distance 0): the (k+1)-th is the k-th among the others.
            distance = kth_neighbor_distance(
                members, embeddings, self.k + 1, backend=self.knn_backend, memory_budget_mb=self.memory_budget_mb
            )
        values, local = distance.topk(self.boundary_size, largest=self.mode == "outlier")
        return local, values

    def _checked_embeddings(self, bank: FeatureBank, device: torch.device) -> Tensor:
        """The bank's embeddings on ``device`` in float32 (float64 if given), renormalised after the check."""
        if not isinstance(bank, FeatureBank):
            raise TypeError(f"bank must be a FeatureBank, got {type(bank).__name__}")
        embeddings = bank.embeddings.detach()
        check_floating(embeddings, "bank embeddings")
        check_finite(embeddings, "bank embeddings")
        norms = embeddings.double().norm(dim=1)
        deviation = (norms - 1.0).abs()
        # A half-precision bank stores unit vectors only to its own precision; the rows are renormalised below.
        tolerance = max(_NORM_ATOL, 10 * torch.finfo(embeddings.dtype).eps)
        if float(deviation.max()) > tolerance:
            worst = int(deviation.argmax())
            raise ValueError(
                f"bank embeddings must be L2-normalised (use bank.normalized()): {int((deviation > tolerance).sum())} "
                f"of {len(norms)} rows have a norm off 1 by more than {tolerance:g}, e.g. row {worst} (class "
                f"{int(bank.labels[worst])}) with norm {float(norms[worst]):.6g}"
            )
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        return torch.nn.functional.normalize(embeddings.to(device=device, dtype=dtype), dim=1)

    def _check_class_size(self, class_index: int, size: int, bank_size: int, name: str | None) -> None:
        label = f"class {class_index}" + (f" ({name!r})" if name is not None else "")
        if size == 0:
            raise ValueError(f"{label} has no embedding in the bank")
        neighbours = size - 1 if self.scope == "class" else bank_size - 1
        if self.k > neighbours:
            where = f"{label} has {size} bank embeddings" if self.scope == "class" else f"the bank has {bank_size}"
            raise ValueError(
                f"k={self.k} is too large: {where}, so at most {neighbours} neighbours exist besides a point itself"
            )
        if self.boundary_size > size:
            raise ValueError(f"boundary_size={self.boundary_size} exceeds the {size} bank embeddings of {label}")


class _CandidateScorer:
    """Exact k-NN scoring of the candidates ``z_gi + sigma * eps_gj`` of ``G`` groups against unit-norm keys.

    ``anchors`` is ``(G, a, m)`` and ``noise`` ``(G, P, m)``: the anchors of a group share its noise. With
    ``x = Z K^T`` and ``w = sigma E K^T`` the similarity of candidate ``(g, i, j)`` to key ``b`` is
    ``(x[g, i, b] + w[g, j, b]) / norm[g, i, j]``. ``w`` is computed per block of keys so that it fits the
    budget, and kept when one block covers all keys.
    """

    def __init__(self, anchors: Tensor, noise: Tensor, keys: Tensor, k: int, sigma: float, budget: int) -> None:
        self.anchors, self.noise, self.keys = anchors, noise, keys
        self.k, self.sigma, self.budget = k, sigma, budget
        groups, num_noise, num_keys = noise.shape[0], noise.shape[1], keys.shape[0]
        self.x = torch.matmul(anchors, keys.T)
        block = max(1, min(num_keys, (budget // 2) // (groups * num_noise)))
        self.blocks = [slice(start, min(start + block, num_keys)) for start in range(0, num_keys, block)]
        self._w: Tensor | None = None
        squared = (
            anchors.square().sum(-1, keepdim=True)
            + (2 * sigma) * torch.bmm(anchors, noise.transpose(1, 2))
            + sigma**2 * noise.square().sum(-1)[:, None, :]
        )
        self.norm = squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()

    def noise_similarity(self, block: slice) -> Tensor:
        """``w[:, :, block] = sigma * noise @ keys[block]^T``, shape ``(G, P, block size)``."""
        if self._w is not None:
            return self._w
        w = torch.matmul(self.noise, self.keys[block].T).mul_(self.sigma)
        if len(self.blocks) == 1:
            self._w = w
        return w

    def kth_similarity(self, group: Tensor, anchor: Tensor, candidate: Tensor) -> Tensor:
        """Exact k-th largest of ``x[g, i, :] + w[g, j, :]`` for the listed triples, shape ``(Q,)``."""
        total = len(group)
        num_keys = self.keys.shape[0]
        result = torch.empty(total, dtype=self.x.dtype, device=self.x.device)
        step = max(1, self.budget // (4 * num_keys))
        for start in range(0, total, step):
            g, i, j = group[start : start + step], anchor[start : start + step], candidate[start : start + step]
            best: Tensor | None = None
            for block in self.blocks:
                values = self.x[g, i, block] + self.noise_similarity(block)[g, j]
                top = values.topk(min(self.k, values.shape[1]), dim=1, sorted=False).values
                if best is not None:
                    merged = torch.cat([best, top], dim=1)
                    top = merged.topk(min(self.k, merged.shape[1]), dim=1, sorted=False).values
                best = top
            assert best is not None
            result[start : start + step] = best.amin(dim=1)
        return result

    def count_above(self, threshold: Tensor) -> Tensor:
        """Number of keys ``b`` with ``x[g, i, b] + w[g, j, b] > threshold[g, i, j]``, shape ``(G, a, P)``."""
        groups, num_anchors, num_noise = threshold.shape
        counts = torch.zeros_like(threshold)
        for block in self.blocks:
            w = self.noise_similarity(block)
            width = w.shape[2]
            step_elements = self.budget // 4 if w.device.type == "cuda" else min(_COUNT_STEP_ELEMENTS, self.budget // 4)
            step = max(1, min(num_anchors, step_elements // (num_noise * width)))
            scratch = torch.empty(step * num_noise * width, dtype=w.dtype, device=w.device)
            for g in range(groups):
                for start in range(0, num_anchors, step):
                    stop = min(start + step, num_anchors)
                    out = scratch[: (stop - start) * num_noise * width].view(stop - start, num_noise, width)
                    # The same float sums as kth_similarity, so the count agrees exactly with the k-th value.
                    torch.add(self.x[g, start:stop, None, block], w[g], out=out)
                    counts[g, start:stop] += out.gt_(threshold[g, start:stop, :, None]).sum(dim=2)
        return counts

    def estimate(self) -> Tensor:
        """Cheap estimate of every candidate's k-th largest similarity, ``(G, a, P)``; it only orders the pilots.

        The anchor's own k-th largest similarity to the keys, shifted by the noise's projection on the mean of
        the keys ranked around ``k`` for that anchor.
        """
        num_keys = self.x.shape[2]
        half = max(1, min(self.k, num_keys - self.k + 1) // 6)
        low, high = max(0, self.k - 1 - half), min(num_keys, self.k + half)
        ranked = self.x.topk(high, dim=2).indices
        kth = self.x.gather(2, ranked[:, :, self.k - 1 : self.k])
        weights = torch.zeros_like(self.x).scatter_(2, ranked[:, :, low:high], 1.0 / (high - low))
        centre = torch.matmul(weights, self.keys)
        shift = torch.bmm(centre, self.noise.transpose(1, 2)).mul_(self.sigma)
        return (kth + shift) / self.norm

    def all_distances(self) -> Tensor:
        """Exact k-NN distance of every candidate, ``(G, a, P)``."""
        groups, num_anchors, num_noise = self.norm.shape
        g, i, j = torch.meshgrid(
            torch.arange(groups, device=self.x.device),
            torch.arange(num_anchors, device=self.x.device),
            torch.arange(num_noise, device=self.x.device),
            indexing="ij",
        )
        similarity = self.kth_similarity(g.flatten(), i.flatten(), j.flatten()).view_as(self.norm) / self.norm
        return _distance(similarity)

    def select(self, keep: int, largest: bool) -> tuple[Tensor, Tensor]:
        """Per anchor the ``keep`` candidates of largest (``largest``) or smallest k-NN distance, best first.

        Returns:
            ``(index, distance)``, each ``(G, a, keep)``.
        """
        num_noise = self.norm.shape[2]
        # Largest distance means smallest similarity.
        similarity = torch.full_like(self.norm, math.inf if largest else -math.inf)
        pilots = min(num_noise, max(_PILOT, 2 * keep))
        if pilots == num_noise:
            survivors = torch.ones_like(self.norm, dtype=torch.bool)
        else:
            pilot = self.estimate().topk(pilots, dim=2, largest=not largest).indices
            g, i = _grid(pilot)
            pilot_similarity = self.kth_similarity(g, i, pilot.flatten()).view_as(pilot) / self.norm.gather(2, pilot)
            similarity.scatter_(2, pilot, pilot_similarity)
            theta = pilot_similarity.kthvalue(keep if largest else pilots - keep + 1, dim=2, keepdim=True).values
            # keep pilots reach theta; a candidate with k keys above theta * norm (+ margin) lies beyond it.
            if largest:
                survivors = self.count_above(theta * self.norm + _SLACK) < self.k
            else:
                survivors = self.count_above(theta * self.norm - _SLACK) >= self.k
            survivors.scatter_(2, pilot, False)
        g, i, j = torch.nonzero(survivors, as_tuple=True)
        similarity[g, i, j] = self.kth_similarity(g, i, j) / self.norm[g, i, j]
        best, index = similarity.topk(keep, dim=2, largest=not largest)
        return index, _distance(best)


def _distance(similarity: Tensor) -> Tensor:
    """Euclidean distance between unit vectors from their cosine similarity."""
    return (2.0 - 2.0 * similarity).clamp_(min=0.0).sqrt_()


def _grid(index: Tensor) -> tuple[Tensor, Tensor]:
    """Group and anchor index of every entry of a ``(G, a, c)`` index tensor, flattened."""
    groups, num_anchors, count = index.shape
    g = torch.arange(groups, device=index.device)[:, None, None].expand(groups, num_anchors, count)
    i = torch.arange(num_anchors, device=index.device)[None, :, None].expand(groups, num_anchors, count)
    return g.flatten(), i.flatten()


def _budget_elements(memory_budget_mb: float) -> int:
    return max(1, int(memory_budget_mb * 2**20) // 4)


def _check_candidate_inputs(
    anchors: Tensor, noise: Tensor, keys: Tensor, k: int, sigma: float, memory_budget_mb: float
) -> tuple[Tensor, Tensor, Tensor, bool]:
    z = as_tensor(anchors, "anchors")
    eps = as_tensor(noise, "noise")
    unit = as_tensor(keys, "keys")
    for tensor, name in ((z, "anchors"), (eps, "noise"), (unit, "keys")):
        check_floating(tensor, name)
        check_finite(tensor, name)
    if unit.dim() != 2 or unit.shape[0] == 0:
        raise ValueError(f"keys must be a non-empty 2-D tensor (n, m), got shape {tuple(unit.shape)}")
    grouped = z.dim() == 3
    if z.dim() not in (2, 3) or eps.dim() != z.dim():
        raise ValueError(
            f"anchors and noise must both be 2-D ((a, m), (P, m)) or both 3-D ((G, a, m), (G, P, m)), got shapes "
            f"{tuple(z.shape)} and {tuple(eps.shape)}"
        )
    if not grouped:
        z, eps = z.unsqueeze(0), eps.unsqueeze(0)
    if z.shape[0] != eps.shape[0] or z.shape[2] != unit.shape[1] or eps.shape[2] != unit.shape[1]:
        raise ValueError(
            f"shapes disagree: anchors {tuple(z.shape)}, noise {tuple(eps.shape)} and keys {tuple(unit.shape)} "
            "must share the group count and the dimension m"
        )
    if min(z.shape[1], eps.shape[1]) == 0:
        raise ValueError(f"anchors and noise need at least one row, got {tuple(z.shape)} and {tuple(eps.shape)}")
    check_positive_int(k, "k")
    if k > unit.shape[0]:
        raise ValueError(f"k must be <= the number of keys ({unit.shape[0]}), got {k}")
    check_positive(sigma, "sigma")
    check_positive(memory_budget_mb, "memory_budget_mb")
    norms = unit.double().norm(dim=1)
    worst = int((norms - 1.0).abs().argmax())
    if abs(float(norms[worst]) - 1.0) > _NORM_ATOL:
        raise ValueError(f"keys must be L2-normalised: row {worst} has norm {float(norms[worst]):.6g}")
    dtype = torch.float64 if torch.float64 in (z.dtype, eps.dtype, unit.dtype) else torch.float32
    device = z.device
    unit = torch.nn.functional.normalize(unit.to(device, dtype), dim=1)
    return z.to(dtype), eps.to(device, dtype), unit, grouped
