"""TokenEmbeddings, FeatureBank and EmbeddingSamples built from tensors: validation, indexing, round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.functional import normalize

from dreamood.anchors import TokenEmbeddings
from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.feature_bank import FeatureBank
from dreamood.io import sidecar_path
from dreamood.sampling.samples import EmbeddingSamples


def test_token_embeddings_fields_and_round_trip(tmp_path: Path) -> None:
    vectors = torch.randn(3, 8)
    anchors = TokenEmbeddings(["cat", "dog", "car"], vectors, token_ids=[[1], [2, 3], [4]], policy="mean")
    assert anchors.num_classes == 3 and anchors.dim == 8 and len(anchors) == 3
    torch.testing.assert_close(anchors.norms, vectors.norm(dim=1))
    loaded = TokenEmbeddings.load(anchors.save(tmp_path / "anchors"))
    assert loaded.class_names == ["cat", "dog", "car"]
    assert loaded.token_ids == [[1], [2, 3], [4]] and loaded.policy == "mean"
    assert torch.equal(loaded.vectors, vectors)
    assert anchors.to(dtype=torch.float64).vectors.dtype == torch.float64


def test_token_embeddings_from_numpy(shared_data: Path) -> None:
    table = np.load(shared_data / "token_embed_c100.npy")
    anchors = TokenEmbeddings([f"class {i}" for i in range(100)], table)
    assert anchors.dim == 768
    assert float(anchors.norms.min()) > 0.33 and float(anchors.norms.max()) < 0.43


@pytest.mark.parametrize(
    ("names", "vectors", "error", "match"),
    [
        (["a", "a"], torch.randn(2, 4), ValueError, "duplicate: 'a'"),
        (["a", ""], torch.randn(2, 4), ValueError, r"class_names\[1\] is an empty string"),
        ([], torch.randn(0, 4), ValueError, "class_names is empty"),
        (["a", "b"], torch.randn(3, 4), ValueError, "3 rows but there are 2 class names"),
        (["a"], torch.randn(4), ValueError, "2-D tensor"),
        (["a"], torch.ones(1, 4, dtype=torch.long), TypeError, "floating-point"),
        (["a"], torch.tensor([[float("nan"), 1.0]]), NonFiniteError, "1 NaN"),
        ("cat", torch.randn(3, 4), TypeError, "not a single string"),
    ],
)
def test_token_embeddings_bad_input(names: object, vectors: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TokenEmbeddings(names, vectors)  # type: ignore[arg-type]


def test_token_embeddings_inconsistent_sidecar(tmp_path: Path) -> None:
    path = TokenEmbeddings(["a", "b"], torch.randn(2, 3)).save(tmp_path / "anchors")
    text = sidecar_path(path).read_text().replace('"b"', '"a"')
    sidecar_path(path).write_text(text)
    with pytest.raises(ArtifactError, match="was changed after it was saved"):
        TokenEmbeddings.load(path)


def test_feature_bank_basics(tmp_path: Path) -> None:
    embeddings = normalize(torch.randn(10, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    bank = FeatureBank(embeddings, labels)
    assert bank.num_classes == 3 and bank.dim == 4 and len(bank) == 10 and bank.is_normalized()
    assert bank.class_counts.tolist() == [3, 3, 4]
    assert bank.indices_of(2).tolist() == [2, 5, 8, 9]
    assert torch.equal(bank.per_class(0), embeddings[[0, 3, 6]])
    loaded = FeatureBank.load(bank.save(tmp_path / "bank"))
    assert torch.equal(loaded.embeddings, embeddings) and torch.equal(loaded.labels, labels)
    unnormalized = FeatureBank(embeddings * 3, labels)
    assert not unnormalized.is_normalized()
    assert unnormalized.normalized().is_normalized()


@pytest.mark.parametrize(
    ("embeddings", "labels", "kwargs", "error", "match"),
    [
        (torch.randn(3, 2), torch.tensor([0, 1, 3]), {"num_classes": 3}, ValueError, r"labels must lie in \[0, 3\)"),
        (torch.randn(3, 2), torch.tensor([0, 2, 2]), {}, ValueError, r"classes \[1\] have no embedding"),
        (torch.randn(3, 2), torch.tensor([0, 1]), {}, ValueError, "3 rows but labels has 2"),
        (torch.randn(0, 2), torch.zeros(0, dtype=torch.long), {}, ValueError, "empty"),
        (torch.tensor([[1.0, float("inf")]]), torch.tensor([0]), {}, NonFiniteError, "1 infinite"),
        (torch.randn(2, 2), torch.tensor([0.0, 1.0]), {}, TypeError, "integer tensor"),
        (torch.randn(2), torch.tensor([0, 1]), {}, ValueError, "2-D tensor"),
    ],
)
def test_feature_bank_bad_input(
    embeddings: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, int], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        FeatureBank(embeddings, labels, **kwargs)


class _MeanEncoder(torch.nn.Module):
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :3] + 0.1


def test_feature_bank_from_encoder_caps_per_class() -> None:
    images = torch.randn(12, 1, 2, 2)
    labels = torch.tensor([0, 1] * 6)
    loader = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)]
    encoder = _MeanEncoder().train()
    bank = FeatureBank.from_encoder(encoder, loader, max_per_class=2, device="cpu", show_progress=False)
    assert encoder.training, "the encoder's mode must be restored"
    assert bank.class_counts.tolist() == [2, 2] and bank.is_normalized()
    expected = normalize(images.flatten(1)[:4, :3] + 0.1, dim=1)
    torch.testing.assert_close(bank.embeddings, expected)


def test_embedding_samples_indexing_batches_and_round_trip(tmp_path: Path) -> None:
    vectors = torch.randn(7, 5)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    samples = EmbeddingSamples(
        vectors,
        labels,
        anchor_index=torch.arange(7),
        knn_distance=torch.rand(7),
        config={"sampler": "X", "k": 3},
        class_names=["a", "b", "c"],
    )
    assert len(samples.for_class(1)) == 3
    assert samples[2].anchor_index.tolist() == [2]
    assert samples[-1].labels.tolist() == [2]
    batches = list(samples.batches(3))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    loaded = EmbeddingSamples.load(samples.save(tmp_path / "samples"))
    assert loaded.config == {"sampler": "X", "k": 3} and loaded.class_names == ["a", "b", "c"]
    assert loaded.knn_distance is not None and torch.equal(loaded.knn_distance, samples.knn_distance)
    assert torch.equal(loaded.vectors, vectors) and torch.equal(loaded.labels, labels)
    joined = EmbeddingSamples.concat([samples[:3], samples[3:]])
    assert torch.equal(joined.vectors, vectors) and torch.equal(joined.anchor_index, torch.arange(7))


def test_embedding_samples_defaults_and_errors() -> None:
    samples = EmbeddingSamples(torch.randn(2, 3), torch.tensor([0, 1]))
    assert samples.anchor_index.tolist() == [-1, -1] and samples.knn_distance is None
    with pytest.raises(ValueError, match="labels has 1 entries"):
        EmbeddingSamples(torch.randn(2, 3), torch.tensor([0]))
    with pytest.raises(NonFiniteError):
        EmbeddingSamples(torch.tensor([[float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="anchor_index must have shape"):
        EmbeddingSamples(torch.randn(2, 3), torch.tensor([0, 1]), anchor_index=torch.tensor([1]))
    with pytest.raises(ValueError, match="parts is empty"):
        EmbeddingSamples.concat([])
