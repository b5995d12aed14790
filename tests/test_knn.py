"""Exact k-NN search: against float64 brute force, scikit-learn, across backends and block sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.detectors.base import NotFittedError
from dreamood.errors import NonFiniteError
from dreamood.knn import ExactNearestNeighbors, _choose_backend, knn_search, kth_neighbor_distance


def _points(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype)


def _brute_force(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False):
    distances = torch.cdist(queries.double(), keys.double(), compute_mode="donot_use_mm_for_euclid_dist")
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.topk(k, dim=1, largest=False)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_matches_float64_brute_force(backend: str) -> None:
    queries, keys = _points(60, 8, 0), _points(200, 8, 1)
    distances, indices = knn_search(queries, keys, 7, backend=backend)
    expected_distances, expected_indices = _brute_force(queries, keys, 7)
    # faiss ranks in float32, but returned distances are recomputed in the input's float64.
    assert distances.dtype == torch.float64
    torch.testing.assert_close(distances, expected_distances, rtol=0, atol=1e-12)
    assert torch.equal(indices, expected_indices)
    assert indices.dtype == torch.int64


def test_float32_input_stays_float32_and_close_to_float64() -> None:
    queries, keys = _points(50, 16, 2, torch.float32), _points(300, 16, 3, torch.float32)
    distances, indices = knn_search(queries, keys, 5, backend="torch")
    assert distances.dtype == torch.float32
    expected_distances, expected_indices = _brute_force(queries, keys, 5)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=0, atol=1e-5)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_matches_sklearn(backend: str) -> None:
    from sklearn.neighbors import NearestNeighbors

    queries, keys = _points(40, 5, 4), _points(150, 5, 5)
    expected_distances, expected_indices = (
        NearestNeighbors(n_neighbors=10).fit(keys.numpy()).kneighbors(queries.numpy())
    )
    distances, indices = knn_search(queries, keys, 10, backend=backend)
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(indices.numpy(), expected_indices)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclude_self_matches_masked_brute_force(backend: str) -> None:
    points = _points(120, 6, 6)
    distances, indices = knn_search(points, points, 4, exclude_self=True, backend=backend)
    expected_distances, expected_indices = _brute_force(points, points, 4, exclude_self=True)
    torch.testing.assert_close(distances, expected_distances, rtol=0, atol=1e-12)
    assert torch.equal(indices, expected_indices)
    assert not bool((indices == torch.arange(120).unsqueeze(1)).any())


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclude_self_with_exact_duplicates(backend: str) -> None:
    base = _points(10, 3, 7)
    points = torch.cat([base, base, base])  # every row has two exact copies elsewhere
    distances, indices = knn_search(points, points, 3, exclude_self=True, backend=backend)
    rows = torch.arange(30).unsqueeze(1)
    assert not bool((indices == rows).any())
    # The two copies are the nearest others, at distance 0; the third neighbour is the nearest distinct point.
    assert bool((distances[:, :2] == 0).all())
    assert torch.equal(indices[:, :2].sort(dim=1).values % 10, rows.expand(30, 2) % 10)
    expected = _brute_force(points, points, 3, exclude_self=True).values[:, 2]
    torch.testing.assert_close(distances[:, 2], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_tiny_memory_budget_gives_the_same_result(exclude_self: bool) -> None:
    points = _points(90, 4, 8)
    reference = knn_search(points, points, 6, exclude_self=exclude_self, backend="torch", memory_budget_mb=512)
    # 1e-4 MB holds 6 float64 entries per block: key blocks smaller than k, one query row per block.
    for budget in (1e-4, 2e-3, 0.05):
        distances, indices = knn_search(
            points, points, 6, exclude_self=exclude_self, backend="torch", memory_budget_mb=budget
        )
        assert torch.equal(distances, reference[0])
        assert torch.equal(indices, reference[1])


def test_backends_agree_on_float32() -> None:
    queries, keys = _points(256, 32, 9, torch.float32), _points(1000, 32, 10, torch.float32)
    torch_result = knn_search(queries, keys, 20, backend="torch")
    faiss_result = knn_search(queries, keys, 20, backend="faiss")
    assert torch.equal(torch_result[0], faiss_result[0])
    assert torch.equal(torch_result[1], faiss_result[1])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_identical_rows_are_exactly_zero_apart(backend: str) -> None:
    # The expanded form gives about sqrt(eps) * ||x|| for a row against itself; the returned distance is exact.
    points = 100.0 * _points(64, 32, 21, torch.float32)
    distances, indices = knn_search(points, points, 2, backend=backend)
    assert bool((distances[:, 0] == 0).all())
    assert torch.equal(indices[:, 0], torch.arange(64))


def test_kth_neighbor_distance_is_the_kth_column() -> None:
    queries, keys = _points(30, 4, 11), _points(80, 4, 12)
    expected = _brute_force(queries, keys, 9).values[:, 8]
    torch.testing.assert_close(kth_neighbor_distance(queries, keys, 9), expected, rtol=0, atol=1e-10)
    points = _points(50, 4, 13)
    expected_self = _brute_force(points, points, 3, exclude_self=True).values[:, 2]
    torch.testing.assert_close(kth_neighbor_distance(points, points, 3, exclude_self=True), expected_self)


def test_k_equal_to_number_of_keys_and_numpy_input() -> None:
    queries, keys = _points(5, 3, 14), _points(7, 3, 15)
    distances, indices = knn_search(queries.numpy(), keys.numpy(), 7)
    assert torch.equal(indices.sort(dim=1).values, torch.arange(7).expand(5, 7))
    assert bool((distances[:, 1:] >= distances[:, :-1]).all())


def test_empty_queries() -> None:
    distances, indices = knn_search(torch.empty(0, 3), _points(4, 3, 16, torch.float32), 2)
    assert distances.shape == (0, 2) and indices.shape == (0, 2)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64


def test_auto_backend_rule() -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert _choose_backend("auto", cpu, torch.float32, 100) == "torch"
    assert _choose_backend("auto", cpu, torch.float32, 2**30) == "faiss"
    assert _choose_backend("auto", cpu, torch.float64, 2**30) == "torch"
    assert _choose_backend("auto", meta, torch.float32, 2**30) == "torch"
    assert _choose_backend("torch", cpu, torch.float32, 2**30) == "torch"


@pytest.mark.parametrize(
    ("queries", "keys", "k", "kwargs", "error", "match"),
    [
        (torch.zeros(3), torch.zeros(4, 3), 1, {}, ValueError, "queries must be a 2-D"),
        (torch.zeros(3, 2), torch.zeros(4, 3), 1, {}, ValueError, "same number of columns"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 0, {}, ValueError, "k must be > 0"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 5, {}, ValueError, r"k must be <= len\(keys\) = 4, got k=5"),
        (torch.zeros(4, 2), torch.zeros(4, 2), 4, {"exclude_self": True}, ValueError, "len\\(keys\\) - 1 = 3"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 2.0, {}, TypeError, "k must be an int"),
        (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(4, 2), 1, {}, TypeError, "queries must have a floating"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(4, 2), 1, {}, NonFiniteError, "queries contains 1 NaN"),
        (torch.zeros(3, 2), torch.full((4, 2), float("inf")), 1, {}, NonFiniteError, "keys contains 0 NaN and 8"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 1, {"backend": "annoy"}, ValueError, "backend must be one of"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 1, {"memory_budget_mb": 0.0}, ValueError, "memory_budget_mb"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 1, {"exclude_self": True}, ValueError, "same rows as keys"),
        (torch.zeros(3, 2), torch.zeros(4, 2), 1, {"backend": "faiss", "device": "meta"}, ValueError, "CPU only"),
        ("abc", torch.zeros(4, 2), 1, {}, TypeError, "queries must"),
    ],
)
def test_invalid_arguments(queries, keys, k, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        knn_search(queries, keys, k, **kwargs)


def test_overflowing_distances_raise() -> None:
    huge = torch.full((3, 2), 3e38)
    with pytest.raises(NonFiniteError, match="overflowed"):
        knn_search(huge, -huge, 1, backend="torch")


def test_estimator_matches_function_and_checks_fit() -> None:
    keys, queries = _points(100, 5, 17), _points(20, 5, 18)
    index = ExactNearestNeighbors(k=4, backend="torch")
    with pytest.raises(NotFittedError, match="call fit"):
        index.kneighbors(queries)
    assert index.fit(keys) is index
    assert index.n_features_in_ == 5 and index.keys_ is not None
    for got, expected in zip(index.kneighbors(queries), knn_search(queries, keys, 4)):
        assert torch.equal(got, expected)
    assert index.kneighbors(queries, k=2)[0].shape == (20, 2)
    self_distances, _ = index.kneighbors(keys, exclude_self=True)
    torch.testing.assert_close(self_distances, _brute_force(keys, keys, 4, exclude_self=True).values)
    with pytest.raises(ValueError, match="k must be > 0"):
        ExactNearestNeighbors(k=0)


@settings(max_examples=30, deadline=None)
@given(
    n_queries=st.integers(1, 12),
    n_keys=st.integers(2, 40),
    dim=st.integers(1, 6),
    k_fraction=st.floats(0.0, 1.0),
    budget=st.sampled_from([1e-5, 1e-3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_neighbours_are_sorted_valid_and_nearest(n_queries, n_keys, dim, k_fraction, budget, seed) -> None:
    queries, keys = _points(n_queries, dim, seed), _points(n_keys, dim, seed + 1)
    k = 1 + int(k_fraction * (n_keys - 1))
    distances, indices = knn_search(queries, keys, k, backend="torch", memory_budget_mb=budget)
    assert distances.shape == indices.shape == (n_queries, k)
    assert bool((distances[:, 1:] >= distances[:, :-1]).all())
    assert all(len(set(row)) == k for row in indices.tolist())
    recomputed = (queries.unsqueeze(1) - keys[indices]).norm(dim=2)
    torch.testing.assert_close(distances, recomputed, rtol=0, atol=1e-10)
    # No key outside the returned set is closer than the k-th returned neighbour.
    all_distances = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist")
    outside = all_distances.scatter(1, indices, float("inf"))
    assert bool((outside.min(dim=1).values >= distances[:, -1] - 1e-10).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    queries, keys = _points(300, 16, 19, torch.float32), _points(2000, 16, 20, torch.float32)
    cpu_distances, cpu_indices = knn_search(queries, keys, 10, backend="torch")
    distances, indices = knn_search(queries.cuda(), keys.cuda(), 10, memory_budget_mb=0.5)
    assert distances.device.type == "cuda"
    torch.testing.assert_close(distances.cpu(), cpu_distances, rtol=0, atol=1e-4)
    assert torch.equal(indices.cpu(), cpu_indices)
    distances, _ = knn_search(queries, keys, 10, device="cuda")
    assert distances.device.type == "cpu"
    torch.testing.assert_close(distances, cpu_distances, rtol=0, atol=1e-4)


def test_benchmark_script_runs_and_backends_agree(tmp_path) -> None:
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_knn.py"
    spec = importlib.util.spec_from_file_location("bench_knn", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "knn.json"
    args = ["--queries", "40", "--keys", "300", "--dim", "16", "-k", "5", "--repeats", "1", "--out", str(out)]
    results = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert [row["backend"] for row in results["results"]] == ["torch", "faiss"]
    assert results["results"][1]["max_abs_score_difference_to_first"] == 0.0
