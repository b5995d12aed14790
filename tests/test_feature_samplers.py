"""VOS and NPOS feature-space samplers: queues, float64 reference computations, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.errors import NonFiniteError
from dreamood.protocols import FeatureOutlierSampler
from dreamood.sampling.feature_samplers import ClassQueues, NPOSSampler, VOSSampler


def _clusters(num_classes: int, per_class: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around well separated class means, shuffled, with their labels."""
    generator = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(num_classes, dim, generator=generator)
    features = means.repeat_interleave(per_class, dim=0) + torch.randn(
        num_classes * per_class, dim, generator=generator
    )
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    order = torch.randperm(len(labels), generator=generator)
    return features[order], labels[order]


def _fill(sampler: VOSSampler | NPOSSampler, features: torch.Tensor, labels: torch.Tensor, batch: int = 16) -> None:
    for start in range(0, len(labels), batch):
        sampler.update(features[start : start + batch], labels[start : start + batch])


def _last_per_class(features: torch.Tensor, labels: torch.Tensor, num_classes: int, size: int) -> list[np.ndarray]:
    """The most recent ``size`` features of every class, oldest first (computed independently of the queues)."""
    return [features[labels == c][-size:].double().numpy() for c in range(num_classes)]


def test_queue_is_fifo_per_class() -> None:
    queues = ClassQueues(num_classes=2, queue_size=4)
    values = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    queues.push(values[:3], torch.tensor([0, 1, 0]))
    assert queues.counts.tolist() == [2, 1]
    assert not queues.full
    assert queues.get(0).flatten().tolist() == [0.0, 2.0]
    queues.push(values[3:10], torch.tensor([0, 0, 0, 1, 0, 1, 1]))
    # Class 0 received 0, 2, 3, 4, 5, 7: the oldest two are gone.
    assert queues.get(0).flatten().tolist() == [3.0, 4.0, 5.0, 7.0]
    assert queues.get(1).flatten().tolist() == [1.0, 6.0, 8.0, 9.0]
    assert queues.full


@settings(max_examples=30, deadline=None)
@given(
    queue_size=st.integers(1, 6),
    batches=st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=9), min_size=1, max_size=6),
)
def test_queue_matches_a_list_model(queue_size: int, batches: list[list[int]]) -> None:
    queues = ClassQueues(num_classes=3, queue_size=queue_size)
    history: list[list[float]] = [[], [], []]
    counter = 0
    for batch in batches:
        values = torch.arange(counter, counter + len(batch), dtype=torch.float64).unsqueeze(1)
        counter += len(batch)
        queues.push(values, torch.tensor(batch, dtype=torch.long))
        for value, label in zip(values.flatten().tolist(), batch):
            history[label].append(value)
    for class_index in range(3):
        if queues.dim is None:
            break
        assert queues.get(class_index).flatten().tolist() == history[class_index][-queue_size:]


def test_queue_stores_detached_copies() -> None:
    queues = ClassQueues(num_classes=1, queue_size=3)
    features = torch.ones(2, 4, requires_grad=True)
    queues.push(features * 1.0, torch.zeros(2, dtype=torch.long))
    source = torch.zeros(1, 4)
    queues.push(source, torch.zeros(1, dtype=torch.long))
    source += 5.0
    stored = queues.get(0)
    assert not stored.requires_grad
    assert stored[-1].tolist() == [0.0] * 4


def test_queue_keeps_half_precision_as_float32() -> None:
    queues = ClassQueues(num_classes=1, queue_size=2)
    queues.push(torch.ones(2, 3, dtype=torch.float16), torch.zeros(2, dtype=torch.long))
    assert queues.get(0).dtype == torch.float32


def test_queue_bad_input() -> None:
    queues = ClassQueues(num_classes=2, queue_size=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        queues.push(torch.ones(2, 3), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="labels must be an integer"):
        queues.push(torch.ones(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="features must have a floating-point"):
        queues.push(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features must be a 2-D"):
        queues.push(torch.ones(2, 3, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features has 2 rows but labels has 3"):
        queues.push(torch.ones(2, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(NonFiniteError, match="features contains 1 NaN"):
        queues.push(torch.tensor([[1.0, float("nan"), 0.0]]), torch.tensor([0]))
    queues.push(torch.ones(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="dimension 4"):
        queues.push(torch.ones(1, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="queue_size"):
        ClassQueues(num_classes=2, queue_size=0)


@pytest.mark.parametrize("sampler", [VOSSampler(3, queue_size=8), NPOSSampler(3, queue_size=8, k=3, num_boundary=4)])
def test_protocol_and_readiness(sampler: VOSSampler | NPOSSampler) -> None:
    assert isinstance(sampler, FeatureOutlierSampler)
    features, labels = _clusters(3, 10, 5)
    assert not sampler.ready
    with pytest.raises(RuntimeError, match="not ready"):
        sampler.sample()
    sampler.update(features[labels != 2], labels[labels != 2])
    assert not sampler.ready
    sampler.update(features[labels == 2], labels[labels == 2])
    assert sampler.ready
    assert sampler.sample().shape[1] == 5


def test_vos_covariance_matches_numpy() -> None:
    features, labels = _clusters(3, 40, 6)
    sampler = VOSSampler(3, queue_size=25, sample_from=50)
    _fill(sampler, features, labels)
    means, covariance = sampler.class_gaussians()
    recent = _last_per_class(features, labels, 3, 25)
    centered = np.concatenate([x - x.mean(axis=0) for x in recent])
    expected = centered.T @ centered / len(centered) + 1e-4 * np.eye(6)
    assert covariance.dtype == torch.float64
    np.testing.assert_allclose(covariance.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(means.numpy(), np.stack([x.mean(axis=0) for x in recent]), rtol=1e-10, atol=1e-12)


def test_vos_keeps_the_lowest_likelihood_draw() -> None:
    features, labels = _clusters(2, 30, 4)
    sampler = VOSSampler(2, queue_size=30, sample_from=500, select=3)
    _fill(sampler, features, labels)
    outliers, outlier_labels = sampler.sample_with_labels(torch.Generator().manual_seed(11))
    assert outliers.shape == (6, 4)
    assert outlier_labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Reference: draw the same 500 points per class from N(mu_c, Sigma), rank them by their density.
    recent = _last_per_class(features, labels, 2, 30)
    centered = np.concatenate([x - x.mean(axis=0) for x in recent])
    covariance = torch.from_numpy(centered.T @ centered / len(centered) + 1e-4 * np.eye(4))
    cholesky = torch.linalg.cholesky(covariance)
    generator = torch.Generator().manual_seed(11)
    for class_index in range(2):
        mean = torch.from_numpy(recent[class_index].mean(axis=0))
        draws = mean + torch.randn(500, 4, generator=generator).double() @ cholesky.T
        gaussian = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        lowest = gaussian.log_prob(draws).argsort()[:3]
        expected = draws[lowest]
        got = outliers[outlier_labels == class_index].double()
        torch.testing.assert_close(got.sort(dim=0).values, expected.sort(dim=0).values, rtol=1e-5, atol=1e-5)
        # Every outlier is less likely than every queued feature of its class.
        queued = torch.from_numpy(recent[class_index])
        assert float(gaussian.log_prob(got).max()) < float(gaussian.log_prob(queued).min())


def test_vos_seeds_and_internal_generator() -> None:
    features, labels = _clusters(2, 20, 3)
    first, second = VOSSampler(2, queue_size=20, sample_from=64, seed=5), VOSSampler(2, 20, 64, seed=5)
    _fill(first, features, labels)
    _fill(second, features, labels)
    a, b = first.sample(), second.sample()
    assert torch.equal(a, b)
    assert not torch.equal(first.sample(), a)  # the internal generator advances between calls
    assert a.dtype == features.dtype


def test_vos_bad_arguments() -> None:
    with pytest.raises(ValueError, match="select must be <= sample_from=5"):
        VOSSampler(2, sample_from=5, select=6)
    with pytest.raises(ValueError, match="jitter"):
        VOSSampler(2, jitter=-1.0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        VOSSampler(2.0)  # type: ignore[arg-type]


def _knn_float64(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    unit_q = torch.nn.functional.normalize(queries.double(), dim=1)
    unit_k = torch.nn.functional.normalize(keys.double(), dim=1)
    distances = torch.cdist(unit_q, unit_k)
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.sort(dim=1).values[:, k - 1]


def test_npos_boundary_is_the_largest_knn_distance() -> None:
    features, labels = _clusters(2, 40, 8)
    sampler = NPOSSampler(2, queue_size=40, k=5, num_boundary=6)
    _fill(sampler, features, labels)
    for class_index in range(2):
        queue = features[labels == class_index]
        reference = _knn_float64(queue, queue, 5, exclude_self=True)
        positions, distances = sampler.boundary(class_index)
        expected = reference.sort(descending=True).values[:6]
        torch.testing.assert_close(distances.double(), expected, rtol=0, atol=1e-5)
        assert float(reference[positions].min()) >= float(reference.sort(descending=True).values[6]) - 1e-5


def test_npos_keeps_the_candidates_with_the_largest_knn_distance() -> None:
    features, labels = _clusters(2, 40, 8)
    sampler = NPOSSampler(
        2, queue_size=40, k=5, num_boundary=6, num_anchors=3, candidates_per_anchor=50, keep_per_anchor=2, sigma=0.5
    )
    _fill(sampler, features, labels)
    outliers, outlier_labels = sampler.sample_with_labels(torch.Generator().manual_seed(3))
    assert outliers.shape == (2 * 3 * 2, 8)
    assert outlier_labels.tolist() == [0] * 6 + [1] * 6
    # From scratch, consuming the generator in the same order: boundary anchors, then Gaussian candidates.
    generator = torch.Generator().manual_seed(3)
    for class_index in range(2):
        queue = features[labels == class_index].double()
        own = _knn_float64(queue, queue, 5, exclude_self=True)
        boundary = own.argsort(descending=True)[:6]
        anchors = queue[boundary[torch.randperm(6, generator=generator)[:3]]]
        candidates = anchors.unsqueeze(1) + 0.5 * torch.randn(3, 50, 8, generator=generator).double()
        distances = _knn_float64(candidates.flatten(0, 1), queue, 5).view(3, 50)
        expected = candidates.gather(1, distances.argsort(dim=1, descending=True)[:, :2, None].expand(-1, -1, 8))
        got = outliers[outlier_labels == class_index].double()
        torch.testing.assert_close(got, expected.flatten(0, 1), rtol=1e-5, atol=1e-5)
        # The outliers lie farther from the class than its own features do.
        assert float(_knn_float64(got, queue, 5).min()) > float(own.median())


def test_npos_seeds_reproducible() -> None:
    features, labels = _clusters(2, 30, 6)
    kwargs = {"queue_size": 30, "k": 4, "num_boundary": 5, "candidates_per_anchor": 20, "seed": 9}
    first, second = NPOSSampler(2, **kwargs), NPOSSampler(2, **kwargs)  # type: ignore[arg-type]
    _fill(first, features, labels)
    _fill(second, features, labels)
    a = first.sample()
    assert torch.equal(a, second.sample())
    assert not torch.equal(a, first.sample())
    assert torch.equal(first.sample(torch.Generator().manual_seed(1)), second.sample(torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queue_size": 10, "k": 10}, "k must be <= queue_size - 1 = 9"),
        ({"queue_size": 10, "k": 3, "num_boundary": 11}, "num_boundary must be <= queue_size = 10"),
        ({"num_boundary": 4, "num_anchors": 5}, "num_anchors must be <= num_boundary = 4"),
        ({"candidates_per_anchor": 3, "keep_per_anchor": 4}, "keep_per_anchor must be <= candidates_per_anchor = 3"),
        ({"sigma": 0.0}, "sigma"),
        ({"k": 0}, "k must be > 0"),
    ],
)
def test_npos_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NPOSSampler(2, **kwargs)  # type: ignore[arg-type]
