"""Tests of the k-NN boundary sampler (DREAM-OOD Phase 2) against float64 brute force and a plain reimplementation."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.anchors import TokenEmbeddings
from dreamood.errors import NonFiniteError
from dreamood.feature_bank import FeatureBank
from dreamood.protocols import EmbeddingSampler
from dreamood.sampling import knn_boundary
from dreamood.sampling.knn_boundary import (
    DEFAULT_SIGMA,
    KNNBoundarySampler,
    candidate_knn_distance,
    select_candidates,
)

ROOT = Path(__file__).resolve().parents[1]
IN100_TOKENS = ROOT.parent / "shared" / "data" / "token_embed_in100.npy"


def _load_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reference_sampler", ROOT / "benchmarks" / "reference_sampler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _clustered_bank(
    num_classes: int = 3, per_class: int = 60, dim: int = 16, spread: float = 0.6, seed: int = 0
) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    centres = _unit(torch.randn(num_classes, dim, generator=g))
    noise = torch.randn(num_classes * per_class, dim, generator=g) / math.sqrt(dim)
    points = centres.repeat_interleave(per_class, 0) + spread * noise
    return FeatureBank(_unit(points), torch.arange(num_classes).repeat_interleave(per_class))


def _tokens(num_classes: int, dim: int, seed: int = 1) -> TokenEmbeddings:
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(num_classes, dim, generator=g) * 0.1
    return TokenEmbeddings([f"class{c}" for c in range(num_classes)], vectors)


def _small_sampler(**overrides: object) -> KNNBoundarySampler:
    params: dict[str, object] = {
        "k": 8,
        "boundary_size": 15,
        "anchors_per_round": 4,
        "candidates_per_anchor": 60,
        "keep_per_anchor": 2,
        "sigma": 0.15,
        "device": "cpu",
        "show_progress": False,
    }
    params.update(overrides)
    return KNNBoundarySampler(**params)  # type: ignore[arg-type]


def _brute_force(anchors: torch.Tensor, noise: torch.Tensor, keys: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """k-th NN distance of every normalised candidate to the keys, float64, by torch.cdist."""
    candidates = _unit(anchors.double()[:, None, :] + sigma * noise.double()[None, :, :])
    distances = torch.cdist(candidates.reshape(-1, keys.shape[1]), _unit(keys.double()))
    return distances.kthvalue(k, dim=1).values.view(anchors.shape[0], noise.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# The batched kernel


@pytest.mark.parametrize("budget_mb", [512.0, 0.002])
def test_candidate_distances_match_float64_brute_force(budget_mb: float) -> None:
    g = torch.Generator().manual_seed(0)
    keys = _unit(torch.randn(50, 12, generator=g) + 1.5)
    anchors = keys[:5]
    noise = torch.randn(40, 12, generator=g)
    for k in (1, 7, 50):
        got = candidate_knn_distance(anchors, noise, keys, k, 0.2, memory_budget_mb=budget_mb)
        assert got.shape == (5, 40)
        torch.testing.assert_close(got.double(), _brute_force(anchors, noise, keys, k, 0.2), atol=1e-5, rtol=0)


def test_candidate_distances_grouped_and_float64() -> None:
    g = torch.Generator().manual_seed(1)
    keys = _unit(torch.randn(30, 6, generator=g, dtype=torch.float64))
    anchors = torch.randn(3, 2, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 25, 6, generator=g, dtype=torch.float64)
    got = candidate_knn_distance(anchors, noise, keys, 4, 0.5)
    assert got.shape == (3, 2, 25) and got.dtype == torch.float64
    for group in range(3):
        expected = _brute_force(anchors[group], noise[group], keys, 4, 0.5)
        torch.testing.assert_close(got[group], expected, atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_anchors=st.integers(1, 4),
    num_noise=st.integers(2, 40),
    num_keys=st.integers(3, 30),
    dim=st.integers(2, 8),
    k_fraction=st.floats(0.0, 1.0),
    keep_fraction=st.floats(0.0, 1.0),
    sigma=st.floats(0.01, 1.0),
    largest=st.booleans(),
    budget_mb=st.sampled_from([512.0, 0.001]),
)
def test_select_candidates_keeps_exactly_the_best(
    seed: int,
    num_anchors: int,
    num_noise: int,
    num_keys: int,
    dim: int,
    k_fraction: float,
    keep_fraction: float,
    sigma: float,
    largest: bool,
    budget_mb: float,
) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = _unit(torch.randn(num_keys, dim, generator=g))
    anchors = _unit(torch.randn(num_anchors, dim, generator=g))
    noise = torch.randn(num_noise, dim, generator=g)
    k = 1 + int(k_fraction * (num_keys - 1))
    keep = 1 + int(keep_fraction * (num_noise - 1))
    index, distance = select_candidates(
        anchors, noise, keys, k, sigma, keep, largest=largest, memory_budget_mb=budget_mb
    )
    exact = candidate_knn_distance(anchors, noise, keys, k, sigma, memory_budget_mb=budget_mb)
    assert index.shape == distance.shape == (num_anchors, keep)
    # The reported distances are those of the returned candidates, best first.
    torch.testing.assert_close(distance, exact.gather(1, index), atol=1e-6, rtol=0)
    # Every kept candidate is at least as good as every discarded one of the same anchor.
    expected = exact.topk(keep, dim=1, largest=largest).values
    torch.testing.assert_close(distance, expected, atol=1e-6, rtol=0)
    assert torch.unique(index, dim=1).shape[1] == keep


def test_selection_is_exact_even_with_a_useless_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    # The estimate only orders the pilot candidates; a random one must not change the result.
    g = torch.Generator().manual_seed(5)
    keys = _unit(torch.randn(40, 10, generator=g) + 0.5)
    anchors = keys[:6]
    noise = torch.randn(300, 10, generator=g)
    honest = select_candidates(anchors, noise, keys, 9, 0.1, 3)
    monkeypatch.setattr(
        knn_boundary._CandidateScorer,
        "estimate",
        lambda self: torch.rand(self.norm.shape, generator=torch.Generator().manual_seed(0)),
    )
    scrambled = select_candidates(anchors, noise, keys, 9, 0.1, 3)
    exact = candidate_knn_distance(anchors, noise, keys, 9, 0.1)
    for _, distance in (honest, scrambled):
        torch.testing.assert_close(distance, exact.topk(3, dim=1).values, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The sampler


@pytest.mark.parametrize("mode", ["outlier", "inlier"])
@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_kept_candidates_beat_every_discarded_one(mode: str, noise: str) -> None:
    bank = _clustered_bank()
    sampler = _small_sampler(mode=mode, noise=noise)
    trace = sampler.trace(bank, _tokens(3, 16), 21)
    rounds = 3 * math.ceil(21 / 8)
    assert trace.candidate_distance.shape == (rounds, 4, 60)
    assert trace.kept.shape == (rounds, 4, 2) and trace.anchor_index.shape == (rounds, 4)
    distance = trace.candidate_distance
    kept = distance.gather(2, trace.kept)
    discarded = torch.ones_like(distance, dtype=torch.bool).scatter_(2, trace.kept, False)
    if mode == "outlier":
        assert bool((kept.amin(2) >= distance.masked_fill(~discarded, -math.inf).amax(2)).all())
        assert bool((kept[:, :, 0] >= kept[:, :, 1]).all())
    else:
        assert bool((kept.amax(2) <= distance.masked_fill(~discarded, math.inf).amin(2)).all())
        assert bool((kept[:, :, 0] <= kept[:, :, 1]).all())
    # The trace's samples are the kept candidates, in order, and identical to sample().
    samples = sampler.sample(bank, _tokens(3, 16), 21)
    torch.testing.assert_close(trace.samples.vectors, samples.vectors, atol=0, rtol=0)
    for c in range(3):
        rows = trace.labels == c
        expected = kept[rows].flatten()[:21]
        torch.testing.assert_close(samples.for_class(c).knn_distance, expected, atol=0, rtol=0)
        assert torch.equal(
            samples.for_class(c).anchor_index, trace.anchor_index[rows][:, :, None].expand(-1, -1, 2).flatten()[:21]
        )


def test_reported_distances_are_those_of_the_output_vectors() -> None:
    bank = _clustered_bank()
    tokens = _tokens(3, 16)
    samples = _small_sampler().sample(bank, tokens, 30)
    for c in range(3):
        part = samples.for_class(c)
        members = bank.per_class(c).double()
        expected = torch.cdist(_unit(part.vectors.double()), members).kthvalue(8, dim=1).values
        assert part.knn_distance is not None
        torch.testing.assert_close(part.knn_distance.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["outlier", "inlier"])
def test_anchor_set_is_the_float64_boundary_and_anchors_come_from_it(mode: str) -> None:
    bank = _clustered_bank()
    sampler = _small_sampler(mode=mode)
    samples = sampler.sample(bank, _tokens(3, 16), 40)
    for c in range(3):
        rows = bank.indices_of(c)
        pairwise = torch.cdist(bank.embeddings[rows].double(), bank.embeddings[rows].double())
        pairwise.fill_diagonal_(math.inf)
        kth = pairwise.kthvalue(8, dim=1).values
        expected = rows[kth.topk(15, largest=mode == "outlier").indices]
        index, distance = sampler.anchor_set(bank, c)
        assert torch.equal(index, expected)
        torch.testing.assert_close(distance.double(), kth.topk(15, largest=mode == "outlier").values, atol=1e-5, rtol=0)
        used = samples.for_class(c).anchor_index
        assert bool(torch.isin(used, index).all())
        # Anchors spread: every round uses anchors_per_round distinct anchors.
        per_round = used[: 4 * 2].view(4, 2)
        assert len(torch.unique(per_round[:, 0])) == 4


def test_matches_the_plain_reference_implementation() -> None:
    reference = _load_reference()
    bank = _clustered_bank(per_class=70, seed=3)
    tokens = _tokens(3, 16)
    for mode in ("outlier", "inlier"):
        sampler = _small_sampler(mode=mode, sigma=None)
        samples = sampler.sample(bank, tokens, 19, generator=torch.Generator().manual_seed(7))
        expected = reference.reference_sample(
            bank.embeddings,
            bank.labels,
            tokens.norms,
            19,
            k=8,
            boundary_size=15,
            anchors_per_round=4,
            candidates_per_anchor=60,
            sigma=DEFAULT_SIGMA[mode],
            keep_per_anchor=2,
            mode=mode,
            generator=torch.Generator().manual_seed(7),
        )
        assert torch.equal(samples.labels, expected["labels"])
        assert torch.equal(samples.anchor_index, expected["anchor_index"])
        torch.testing.assert_close(samples.vectors, expected["vectors"], atol=1e-5, rtol=0)
        assert samples.knn_distance is not None
        torch.testing.assert_close(samples.knn_distance, expected["knn_distance"], atol=1e-5, rtol=0)


def test_output_norms_counts_and_provenance() -> None:
    bank = _clustered_bank()
    tokens = _tokens(3, 16)
    samples = _small_sampler().sample(bank, tokens, 13)
    assert len(samples) == 39
    assert torch.equal(samples.labels, torch.arange(3).repeat_interleave(13))
    torch.testing.assert_close(samples.vectors.norm(dim=1), tokens.norms[samples.labels], atol=1e-5, rtol=0)
    assert bool((bank.labels[samples.anchor_index] == samples.labels).all())
    assert samples.class_names == tokens.class_names
    config = json.loads(json.dumps(samples.config))
    assert config["sampler"] == "KNNBoundarySampler"
    assert config["sigma"] == 0.15 and config["k"] == 8 and config["num_per_class"] == 13
    assert config["mode"] == "outlier" and config["scope"] == "class" and config["noise"] == "shared"


@pytest.mark.skipif(not IN100_TOKENS.exists(), reason="reference token embeddings not available")
def test_in100_token_norms() -> None:
    vectors = torch.from_numpy(np.load(IN100_TOKENS))[:3]
    tokens = TokenEmbeddings(["a", "b", "c"], vectors)
    g = torch.Generator().manual_seed(2)
    # Bank aligned with the real anchors, in their 768-d space.
    points = _unit(vectors).repeat_interleave(40, 0) + 1.2 * torch.randn(120, 768, generator=g) / math.sqrt(768)
    bank = FeatureBank(_unit(points), torch.arange(3).repeat_interleave(40))
    samples = _small_sampler(k=10, boundary_size=10, anchors_per_round=3, sigma=None).sample(bank, tokens, 10)
    norms = samples.vectors.norm(dim=1)
    torch.testing.assert_close(norms, tokens.norms[samples.labels], atol=1e-5, rtol=0)
    assert float(norms.min()) > 0.36 and float(norms.max()) < 0.43


def test_same_seed_same_output_and_chunking_does_not_matter() -> None:
    bank = _clustered_bank()
    tokens = _tokens(3, 16)
    first = _small_sampler().sample(bank, tokens, 25, generator=torch.Generator().manual_seed(11))
    again = _small_sampler().sample(bank, tokens, 25, generator=torch.Generator().manual_seed(11))
    # A tiny budget splits the rounds into many chunks and the keys into blocks.
    chunked = _small_sampler(memory_budget_mb=0.01).sample(
        bank, tokens, 25, generator=torch.Generator().manual_seed(11)
    )
    other = _small_sampler().sample(bank, tokens, 25, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first.vectors, again.vectors) and torch.equal(first.anchor_index, again.anchor_index)
    torch.testing.assert_close(first.vectors, chunked.vectors, atol=1e-6, rtol=0)
    assert torch.equal(first.anchor_index, chunked.anchor_index)
    assert not torch.equal(first.vectors, other.vectors)
    # Without a generator the sampler's seed is used.
    assert torch.equal(
        _small_sampler(seed=4).sample(bank, tokens, 5).vectors, _small_sampler(seed=4).sample(bank, tokens, 5).vectors
    )


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_candidates_are_anchor_plus_sigma_noise_in_the_documented_draw_order(noise: str) -> None:
    bank = _clustered_bank()
    tokens = _tokens(3, 16)
    sampler = _small_sampler(noise=noise)
    trace = sampler.trace(bank, tokens, 8, generator=torch.Generator().manual_seed(5))
    # Replay the first round of class 0: a permutation of the anchor set, then the noise.
    replay = torch.Generator().manual_seed(5)
    order = torch.randperm(15, generator=replay)[:4]
    if noise == "shared":
        draws = torch.randn(60, 16, generator=replay).expand(4, 60, 16)
    else:
        draws = torch.stack([torch.randn(60, 16, generator=replay) for _ in range(4)])
    anchor_rows, _ = sampler.anchor_set(bank, 0)
    assert torch.equal(trace.anchor_index[0], anchor_rows[order])
    z = bank.embeddings[trace.anchor_index[0]]
    picked = draws.gather(1, trace.kept[0][:, :, None].expand(-1, -1, 16))
    expected = _unit(z[:, None, :] + 0.15 * picked).flatten(0, 1) * tokens.norms[0]
    torch.testing.assert_close(trace.samples.for_class(0).vectors, expected, atol=1e-6, rtol=0)
    other = _small_sampler(noise="shared" if noise == "independent" else "independent")
    assert not torch.allclose(
        other.sample(bank, tokens, 8, generator=torch.Generator().manual_seed(5)).vectors, trace.samples.vectors
    )


def test_scope_all_keeps_outliers_away_from_other_classes() -> None:
    g = torch.Generator().manual_seed(0)
    dim, per_class = 16, 80
    first = _unit(torch.randn(dim, generator=g))
    second = _unit(first + 0.6 * _unit(torch.randn(dim, generator=g)))
    points = torch.cat([first, second]).view(2, dim).repeat_interleave(per_class, 0)
    points = points + 0.4 * torch.randn(2 * per_class, dim, generator=g) / math.sqrt(dim)
    bank = FeatureBank(_unit(points), torch.arange(2).repeat_interleave(per_class))
    tokens = _tokens(2, dim)
    distance_to_other: dict[str, torch.Tensor] = {}
    for scope in ("class", "all"):
        sampler = _small_sampler(
            k=10, boundary_size=20, anchors_per_round=5, candidates_per_anchor=200, sigma=0.1, scope=scope
        )
        samples = sampler.sample(bank, tokens, 100)
        unit = _unit(samples.vectors)
        distance_to_other[scope] = torch.cat(
            [
                torch.cdist(unit[samples.labels == c], bank.embeddings[bank.labels != c]).kthvalue(10, dim=1).values
                for c in range(2)
            ]
        )
    assert float(distance_to_other["all"].mean()) > float(distance_to_other["class"].mean())
    assert float(distance_to_other["all"].min()) > float(distance_to_other["class"].min())


def test_inlier_mode_defaults_and_density() -> None:
    bank = _clustered_bank()
    tokens = _tokens(3, 16)
    inliers = _small_sampler(mode="inlier", sigma=None)
    assert inliers.effective_sigma == DEFAULT_SIGMA["inlier"] == 0.01
    assert _small_sampler(sigma=None).effective_sigma == DEFAULT_SIGMA["outlier"] == 0.03
    outliers = _small_sampler(sigma=0.01).sample(bank, tokens, 20)
    dense = inliers.sample(bank, tokens, 20)
    assert dense.knn_distance is not None and outliers.knn_distance is not None
    assert float(dense.knn_distance.max()) < float(outliers.knn_distance.min())


def test_satisfies_the_protocol_and_defaults_are_the_papers() -> None:
    sampler = KNNBoundarySampler()
    assert isinstance(sampler, EmbeddingSampler)
    assert (sampler.k, sampler.boundary_size, sampler.anchors_per_round) == (300, 200, 50)
    assert (sampler.candidates_per_anchor, sampler.keep_per_anchor, sampler.effective_sigma) == (1500, 2, 0.03)
    assert "KNNBoundarySampler(k=300" in repr(sampler)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_bank_or_anchors_raise_naming_the_problem() -> None:
    bank = _clustered_bank()
    tokens = _tokens(3, 16)
    sampler = _small_sampler()
    with pytest.raises(ValueError, match=r"k=60 is too large: class 0 \('class0'\) has 60 bank embeddings"):
        _small_sampler(k=60).sample(bank, tokens, 4)
    with pytest.raises(ValueError, match=r"boundary_size=61 exceeds the 60 bank embeddings of class 0"):
        _small_sampler(boundary_size=61).sample(bank, tokens, 4)
    with pytest.raises(ValueError, match=r"dimension 16 differs from the anchors' dimension 8"):
        sampler.sample(bank, _tokens(3, 8), 4)
    with pytest.raises(ValueError, match=r"bank has 3 classes but anchors has 4"):
        sampler.sample(bank, _tokens(4, 16), 4)
    scaled = FeatureBank(bank.embeddings.clone(), bank.labels)
    scaled.embeddings[70] *= 1.5
    with pytest.raises(ValueError, match=r"L2-normalised .* 1 of 180 rows .* row 70 \(class 1\) with norm 1.5"):
        sampler.sample(scaled, tokens, 4)
    broken = FeatureBank(bank.embeddings.clone(), bank.labels)
    broken.embeddings[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="bank embeddings contains 1 NaN"):
        sampler.sample(broken, tokens, 4)
    emptied = FeatureBank(bank.embeddings, bank.labels.clone())
    emptied.labels[emptied.labels == 2] = 1
    with pytest.raises(ValueError, match=r"class 2 \('class2'\) has no embedding"):
        sampler.sample(emptied, tokens, 4)
    with pytest.raises(ValueError, match="num_per_class must be > 0"):
        sampler.sample(bank, tokens, 0)
    with pytest.raises(TypeError, match="bank must be a FeatureBank"):
        sampler.sample(bank.embeddings, tokens, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"k=300 is too large: the bank has 180"):
        KNNBoundarySampler(scope="all").anchor_set(bank, 0)


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got 0.0"):
        KNNBoundarySampler(sigma=0.0)
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got -0.1"):
        KNNBoundarySampler(sigma=-0.1)
    with pytest.raises(ValueError, match=r"anchors_per_round \(60\) must be <= boundary_size \(50\)"):
        KNNBoundarySampler(boundary_size=50, anchors_per_round=60)
    with pytest.raises(ValueError, match=r"keep_per_anchor \(5\) must be <= candidates_per_anchor \(4\)"):
        KNNBoundarySampler(candidates_per_anchor=4, keep_per_anchor=5)
    with pytest.raises(ValueError, match="mode must be one of"):
        KNNBoundarySampler(mode="outliers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope must be one of"):
        KNNBoundarySampler(scope="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise must be one of"):
        KNNBoundarySampler(noise="fresh")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k must be an int"):
        KNNBoundarySampler(k=3.0)  # type: ignore[arg-type]
    keys = _unit(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"k must be <= the number of keys \(10\), got 11"):
        candidate_knn_distance(keys[:2], torch.randn(5, 4), keys, 11, 0.1)
    with pytest.raises(ValueError, match=r"keys must be L2-normalised: row \d+ has norm 2"):
        candidate_knn_distance(keys[:2], torch.randn(5, 4), keys * 2, 3, 0.1)
    with pytest.raises(ValueError, match="shapes disagree"):
        candidate_knn_distance(keys[:2], torch.randn(5, 3), keys, 3, 0.1)
    with pytest.raises(ValueError, match=r"keep must be <= the number of candidates per anchor \(5\), got 6"):
        select_candidates(keys[:2], torch.randn(5, 4), keys, 3, 0.1, 6)
