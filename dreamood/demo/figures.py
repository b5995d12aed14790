"""Image mosaics for the demo's report: many tiny images in one picture, one labelled row per group.

The images are tiled into one array (1-pixel white gaps) and drawn with a single ``imshow``, the row labels as
horizontal tick labels on the left. One axes instead of one per image keeps a 150-image figure fast to draw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dreamood._validation import check_positive_int, check_rank
from dreamood.demo.labels import GENERALIZATION, embedding_projection
from dreamood.io import atomic_write

if TYPE_CHECKING:
    from dreamood.demo.context import SeedRun
    from dreamood.demo.data import DigitsData
    from dreamood.feature_bank import FeatureBank
    from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "figure_data",
    "figure_embeddings",
    "figure_generalization",
    "figure_outliers",
    "figure_sigmas",
    "mosaic",
    "save_mosaic",
    "save_rows",
]


def mosaic(images: Tensor, columns: int, *, gap: int = 1) -> Tensor:
    """Tile grey images ``(N, 1, H, W)`` row by row into one ``(rows * (H + gap) - gap, ...)`` array.

    Empty cells (when ``N`` is not a multiple of ``columns``) and the gaps are white (1.0).

    Args:
        images: Grey images in ``[0, 1]``.
        columns: Images per row.
        gap: Pixels of white between neighbouring images.

    Returns:
        The tiled image, 2-D, float32.

    Raises:
        ValueError: ``images`` is not ``(N, 1, H, W)`` with ``N >= 1``, or ``columns`` is not positive.
    """
    check_rank(images, 4, "images", "(num_images, 1, height, width)")
    check_positive_int(columns, "columns")
    if images.shape[0] == 0 or images.shape[1] != 1:
        raise ValueError(f"images must be a non-empty grey batch (N, 1, H, W), got shape {tuple(images.shape)}")
    count, _, height, width = images.shape
    rows = -(-count // columns)
    canvas = torch.ones(rows * (height + gap) - gap, columns * (width + gap) - gap)
    for index, image in enumerate(images.detach().cpu().float()):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[top : top + height, left : left + width] = image[0]
    return canvas


def save_mosaic(
    images: Tensor,
    path: str | os.PathLike[str],
    columns: int,
    row_labels: Sequence[str] | None = None,
    *,
    inches_per_image: float = 0.5,
    dpi: int = 100,
) -> Path:
    """Save grey images as a labelled mosaic PNG (written atomically).

    Args:
        images: Grey images ``(N, 1, H, W)`` in ``[0, 1]``.
        path: Output PNG.
        columns: Images per row.
        row_labels: One label per row, shown on the left, or ``None``.
        inches_per_image: Size of one image in the figure.
        dpi: Resolution.

    Returns:
        The path written.

    Raises:
        ValueError: Bad shapes, or as many row labels as rows are not given.
    """
    tiled = mosaic(images, columns)
    rows = -(-images.shape[0] // columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries but the mosaic has {rows} rows")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    label_inches = 0.0 if row_labels is None else 0.075 * max(len(label) for label in row_labels) + 0.15
    figure = Figure(figsize=(columns * inches_per_image + label_inches, rows * inches_per_image + 0.1))
    FigureCanvasAgg(figure)
    axes = figure.add_axes((label_inches / figure.get_figwidth(), 0.0, 1.0 - label_inches / figure.get_figwidth(), 1.0))
    axes.imshow(tiled.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    step = images.shape[2] + 1
    axes.set_xticks([])
    if row_labels is None:
        axes.set_yticks([])
    else:
        axes.set_yticks([r * step + (step - 2) / 2 for r in range(rows)], list(row_labels), fontsize=9)
        axes.tick_params(axis="y", length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    target = Path(path)
    with atomic_write(target) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return target


# ---------------------------------------------------------------------------------------------- the report's figures


def save_rows(rows: list[Tensor], labels: list[str], path: Path, columns: int) -> str:
    """Save one labelled mosaic row per entry of ``rows`` (each cut or padded to ``columns`` images).

    Returns:
        The path relative to the output folder (``figures/<name>``).
    """
    padded = [torch.cat([r[:columns], torch.ones(max(0, columns - len(r)), *r.shape[1:])]) for r in rows]
    save_mosaic(torch.cat(padded), path, columns, labels)
    return str(Path("figures") / path.name)


def figure_data(data: DigitsData, test_sets: Mapping[str, Tensor], out_dir: Path) -> str:
    """The ID training digits and every OOD test set, one row each."""
    rows = [data.train_images, *test_sets.values()]
    return save_rows(rows, ["ID training digits", *test_sets], out_dir / "figures" / "data.png", 16)


def figure_embeddings(run: SeedRun, bank: FeatureBank, outliers: EmbeddingSamples) -> str:
    """ID embeddings, anchors and DREAM-OOD outlier embeddings in 2-d (the paper's Fig. 4): PCA in a quick run."""
    from dreamood.viz import plot_embeddings

    method, name = embedding_projection(run.config.quick)
    path = run.demo.out_dir / "figures" / "embeddings.png"
    plot_embeddings(
        bank, outliers, run.demo.anchors, method=method, path=path, max_points_per_class=100, seed=run.seed,
        title=f"{name}: ID embeddings, anchors T(y), DREAM-OOD outliers",
    )  # fmt: skip
    return str(path.relative_to(run.demo.out_dir))


def figure_sigmas(run: SeedRun, bank: FeatureBank) -> str:
    """Decoded outliers for several noise levels (the paper's Fig. 5): one row per sigma, two per class."""
    from dreamood.sampling.knn_boundary import KNNBoundarySampler

    settings = {key: value for key, value in run.sampler_settings.items() if key not in ("sigma", "num_per_class")}
    sigma = run.sampler_settings["sigma"]
    rows, labels = [], []
    for multiplier in run.config.sigma_multipliers:
        value = multiplier * sigma
        sampler = KNNBoundarySampler(**settings, sigma=value, seed=run.seed, show_progress=False)
        samples = sampler.sample(bank, run.demo.anchors, 2)
        folder = run.demo.out_dir / "artifacts" / "sigma_grid" / f"sigma-{value:.4f}"
        rows.append(run.decode(samples, folder, progress=False)[0])
        labels.append(f"sigma = {value:.3g} ({multiplier:g}x)")
    return save_rows(rows, labels, run.demo.out_dir / "figures" / "outliers_by_sigma.png", len(rows[0]))


def figure_outliers(
    dream_images: Tensor, noise_images: Tensor, outliers: EmbeddingSamples, data: DigitsData, out_dir: Path
) -> str:
    """Real ID digits, DREAM-OOD outliers and Table 2 (I) outliers of every class side by side."""
    rows, labels = [], []
    for class_index, name in enumerate(data.class_names):
        mask = outliers.labels.cpu() == class_index
        rows += [data.train_images[data.train_labels == class_index], dream_images[mask], noise_images[mask]]
        labels += [f"{name}: real digits", f"{name}: DREAM-OOD", f"{name}: noise on T(y)"]
    return save_rows(rows, labels, out_dir / "figures" / "outliers.png", 12)


def figure_generalization(
    data: DigitsData, extra: Mapping[str, tuple[Tensor, Tensor]], rotated: Tensor, out_dir: Path
) -> str:
    """Class 0 in every version the generalisation table uses: test, rotated test, training, appended images."""
    name = data.class_names[0]
    rows = [data.test_images[data.test_labels == 0], rotated[data.test_labels == 0]]
    rows.append(data.train_images[data.train_labels == 0])
    labels = [f"{name}: ID test digits", f"{name}: rotated test digits", f"{name}: training digits"]
    for key, (images, targets) in extra.items():
        classes = targets.argmax(dim=1) if targets.is_floating_point() else targets
        rows.append(images[classes == 0])
        labels.append(GENERALIZATION[key])
    return save_rows(rows, labels, out_dir / "figures" / "generalization.png", 12)
