"""The reference k-NN boundary sampling procedure, reimplemented plainly: per class, per round, brute force.

Du et al., "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023, Eq. 5, as run by
the authors' public code: per class, the k-NN distance of every bank embedding, the ``boundary_size``
largest (outliers) or smallest (inliers) form the anchor set; every round draws ``anchors_per_round``
distinct anchors and one ``(candidates_per_anchor, m)`` standard-normal noise matrix shared by the anchors;
every candidate ``normalize(z + sigma * eps)`` is materialised and its k-NN distance to the class's bank is
computed by brute force; per anchor the ``keep_per_anchor`` best candidates are kept (this is where the
reference code ranks one set and returns another; here the ranking is done per anchor).

It draws its random numbers in the same order as :class:`dreamood.sampling.knn_boundary.KNNBoundarySampler`
with ``noise="shared"`` and ``scope="class"``, so both return the same samples. It serves as the baseline of
``benchmarks/bench_sampler.py`` and as an independent check in ``tests/test_knn_boundary.py``; it is not part
of the library.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def reference_sample(
    embeddings: Tensor,
    labels: Tensor,
    token_norms: Tensor,
    num_per_class: int,
    *,
    k: int = 300,
    boundary_size: int = 200,
    anchors_per_round: int = 50,
    candidates_per_anchor: int = 1500,
    sigma: float = 0.03,
    keep_per_anchor: int = 2,
    mode: str = "outlier",
    generator: torch.Generator,
    classes: list[int] | None = None,
    max_rounds: int | None = None,
    chunk_candidates: int = 20_000,
) -> dict[str, Any]:
    """Sample like the reference code, class by class and round by round, every candidate scored by brute force.

    Args:
        embeddings: Unit-norm bank embeddings ``(N, m)``.
        labels: Class of each row ``(N,)``.
        token_norms: ``||T(y)||`` per class.
        num_per_class: Samples per class.
        k: The k of the k-NN distance; a bank point is not its own neighbour.
        boundary_size: Size of the anchor set.
        anchors_per_round: Anchors drawn per round.
        candidates_per_anchor: Candidates per anchor (rows of the shared noise matrix).
        sigma: Noise standard deviation.
        keep_per_anchor: Candidates kept per anchor.
        mode: ``"outlier"`` (largest distances) or ``"inlier"`` (smallest).
        generator: Draws per round a permutation of the anchor set, then the noise, on its own device; the
            computation runs on ``embeddings``' device.
        classes: Classes to sample (default: all, in order).
        max_rounds: Stop every class after this many rounds (for timing part of a run).
        chunk_candidates: Candidates scored per brute-force step.

    Returns:
        ``vectors``, ``labels``, ``anchor_index`` (global bank rows), ``knn_distance``, and for timing the
        wall-clock and CPU seconds of every class's boundary step and of every round (``boundary_seconds``,
        ``boundary_cpu_seconds``, ``round_seconds``, ``round_cpu_seconds``).
    """
    import time

    outlier = mode == "outlier"
    device = embeddings.device
    per_round = anchors_per_round * keep_per_anchor
    classes = list(range(int(labels.max()) + 1)) if classes is None else classes
    vectors, out_labels, anchor_index, distances = [], [], [], []
    boundary_seconds: list[float] = []
    boundary_cpu_seconds: list[float] = []
    round_seconds: list[float] = []
    round_cpu_seconds: list[float] = []
    for c in classes:
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = torch.nonzero(labels == c).flatten()
        members = embeddings[rows]
        # Bank k-NN in float64, the point itself excluded.
        pairwise = torch.cdist(members.double(), members.double())
        pairwise.fill_diagonal_(math.inf)
        bank_distance = pairwise.kthvalue(k, dim=1).values
        anchor_set = bank_distance.topk(boundary_size, largest=outlier).indices
        _synchronize(device)
        boundary_seconds.append(time.perf_counter() - start)
        boundary_cpu_seconds.append(time.process_time() - cpu_start)

        rounds = math.ceil(num_per_class / per_round)
        if max_rounds is not None:
            rounds = min(rounds, max_rounds)
        class_vectors, class_anchors, class_distances = [], [], []
        for _ in range(rounds):
            start, cpu_start = time.perf_counter(), time.process_time()
            order = torch.randperm(boundary_size, generator=generator, device=generator.device)
            chosen = anchor_set[order[:anchors_per_round].to(device)]
            noise = torch.randn(candidates_per_anchor, members.shape[1], generator=generator, device=generator.device)
            noise = noise.to(device)
            # Anchor-major: candidates[i, j] = normalize(z_i + sigma * eps_j).
            candidates = torch.nn.functional.normalize(members[chosen][:, None, :] + sigma * noise[None], dim=2)
            flat = candidates.reshape(-1, members.shape[1])
            knn = torch.cat(
                [
                    torch.cdist(flat[s : s + chunk_candidates], members).kthvalue(k, dim=1).values
                    for s in range(0, len(flat), chunk_candidates)
                ]
            ).view(anchors_per_round, candidates_per_anchor)
            best, kept = knn.topk(keep_per_anchor, dim=1, largest=outlier)
            class_vectors.append(candidates.gather(1, kept[:, :, None].expand(-1, -1, members.shape[1])).flatten(0, 1))
            class_anchors.append(rows[chosen][:, None].expand(-1, keep_per_anchor).flatten())
            class_distances.append(best.flatten())
            _synchronize(device)
            round_seconds.append(time.perf_counter() - start)
            round_cpu_seconds.append(time.process_time() - cpu_start)
        count = min(num_per_class, rounds * per_round)
        vectors.append(torch.cat(class_vectors)[:count] * token_norms[c])
        anchor_index.append(torch.cat(class_anchors)[:count])
        distances.append(torch.cat(class_distances)[:count])
        out_labels.append(torch.full((count,), c, dtype=torch.long, device=device))
    return {
        "vectors": torch.cat(vectors),
        "labels": torch.cat(out_labels),
        "anchor_index": torch.cat(anchor_index),
        "knn_distance": torch.cat(distances),
        "boundary_seconds": boundary_seconds,
        "boundary_cpu_seconds": boundary_cpu_seconds,
        "round_seconds": round_seconds,
        "round_cpu_seconds": round_cpu_seconds,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
