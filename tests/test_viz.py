"""Embedding plots and image grids: files written, what is drawn, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from dreamood.anchors import TokenEmbeddings
from dreamood.errors import NonFiniteError
from dreamood.feature_bank import FeatureBank
from dreamood.sampling.samples import EmbeddingSamples
from dreamood.viz import plot_embeddings, save_image_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _data(
    num_classes: int = 3, per_class: int = 12, dim: int = 8
) -> tuple[FeatureBank, EmbeddingSamples, TokenEmbeddings]:
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    bank = directions.repeat_interleave(per_class, dim=0) + 0.2 * torch.randn(
        num_classes * per_class, dim, generator=generator
    )
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    samples = EmbeddingSamples(
        3.0 * directions.repeat_interleave(4, dim=0) + 0.5 * torch.randn(num_classes * 4, dim, generator=generator),
        torch.arange(num_classes).repeat_interleave(4),
    )
    anchors = TokenEmbeddings([f"name{c}" for c in range(num_classes)], 0.4 * directions)
    return FeatureBank(torch.nn.functional.normalize(bank, dim=1), labels), samples, anchors


def _offsets(figure: Figure) -> list[np.ndarray]:
    return [np.asarray(collection.get_offsets()) for collection in figure.axes[0].collections]


def test_plot_embeddings_pca_projects_unit_vectors_jointly(tmp_path: Path) -> None:
    from sklearn.decomposition import PCA

    bank, samples, anchors = _data()
    path = tmp_path / "figures" / "pca.png"
    figure = plot_embeddings(bank, samples, anchors, method="pca", path=path)
    assert isinstance(figure, Figure)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(path).ndim == 3
    offsets = _offsets(figure)
    # Drawn in order: bank per class, anchors, samples per class.
    assert [len(o) for o in offsets] == [12, 12, 12, 3, 4, 4, 4]
    joint = torch.cat([bank.embeddings, anchors.vectors, samples.vectors]).double()
    expected = PCA(n_components=2, random_state=0).fit_transform(torch.nn.functional.normalize(joint, dim=1).numpy())
    np.testing.assert_allclose(np.concatenate(offsets), expected, rtol=1e-6, atol=1e-9)
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == [
        "ID embeddings",
        "anchors T(y)",
        "sampled",
    ]


def test_plot_embeddings_tsne_subsets_and_classes(tmp_path: Path) -> None:
    bank, samples, _ = _data(num_classes=4)
    figure = plot_embeddings(bank, samples, classes=[1, 3], max_points_per_class=5, path=tmp_path / "t.png")
    assert [len(o) for o in _offsets(figure)] == [5, 5, 4, 4]
    assert (tmp_path / "t.png").stat().st_size > 0
    # Same seed, same picture.
    again = plot_embeddings(bank, samples, classes=[1, 3], max_points_per_class=5)
    for first, second in zip(_offsets(figure), _offsets(again)):
        np.testing.assert_array_equal(first, second)


def test_plot_embeddings_bank_only_shows_first_ten_classes() -> None:
    generator = torch.Generator().manual_seed(1)
    bank = FeatureBank(torch.randn(24, 5, generator=generator), torch.arange(12).repeat_interleave(2))
    figure = plot_embeddings(bank, method="pca")
    assert len(_offsets(figure)) == 10
    assert len(figure.axes[0].get_legend().get_texts()) == 1


def test_plot_embeddings_bad_input() -> None:
    bank, samples, _ = _data()
    with pytest.raises(ValueError, match="method must be one of"):
        plot_embeddings(bank, method="umap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\), got \[5\]"):
        plot_embeddings(bank, classes=[0, 5])
    with pytest.raises(ValueError, match="classes is empty"):
        plot_embeddings(bank, classes=[])
    with pytest.raises(TypeError, match="bank must be a FeatureBank"):
        plot_embeddings(samples)  # type: ignore[arg-type]
    wide = TokenEmbeddings(["a", "b", "c"], torch.randn(3, 9))
    with pytest.raises(ValueError, match="anchors have dimension 9"):
        plot_embeddings(bank, anchors=wide)
    with pytest.raises(ValueError, match="at least 3 points"):
        plot_embeddings(bank, classes=[0], max_points_per_class=2, method="pca")
    with pytest.raises(ValueError, match="max_points_per_class"):
        plot_embeddings(bank, max_points_per_class=0)


def test_save_image_grid_writes_the_pixels(tmp_path: Path) -> None:
    red = torch.zeros(3, 20, 20)
    red[0] = 1.0
    blue = torch.zeros(3, 20, 20)
    blue[2] = 1.0
    path = save_image_grid(
        torch.stack([red, blue, red]), tmp_path / "grid.png", nrow=2, titles=["a", "b", "c"], row_labels=["x", "y"]
    )
    assert path == tmp_path / "grid.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)[:, :, :3].reshape(-1, 3)
    assert np.any(np.all(pixels == [1.0, 0.0, 0.0], axis=1))
    assert np.any(np.all(pixels == [0.0, 0.0, 1.0], axis=1))
    # Two columns, two rows of 1.5-inch cells at 100 dpi plus room for titles and labels.
    height, width = imread(path).shape[:2]
    assert width == round((2 * 1.5 + 0.35) * 100)
    assert height == round(2 * (1.5 + 0.25) * 100)


def test_save_image_grid_accepts_a_list_and_grayscale(tmp_path: Path) -> None:
    images = [torch.full((1, 8, 8), v) for v in (0.0, 0.5, 1.0)]
    path = save_image_grid(images, tmp_path / "gray.png", nrow=8, cell_inches=1.0)
    height, width = imread(path).shape[:2]
    assert (height, width) == (100, 300)


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.rand(2, 3, 8), ValueError, "images must be a 4-D"),
        (torch.rand(2, 2, 8, 8), ValueError, "1 or 3 channels"),
        (torch.rand(2, 3, 8, 8) + 1.0, ValueError, r"values in \[0, 1\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((1, 3, 4, 4), float("nan")), NonFiniteError, "NaN"),
        (torch.rand(0, 3, 8, 8), ValueError, "images is empty"),
        ([], ValueError, "images is empty"),
        ([torch.rand(3, 8, 8), torch.rand(3, 9, 8)], ValueError, "one shape"),
        ("image.png", TypeError, "images must be a tensor"),
    ],
)
def test_save_image_grid_bad_images(images: object, error: type[Exception], message: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        save_image_grid(images, tmp_path / "x.png")  # type: ignore[arg-type]
    assert not (tmp_path / "x.png").exists()


def test_save_image_grid_bad_labels(tmp_path: Path) -> None:
    images = torch.rand(5, 3, 8, 8)
    with pytest.raises(ValueError, match="titles has 2 entries but there are 5 images"):
        save_image_grid(images, tmp_path / "x.png", titles=["a", "b"])
    with pytest.raises(ValueError, match="row_labels has 1 entries but the grid has 3 rows"):
        save_image_grid(images, tmp_path / "x.png", nrow=2, row_labels=["a"])
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(images, tmp_path / "x.png", nrow=0)
