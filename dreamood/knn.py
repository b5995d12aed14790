"""Exact k-nearest-neighbour search by Euclidean distance, on any device.

Two backends compute the same exact answer:

* ``"torch"``: blocked brute force on CPU or CUDA. Candidates are ranked by the expansion of the squared
  distance ``||q||^2 + ||k||^2 - 2 q.k`` without its ``||q||^2`` term, which is constant along a query's row
  and cannot change the ranking: one matrix product per block (the fast path) and ``topk`` of the ``k``
  smallest. It runs in float32 (float64 when an input is float64). Queries (and, when one row of keys does
  not fit, keys) are processed in blocks so that the scratch memory stays within ``memory_budget_mb``.
* ``"faiss"``: ``faiss.IndexFlatL2`` (exact, CPU, float32), imported only when used.

The expansion's absolute error on a squared distance is about ``eps * (||q||^2 + ||k||^2)``; after the square
root that is large *relative* to small distances (a row's distance to an identical row can come out as
``1e-4`` in float32). So both backends only *rank* with it: the returned distances of the ``k`` selected
neighbours are recomputed directly as ``||q - k||`` in the compute dtype (float32, float64 when an input is
float64) and each row is re-sorted by them. Identical rows are then exactly 0 apart, and the backends agree
to the last bits of their dtype. Only a neighbour whose distance is within the expansion's rounding of the
``k``-th one can be ranked differently than exact arithmetic would rank it.

``"auto"`` picks faiss when it is installed, the search runs on the CPU, no input is float64, and the search
is large (at least ``2**22`` query-key pairs); otherwise torch.

Ties: among neighbours at exactly the same distance the order (and hence which indices are returned at the
boundary of the ``k``-th neighbour) is unspecified and may differ between backends; the distances are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from dreamood._utils import DeviceLike, resolve_device
from dreamood._validation import (
    as_tensor,
    check_choice,
    check_finite,
    check_floating,
    check_positive,
    check_positive_int,
    check_rank,
)
from dreamood.errors import NonFiniteError, NotFittedError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Backend", "ExactNearestNeighbors", "knn_search", "kth_neighbor_distance"]

Backend = Literal["auto", "torch", "faiss"]

# "auto" sends CPU searches of at least this many query-key pairs to faiss. On a 2-core AMD EPYC both backends
# used about the same CPU time for 2.5e4 to 4e7 pairs (d 64 to 768, k 10 to 300); small searches stay in torch,
# which avoids copying the inputs into NumPy float32.
_FAISS_MIN_PAIRS = 2**22
# The distance block and the workspace of topk over it are alive together.
_BLOCKS_ALIVE = 2


def knn_search(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    backend: Backend = "auto",
    device: DeviceLike = None,
    memory_budget_mb: float = 512.0,
) -> tuple[Tensor, Tensor]:
    """Find the exact ``k`` nearest keys of every query by Euclidean distance.

    Args:
        queries: Query rows ``(N, d)``, floating point and finite (a tensor or a NumPy array).
        keys: Key rows ``(M, d)``, floating point and finite.
        k: Number of neighbours, ``1 <= k <= M`` (``k <= M - 1`` with ``exclude_self``).
        exclude_self: The queries *are* the keys (same rows in the same order); row ``i`` never counts
            itself as its own neighbour. Other rows identical to row ``i`` still count, at distance 0.
        backend: ``"torch"``, ``"faiss"`` (CPU only) or ``"auto"`` (see the module documentation).
        device: Where the search runs. ``None`` means the device of ``queries``; ``"auto"`` means CUDA when
            available, else CPU.
        memory_budget_mb: Bound on the scratch memory of one distance block of the torch backend (inputs and
            outputs are not counted). Results do not depend on it.

    Returns:
        ``(distances, indices)``: distances ``(N, k)`` in ascending order per row, float32 (float64 when an
        input is float64), on the device of ``queries``; indices ``(N, k)`` int64 into ``keys``, same device.

    Raises:
        TypeError: If an input is not a floating-point tensor or array, or ``k`` is not an int.
        ValueError: If shapes disagree, ``k`` is out of range, ``backend`` is unknown, faiss is asked to run
            on a non-CPU device or is not installed, or ``exclude_self`` is set but queries differ from keys.
        NonFiniteError: If an input contains NaN or infinity, or the distances overflow the dtype.
    """
    queries = _check_points(queries, "queries")
    keys = _check_points(keys, "keys")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must have the same number of columns, got queries {tuple(queries.shape)} "
            f"and keys {tuple(keys.shape)}"
        )
    _check_k(k, keys.shape[0], exclude_self)
    check_choice(backend, get_args(Backend), "backend")
    check_positive(memory_budget_mb, "memory_budget_mb")
    output_device = queries.device
    compute_device = queries.device if device is None else resolve_device(device)
    dtype = torch.float64 if torch.float64 in (queries.dtype, keys.dtype) else torch.float32
    queries = queries.to(compute_device, dtype)
    keys = keys.to(compute_device, dtype)
    if exclude_self and (queries.shape != keys.shape or not torch.equal(queries, keys)):
        raise ValueError(
            "exclude_self=True requires queries to be the same rows as keys in the same order, got queries "
            f"{tuple(queries.shape)} and keys {tuple(keys.shape)} that differ"
        )

    chosen = _choose_backend(backend, compute_device, dtype, queries.shape[0] * keys.shape[0])
    if queries.shape[0] == 0:
        distances = torch.empty(0, k, dtype=dtype, device=output_device)
        return distances, torch.empty(0, k, dtype=torch.int64, device=output_device)
    budget_elements = _budget_elements(memory_budget_mb, queries.element_size())
    if chosen == "faiss":
        indices = _faiss_search(queries, keys, k, exclude_self)
    else:
        indices = _torch_search(queries, keys, k, exclude_self, budget_elements)
    distances, indices = _exact_distances(queries, keys, indices, budget_elements)
    if not bool(torch.isfinite(distances).all()):
        raise NonFiniteError(
            f"distances overflowed {dtype}: the inputs are too large in magnitude; rescale them or pass float64"
        )
    return distances.to(output_device), indices.to(output_device)


def kth_neighbor_distance(
    queries: Tensor,
    keys: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    backend: Backend = "auto",
    device: DeviceLike = None,
    memory_budget_mb: float = 512.0,
) -> Tensor:
    """Distance from every query to its ``k``-th nearest key (the k-NN distance of DREAM-OOD Eq. 5).

    Args:
        queries: Query rows ``(N, d)``.
        keys: Key rows ``(M, d)``.
        k: Which neighbour, counted from 1.
        exclude_self: The queries are the keys; a row is not its own neighbour.
        backend: ``"auto"``, ``"torch"`` or ``"faiss"``.
        device: Where the search runs (``None``: the device of ``queries``).
        memory_budget_mb: Scratch memory bound of the torch backend.

    Returns:
        Distances ``(N,)`` on the device of ``queries``.

    Raises:
        TypeError: See :func:`knn_search`.
        ValueError: See :func:`knn_search`.
        NonFiniteError: See :func:`knn_search`.
    """
    distances, _ = knn_search(
        queries,
        keys,
        k,
        exclude_self=exclude_self,
        backend=backend,
        device=device,
        memory_budget_mb=memory_budget_mb,
    )
    return distances[:, k - 1]


class ExactNearestNeighbors:
    """Exact k-NN index over a fixed set of keys, in the style of ``sklearn.neighbors.NearestNeighbors``.

    Args:
        k: Default number of neighbours returned by :meth:`kneighbors`.
        backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see :func:`knn_search`).
        device: Where searches run (``None``: the device of the queries).
        memory_budget_mb: Scratch memory bound of the torch backend.

    Attributes:
        keys_: The fitted keys ``(M, d)``.
        n_features_in_: ``d``.

    Raises:
        TypeError: If ``k`` is not an int.
        ValueError: If ``k`` is not positive, ``backend`` is unknown or ``memory_budget_mb`` is not positive.
    """

    def __init__(
        self,
        k: int = 1,
        backend: Backend = "auto",
        device: DeviceLike = None,
        memory_budget_mb: float = 512.0,
    ) -> None:
        check_positive_int(k, "k")
        check_choice(backend, get_args(Backend), "backend")
        check_positive(memory_budget_mb, "memory_budget_mb")
        self.k = k
        self.backend: Backend = backend
        self.device = device
        self.memory_budget_mb = memory_budget_mb

    def fit(self, keys: Tensor) -> Self:
        """Store the keys to search.

        Args:
            keys: Key rows ``(M, d)``, floating point and finite.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``keys`` is not a floating-point tensor or array.
            ValueError: If ``keys`` is not 2-D or has no rows.
            NonFiniteError: If ``keys`` contains NaN or infinity.
        """
        keys = _check_points(keys, "keys")
        if keys.shape[0] == 0:
            raise ValueError("keys must have at least one row, got shape (0, d)")
        self.keys_ = keys.detach()
        self.n_features_in_ = int(keys.shape[1])
        return self

    def kneighbors(self, queries: Tensor, k: int | None = None, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
        """Return the ``k`` nearest fitted keys of every query.

        Args:
            queries: Query rows ``(N, d)``.
            k: Number of neighbours; ``None`` uses the ``k`` given at construction.
            exclude_self: The queries are the fitted keys; a row is not its own neighbour.

        Returns:
            ``(distances, indices)``, each ``(N, k)``, as in :func:`knn_search`.

        Raises:
            NotFittedError: If :meth:`fit` has not been called.
            TypeError: See :func:`knn_search`.
            ValueError: See :func:`knn_search`.
        """
        if not hasattr(self, "keys_"):
            raise NotFittedError("ExactNearestNeighbors is not fitted: call fit(keys) first")
        return knn_search(
            queries,
            self.keys_,
            self.k if k is None else k,
            exclude_self=exclude_self,
            backend=self.backend,
            device=self.device,
            memory_budget_mb=self.memory_budget_mb,
        )


def _check_points(points: Tensor, name: str) -> Tensor:
    points = as_tensor(points, name)
    check_rank(points, 2, name, "(n, d)")
    check_floating(points, name)
    check_finite(points, name)
    if points.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(points.shape)}")
    return points.detach()


def _check_k(k: int, n_keys: int, exclude_self: bool) -> None:
    check_positive_int(k, "k")
    limit = n_keys - 1 if exclude_self else n_keys
    if k > limit:
        detail = f"len(keys) - 1 = {limit} with exclude_self=True" if exclude_self else f"len(keys) = {limit}"
        raise ValueError(f"k must be <= {detail}, got k={k}")


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _choose_backend(backend: str, device: torch.device, dtype: torch.dtype, n_pairs: int) -> str:
    if backend == "faiss":
        if device.type != "cpu":
            raise ValueError(f"backend='faiss' runs on the CPU only (faiss-cpu), got device={str(device)!r}")
        if not _faiss_available():
            raise ValueError("backend='faiss' needs the faiss package: pip install faiss-cpu")
        return "faiss"
    if backend == "torch":
        return "torch"
    if device.type == "cpu" and dtype != torch.float64 and n_pairs >= _FAISS_MIN_PAIRS and _faiss_available():
        return "faiss"
    return "torch"


def _budget_elements(memory_budget_mb: float, element_size: int) -> int:
    """How many entries one scratch block may hold under the memory budget."""
    return max(1, int(memory_budget_mb * 2**20) // (element_size * _BLOCKS_ALIVE))


def _torch_search(queries: Tensor, keys: Tensor, k: int, exclude_self: bool, budget_elements: int) -> Tensor:
    """Indices ``(N, k)`` of the nearest keys by the expanded squared distance, in blocks of queries and keys."""
    n_queries, n_keys = queries.shape[0], keys.shape[0]
    key_block = min(n_keys, budget_elements)
    query_block = max(1, budget_elements // key_block)
    key_norms = keys.pow(2).sum(dim=1)
    out = torch.empty(n_queries, k, dtype=torch.int64, device=queries.device)
    for q_start in range(0, n_queries, query_block):
        q = queries[q_start : q_start + query_block]
        best_values: Tensor | None = None
        best_indices: Tensor | None = None
        for k_start in range(0, n_keys, key_block):
            block_keys = keys[k_start : k_start + key_block]
            # ||k||^2 - 2 q.k: the squared distance minus ||q||^2, which is the same along a row and so does not
            # change the ranking; the distances themselves are recomputed exactly afterwards.
            shifted = torch.addmm(key_norms[k_start : k_start + key_block].unsqueeze(0), q, block_keys.T, alpha=-2.0)
            if exclude_self:
                _mask_self(shifted, q_start, k_start)
            values, indices = shifted.topk(min(k, shifted.shape[1]), dim=1, largest=False)
            indices += k_start
            if best_values is None or best_indices is None:
                best_values, best_indices = values, indices
            else:
                merged_values = torch.cat([best_values, values], dim=1)
                merged_indices = torch.cat([best_indices, indices], dim=1)
                best_values, order = merged_values.topk(min(k, merged_values.shape[1]), dim=1, largest=False)
                best_indices = merged_indices.gather(1, order)
        assert best_indices is not None
        out[q_start : q_start + query_block] = best_indices
    return out


def _mask_self(block: Tensor, q_start: int, k_start: int) -> None:
    """Set the entries pairing query row ``q_start + i`` with key row ``q_start + i`` to infinity."""
    n_rows, n_cols = block.shape
    first = max(q_start, k_start)
    last = min(q_start + n_rows, k_start + n_cols)
    if first < last:
        rows = torch.arange(first, last, device=block.device)
        block[rows - q_start, rows - k_start] = float("inf")


def _faiss_search(queries: Tensor, keys: Tensor, k: int, exclude_self: bool) -> Tensor:
    """Indices ``(N, k)`` of the nearest keys from ``faiss.IndexFlatL2``."""
    import faiss
    import numpy as np

    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(np.ascontiguousarray(keys.to(torch.float32).numpy()))
    queries_np = np.ascontiguousarray(queries.to(torch.float32).numpy())
    _, indices_np = index.search(queries_np, k + 1 if exclude_self else k)
    indices = torch.from_numpy(indices_np).to(torch.int64)
    return _drop_self(indices) if exclude_self else indices


def _drop_self(indices: Tensor) -> Tensor:
    """Remove each row's own index from its ``k + 1`` neighbours (the last one when exact duplicates hid it)."""
    rows = torch.arange(indices.shape[0]).unsqueeze(1)
    drop = indices == rows
    drop[:, -1] |= ~drop.any(dim=1)
    return indices[~drop].view(indices.shape[0], indices.shape[1] - 1)


def _exact_distances(queries: Tensor, keys: Tensor, indices: Tensor, budget_elements: int) -> tuple[Tensor, Tensor]:
    """Distances ``||q - k||`` of the selected neighbours computed from differences, rows sorted ascending."""
    n_queries, k = indices.shape
    distances = torch.empty(n_queries, k, dtype=queries.dtype, device=queries.device)
    # One block of gathered neighbours (k * d entries per query) is alive at a time.
    rows_per_block = max(1, budget_elements // (k * queries.shape[1]))
    for start in range(0, n_queries, rows_per_block):
        block = indices[start : start + rows_per_block]
        differences = keys.index_select(0, block.reshape(-1)).view(block.shape[0], k, -1)
        differences.sub_(queries[start : start + rows_per_block].unsqueeze(1))
        distances[start : start + rows_per_block] = torch.linalg.vector_norm(differences, dim=2)
    distances, order = distances.sort(dim=1, stable=True)
    return distances, indices.gather(1, order)
