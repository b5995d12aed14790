"""Table 2 samplers: each checked against its formula recomputed from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.anchors import TokenEmbeddings
from dreamood.feature_bank import FeatureBank
from dreamood.protocols import EmbeddingSampler
from dreamood.sampling.samples import EmbeddingSamples
from dreamood.sampling.token_samplers import (
    DisjointClassSampler,
    GaussianTokenNoiseSampler,
    LearnableNoiseSampler,
    TokenInterpolationSampler,
    disjoint_class_names,
)

NAMES = ["cat", "dog", "car", "ship"]


def _setup(
    num_classes: int = 4, dim: int = 16, per_class: int = 30, seed: int = 0
) -> tuple[FeatureBank, TokenEmbeddings]:
    """Anchors of norm 0.38 and a bank clustered around each anchor's direction, like a trained encoder's."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    noise = torch.randn(num_classes, per_class, dim, generator=generator) / dim**0.5
    bank = torch.nn.functional.normalize(directions.unsqueeze(1) + 0.8 * noise, dim=2).reshape(-1, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    names = [f"class {c}" for c in range(num_classes)] if num_classes != len(NAMES) else NAMES
    return FeatureBank(bank, labels), TokenEmbeddings(names, 0.38 * directions)


def _learnable(**kwargs: object) -> LearnableNoiseSampler:
    return LearnableNoiseSampler(show_progress=False, **kwargs)  # type: ignore[arg-type]


def _all_samplers() -> list[EmbeddingSampler]:
    disjoint = TokenEmbeddings(["tree", "boat", "lamp"], torch.randn(3, 16))
    return [
        GaussianTokenNoiseSampler(),
        _learnable(steps=3),
        TokenInterpolationSampler(),
        DisjointClassSampler(disjoint),
    ]


@pytest.mark.parametrize("sampler", _all_samplers(), ids=lambda s: type(s).__name__)
def test_common_contract(sampler: EmbeddingSampler, tmp_path: Path) -> None:
    bank, anchors = _setup()
    assert isinstance(sampler, EmbeddingSampler)
    samples = sampler.sample(bank, anchors, 5)
    assert isinstance(samples, EmbeddingSamples)
    assert samples.vectors.shape == (4 * 5, 16)
    assert torch.equal(samples.labels, torch.arange(4).repeat_interleave(5))
    assert torch.equal(samples.anchor_index, torch.full((20,), -1))
    assert samples.class_names == NAMES
    assert samples.config["sampler"] == type(sampler).__name__
    # Same seed, same result; the config survives a save/load round trip (it is JSON).
    again = sampler.sample(bank, anchors, 5)
    assert torch.equal(samples.vectors, again.vectors)
    loaded = EmbeddingSamples.load(samples.save(tmp_path / "samples"))
    assert loaded.config == samples.config
    torch.testing.assert_close(loaded.vectors, samples.vectors)


@pytest.mark.parametrize("sampler", _all_samplers(), ids=lambda s: type(s).__name__)
def test_common_bad_input(sampler: EmbeddingSampler) -> None:
    bank, anchors = _setup()
    with pytest.raises(ValueError, match="num_per_class"):
        sampler.sample(bank, anchors, 0)
    with pytest.raises(TypeError, match="bank must be a FeatureBank"):
        sampler.sample(anchors, anchors, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="anchors must be a TokenEmbeddings"):
        sampler.sample(bank, bank, 2)  # type: ignore[arg-type]
    other_bank, _ = _setup(dim=8)
    with pytest.raises(ValueError, match="dimension 8"):
        sampler.sample(other_bank, anchors, 2)
    _, three = _setup(num_classes=3)
    with pytest.raises(ValueError, match="anchors have 3"):
        sampler.sample(bank, three, 2)


def test_gaussian_noise_is_a_standard_deviation() -> None:
    bank, anchors = _setup()
    samples = GaussianTokenNoiseSampler(noise_std=0.03, seed=7).sample(bank, anchors, 6)
    # From scratch: the same standard normal draws, multiplied (not square-rooted) by 0.03.
    eps = torch.randn(24, 16, generator=torch.Generator().manual_seed(7))
    expected = anchors.vectors.repeat_interleave(6, dim=0) + 0.03 * eps
    torch.testing.assert_close(samples.vectors, expected, rtol=0, atol=1e-7)
    assert samples.config == {"sampler": "GaussianTokenNoiseSampler", "noise_std": 0.03, "seed": 7}
    assert samples.knn_distance is None


def test_gaussian_noise_statistics() -> None:
    bank, anchors = _setup(dim=64)
    samples = GaussianTokenNoiseSampler(noise_std=0.05).sample(bank, anchors, 500)
    noise = (samples.vectors - anchors.vectors[samples.labels]).double()
    assert abs(float(noise.std()) - 0.05) < 0.05 * 0.02
    assert abs(float(noise.mean())) < 1e-3


def test_gaussian_noise_generator_controls_randomness() -> None:
    bank, anchors = _setup()
    sampler = GaussianTokenNoiseSampler()
    first = sampler.sample(bank, anchors, 3, generator=torch.Generator().manual_seed(1))
    second = sampler.sample(bank, anchors, 3, generator=torch.Generator().manual_seed(1))
    third = sampler.sample(bank, anchors, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first.vectors, second.vectors)
    assert not torch.equal(first.vectors, third.vectors)


@pytest.mark.parametrize("noise_std", [0.0, -0.1, float("nan"), float("inf")])
def test_gaussian_noise_rejects_bad_std(noise_std: float) -> None:
    with pytest.raises(ValueError, match="noise_std"):
        GaussianTokenNoiseSampler(noise_std=noise_std)


@settings(max_examples=25, deadline=None)
@given(
    num_classes=st.integers(2, 6),
    num_per_class=st.integers(1, 12),
    alpha=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_interpolation_rows_are_convex_pairs_of_distinct_classes(
    num_classes: int, num_per_class: int, alpha: float, seed: int
) -> None:
    bank, anchors = _setup(num_classes=num_classes, per_class=3)
    samples = TokenInterpolationSampler(alpha=alpha, seed=seed).sample(bank, anchors, num_per_class)
    tokens = anchors.vectors.double()
    # Recover each row's partner by brute force over every other class.
    partners = []
    for vector, own in zip(samples.vectors.double(), samples.labels.tolist()):
        errors = {
            j: float((vector - (alpha * tokens[own] + (1 - alpha) * tokens[j])).norm()) for j in range(num_classes)
        }
        errors.pop(own)
        best = min(errors, key=errors.__getitem__)
        assert errors[best] < 1e-6
        partners.append(best)
    # Every class uses its partners equally often (within one).
    partner_tensor = torch.tensor(partners)
    for own in range(num_classes):
        counts = torch.bincount(partner_tensor[samples.labels == own], minlength=num_classes)
        counts = torch.cat([counts[:own], counts[own + 1 :]])
        assert int(counts.max() - counts.min()) <= 1
    assert torch.equal(partner_tensor, TokenInterpolationSampler(alpha, seed=seed).partners(num_classes, num_per_class))


def test_interpolation_half_way() -> None:
    bank, anchors = _setup(num_classes=2, per_class=3)
    samples = TokenInterpolationSampler().sample(bank, anchors, 2)
    midpoint = 0.5 * (anchors.vectors[0] + anchors.vectors[1])
    torch.testing.assert_close(samples.vectors, midpoint.expand(4, -1))
    assert samples.config["alpha"] == 0.5


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_interpolation_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        TokenInterpolationSampler(alpha=alpha)


def test_interpolation_needs_two_classes() -> None:
    bank, anchors = _setup(num_classes=1, per_class=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        TokenInterpolationSampler().sample(bank, anchors, 2)


def test_disjoint_rows_are_disjoint_tokens_used_evenly() -> None:
    bank, anchors = _setup()
    disjoint = TokenEmbeddings([f"other {i}" for i in range(7)], torch.randn(7, 16))
    samples = DisjointClassSampler(disjoint, seed=3).sample(bank, anchors, 5)
    distances = torch.cdist(samples.vectors.double(), disjoint.vectors.double())
    rows = distances.argmin(dim=1)
    assert float(distances.min(dim=1).values.max()) == 0.0
    counts = torch.bincount(rows, minlength=7)
    assert int(counts.max() - counts.min()) <= 1
    assert samples.config["disjoint_class_names"] == disjoint.class_names
    assert torch.equal(rows, DisjointClassSampler(disjoint, seed=3).assignment(20))


def test_disjoint_each_token_once_when_enough() -> None:
    bank, anchors = _setup()
    disjoint = TokenEmbeddings([f"other {i}" for i in range(50)], torch.randn(50, 16))
    samples = DisjointClassSampler(disjoint).sample(bank, anchors, 10)
    rows = torch.cdist(samples.vectors, disjoint.vectors).argmin(dim=1)
    assert len(torch.unique(rows)) == 40


@pytest.mark.parametrize("clash", ["dog", "DOG", " Dog "])
def test_disjoint_rejects_id_names(clash: str) -> None:
    bank, anchors = _setup()
    disjoint = TokenEmbeddings(["tree", clash], torch.randn(2, 16))
    with pytest.raises(ValueError, match=repr(clash)):
        DisjointClassSampler(disjoint).sample(bank, anchors, 2)


def test_disjoint_class_names_filters_id_names() -> None:
    candidates = ["Golden_retriever", "tabby cat", "cat", "Ship", "lamp"]
    assert disjoint_class_names(candidates, ["golden  retriever", "cat", "ship"]) == ["tabby cat", "lamp"]


def test_disjoint_rejects_bad_arguments() -> None:
    bank, anchors = _setup()
    with pytest.raises(TypeError, match="disjoint must be a TokenEmbeddings"):
        DisjointClassSampler(torch.randn(3, 16))  # type: ignore[arg-type]
    narrow = DisjointClassSampler(TokenEmbeddings(["tree"], torch.randn(1, 8)))
    with pytest.raises(ValueError, match="dimension 8"):
        narrow.sample(bank, anchors, 2)


def _objective_float64(
    noise: torch.Tensor, token: torch.Tensor, bank: torch.Tensor, k: int, lam: float
) -> torch.Tensor:
    unit = token.double() / token.double().norm()
    direction = unit + noise.double()
    direction = direction / direction.norm(dim=1, keepdim=True)
    cosines = direction @ bank.double().T
    nearest = cosines.sort(dim=1, descending=True).values[:, :k].mean(dim=1)
    return nearest + lam * noise.double().pow(2).sum(dim=1)


def test_learnable_objective_matches_float64_formula() -> None:
    bank, anchors = _setup()
    sampler = _learnable(num_neighbors=3, norm_penalty=0.7)
    noise = 0.1 * torch.randn(9, 16)
    token = anchors.vectors[1]
    loss = sampler.objective(noise, token / token.norm(), bank.per_class(1))
    torch.testing.assert_close(loss.double(), _objective_float64(noise, token, bank.per_class(1), 3, 0.7))


def test_learnable_noise_moves_away_from_the_bank() -> None:
    bank, anchors = _setup(dim=32, per_class=40)
    untrained = _learnable(lr=1e-12, steps=1).sample(bank, anchors, 20)
    trained = _learnable().sample(bank, anchors, 20)
    assert trained.knn_distance is not None and untrained.knn_distance is not None
    for class_index in range(4):
        rows = trained.labels == class_index
        assert float(trained.knn_distance[rows].mean()) > float(untrained.knn_distance[rows].mean()) + 0.05
    # The reported distance is the num_neighbors-th nearest-neighbour distance of the unit direction.
    for class_index in range(4):
        rows = trained.labels == class_index
        unit = torch.nn.functional.normalize(trained.vectors[rows].double(), dim=1)
        expected = torch.cdist(unit, bank.per_class(class_index).double()).sort(dim=1).values[:, 4]
        torch.testing.assert_close(trained.knn_distance[rows].double(), expected, rtol=0, atol=1e-5)


def test_learnable_output_norm_and_norm_bound() -> None:
    bank, anchors = _setup()
    samples = _learnable(max_norm=0.3, lr=0.05, steps=20).sample(bank, anchors, 10)
    norms = samples.vectors.norm(dim=1)
    torch.testing.assert_close(norms, anchors.norms[samples.labels])
    # ||r|| <= 0.3 turns the direction by at most asin(0.3).
    cosines = torch.nn.functional.cosine_similarity(samples.vectors, anchors.vectors[samples.labels])
    assert float(cosines.min()) >= (1 - 0.3**2) ** 0.5 - 1e-5
    unbounded = _learnable(max_norm=None, lr=0.05, steps=20).sample(bank, anchors, 10)
    cosines = torch.nn.functional.cosine_similarity(unbounded.vectors, anchors.vectors[unbounded.labels])
    assert float(cosines.min()) < (1 - 0.3**2) ** 0.5


def test_learnable_rejects_bad_arguments() -> None:
    bank, anchors = _setup(per_class=3)
    with pytest.raises(ValueError, match="num_neighbors=5 exceeds"):
        _learnable().sample(bank, anchors, 2)
    with pytest.raises(ValueError, match="max_norm"):
        _learnable(max_norm=0.0)
    with pytest.raises(ValueError, match="steps"):
        _learnable(steps=0)
    with pytest.raises(ValueError, match="norm_penalty"):
        _learnable(norm_penalty=-1.0)
