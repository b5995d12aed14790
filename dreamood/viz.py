"""Figures: 2-D views of the embedding space (DREAM-OOD Figs. 3, 4, 6) and grids of decoded images.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot state, nothing is shown) and
written as PNG through the Agg renderer with an atomic file write.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from dreamood._validation import as_tensor, check_choice, check_finite, check_floating, check_positive_int, check_rank
from dreamood.anchors import TokenEmbeddings
from dreamood.feature_bank import FeatureBank
from dreamood.io import atomic_write
from dreamood.sampling.samples import EmbeddingSamples

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure
    from numpy.typing import NDArray

__all__ = ["plot_embeddings", "save_image_grid"]

_DEFAULT_MAX_CLASSES = 10


def plot_embeddings(
    bank: FeatureBank,
    samples: EmbeddingSamples | None = None,
    anchors: TokenEmbeddings | None = None,
    classes: Sequence[int] | None = None,
    method: Literal["tsne", "pca"] = "tsne",
    path: str | os.PathLike[str] | None = None,
    max_points_per_class: int = 200,
    seed: int = 0,
    *,
    title: str | None = None,
    dpi: int = 150,
) -> Figure:
    """Plot ID embeddings, class anchors and sampled embeddings in 2-D, coloured by class.

    The view of DREAM-OOD (Du et al., NeurIPS 2023) Figs. 3, 4 and 6: bank embeddings are dots, anchors
    ``T(y)`` are stars, sampled embeddings are crosses, each in its class's colour. Every vector is scaled
    to unit norm and all of them are projected together (t-SNE or PCA from scikit-learn), so distances in
    the plot compare directions, as the cosine-aligned latent space does.

    Args:
        bank: The ID feature bank.
        samples: Sampled embeddings to overlay (rows of the shown classes only), or ``None``.
        anchors: Class anchors to overlay, or ``None``; they also provide the legend's class names.
        classes: Class indices to show; ``None`` shows the first ten classes (all when there are fewer).
        method: ``"tsne"`` or ``"pca"``.
        path: Where to save the figure as PNG (written atomically), or ``None`` to only return it.
        max_points_per_class: At most this many bank embeddings, and this many samples, per class (a seeded
            random subset).
        seed: Seed of the subsets and of t-SNE.
        title: Figure title; defaults to the method name.
        dpi: Resolution of the saved PNG.

    Returns:
        The matplotlib figure.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If dimensions disagree, a class index is out of range, ``method`` is unknown, or fewer
            than three points would be projected.
    """
    if not isinstance(bank, FeatureBank):
        raise TypeError(f"bank must be a FeatureBank, got {type(bank).__name__}")
    if samples is not None and not isinstance(samples, EmbeddingSamples):
        raise TypeError(f"samples must be EmbeddingSamples or None, got {type(samples).__name__}")
    if anchors is not None and not isinstance(anchors, TokenEmbeddings):
        raise TypeError(f"anchors must be TokenEmbeddings or None, got {type(anchors).__name__}")
    check_choice(method, ("tsne", "pca"), "method")
    check_positive_int(max_points_per_class, "max_points_per_class")
    check_positive_int(dpi, "dpi")
    for other, name in ((samples, "samples"), (anchors, "anchors")):
        if other is not None and other.dim != bank.dim:
            raise ValueError(f"{name} have dimension {other.dim} but the bank has {bank.dim}")
    if anchors is not None and anchors.num_classes != bank.num_classes:
        raise ValueError(f"anchors have {anchors.num_classes} classes but the bank has {bank.num_classes}")
    shown = _classes_to_show(classes, bank.num_classes)

    generator = torch.Generator().manual_seed(seed)
    parts: list[Tensor] = []
    kinds: list[str] = []
    part_labels: list[Tensor] = []
    bank_vectors, bank_labels = bank.embeddings.cpu(), bank.labels.cpu()
    for class_index in shown:
        rows = _subset(torch.nonzero(bank_labels == class_index).flatten(), max_points_per_class, generator)
        parts.append(bank_vectors[rows])
        part_labels.append(bank_labels[rows])
        kinds.append("bank")
    if anchors is not None:
        parts.append(anchors.vectors.cpu()[shown])
        part_labels.append(torch.tensor(shown))
        kinds.append("anchor")
    if samples is not None:
        sample_vectors, sample_labels = samples.vectors.cpu(), samples.labels.cpu()
        for class_index in shown:
            rows = _subset(torch.nonzero(sample_labels == class_index).flatten(), max_points_per_class, generator)
            parts.append(sample_vectors[rows])
            part_labels.append(sample_labels[rows])
            kinds.append("sample")
    sizes = [len(part) for part in parts]
    if sum(sizes) < 3:
        raise ValueError(f"at least 3 points are needed for a 2-D projection, got {sum(sizes)}")
    joint = torch.nn.functional.normalize(torch.cat(parts).double(), dim=1)
    projected = torch.from_numpy(_project(joint.numpy(), method, seed))

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = _class_names(bank, samples, anchors)
    colors = _class_colors(len(shown))
    color_of = {class_index: colors[i] for i, class_index in enumerate(shown)}
    figure = Figure(figsize=(7.5, 6.0), layout="constrained")
    axes = figure.add_subplot()
    style: dict[str, dict[str, Any]] = {
        "bank": {"marker": "o", "s": 10, "alpha": 0.45, "linewidths": 0, "zorder": 1},
        "sample": {"marker": "x", "s": 22, "alpha": 0.9, "linewidths": 1.0, "zorder": 2},
        "anchor": {"marker": "*", "s": 320, "alpha": 1.0, "linewidths": 0.9, "zorder": 3, "edgecolors": "black"},
    }
    for points, labels, kind in zip(torch.split(projected, sizes), part_labels, kinds):
        if len(points) == 0:
            continue
        point_colors = [color_of[int(label)] for label in labels]
        axes.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=point_colors, **style[kind])
    class_handles = [
        Line2D([], [], marker="o", linestyle="", color=color_of[c], label=names[c], markersize=7) for c in shown
    ]
    kind_handles = [Line2D([], [], marker="o", linestyle="", color="0.45", label="ID embeddings", markersize=5)]
    if anchors is not None:
        kind_handles.append(
            Line2D(
                [], [], marker="*", linestyle="", color="0.45", markeredgecolor="black", label="anchors T(y)",
                markersize=13,
            )
        )  # fmt: skip
    if samples is not None:
        kind_handles.append(Line2D([], [], marker="x", linestyle="", color="0.2", label="sampled", markersize=7))
    class_legend = axes.legend(
        handles=class_handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="class"
    )
    axes.add_artist(class_legend)
    axes.legend(handles=kind_handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize="small")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title if title is not None else {"tsne": "t-SNE", "pca": "PCA"}[method] + " of the embeddings")
    if path is not None:
        _save_png(figure, path, dpi)
    return figure


def save_image_grid(
    images: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    nrow: int = 8,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    *,
    cell_inches: float | None = None,
    dpi: int = 100,
) -> Path:
    """Save images as a PNG grid, optionally with a title over each image and a label left of each row.

    Args:
        images: ``(N, C, H, W)`` tensor or a sequence of ``(C, H, W)`` tensors of one size, ``C`` in ``{1, 3}``,
            values in ``[0, 1]``.
        path: Output PNG path (written atomically; parent folders are created).
        nrow: Images per row.
        titles: One title per image, or ``None``.
        row_labels: One label per row (``ceil(N / nrow)`` of them), or ``None``.
        cell_inches: Size of one cell in inches; defaults to the image width at ``dpi`` (at least 1.5 inches).
        dpi: Resolution of the PNG.

    Returns:
        The path written.

    Raises:
        TypeError: If ``images`` is not a tensor or a sequence of tensors, or not floating point.
        ValueError: If shapes are wrong, sizes differ, values lie outside ``[0, 1]``, or the number of titles
            or row labels does not match.
        NonFiniteError: If an image contains NaN or infinity.
    """
    batch = _image_batch(images)
    check_positive_int(nrow, "nrow")
    check_positive_int(dpi, "dpi")
    count = int(batch.shape[0])
    columns = min(nrow, count)
    rows = -(-count // columns)
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles has {len(titles)} entries but there are {count} images")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries but the grid has {rows} rows")
    width = float(batch.shape[3])
    cell = cell_inches if cell_inches is not None else max(width / dpi, 1.5)
    if not cell > 0:
        raise ValueError(f"cell_inches must be > 0, got {cell_inches!r}")

    from matplotlib.figure import Figure

    title_space = 0.25 if titles is not None else 0.0
    label_space = 0.35 if row_labels is not None else 0.0
    figure = Figure(figsize=(columns * cell + label_space, rows * (cell + title_space)), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    pixels = batch.permute(0, 2, 3, 1).numpy()
    for position in range(rows * columns):
        axes = grid[position // columns][position % columns]
        axes.set_xticks([])
        axes.set_yticks([])
        if position >= count:
            axes.set_axis_off()
            continue
        image = pixels[position]
        if image.shape[2] == 1:
            axes.imshow(image[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            axes.imshow(image, vmin=0.0, vmax=1.0, interpolation="nearest")
        if titles is not None:
            axes.set_title(titles[position], fontsize="small")
        if row_labels is not None and position % columns == 0:
            axes.set_ylabel(row_labels[position // columns], fontsize="small")
    return _save_png(figure, path, dpi)


def _classes_to_show(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    if classes is None:
        return list(range(min(num_classes, _DEFAULT_MAX_CLASSES)))
    shown = [int(c) for c in classes]
    if not shown:
        raise ValueError("classes is empty: choose at least one class to show")
    bad = [c for c in shown if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes must lie in [0, {num_classes}), got {bad}")
    if len(set(shown)) != len(shown):
        raise ValueError(f"classes has duplicates: {shown}")
    return shown


def _subset(rows: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    if len(rows) <= limit:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:limit]]


def _project(data: NDArray[np.float64], method: str, seed: int) -> NDArray[np.float64]:
    import numpy as np

    if method == "pca":
        from sklearn.decomposition import PCA

        return np.asarray(PCA(n_components=2, random_state=seed).fit_transform(data), dtype=np.float64)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(data) - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return np.asarray(tsne.fit_transform(data), dtype=np.float64)


def _class_names(bank: FeatureBank, samples: EmbeddingSamples | None, anchors: TokenEmbeddings | None) -> list[str]:
    if anchors is not None:
        return list(anchors.class_names)
    if samples is not None and samples.class_names is not None and len(samples.class_names) == bank.num_classes:
        return list(samples.class_names)
    return [f"class {c}" for c in range(bank.num_classes)]


def _class_colors(count: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10"] if count <= 10 else colormaps["tab20"]
    if count <= palette.N:
        return [to_hex(palette(i)) for i in range(count)]
    spectrum = colormaps["turbo"]
    return [to_hex(spectrum(i / max(count - 1, 1))) for i in range(count)]


def _image_batch(images: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(images, Tensor):
        batch = images
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is empty: nothing to save")
        tensors = [as_tensor(image, f"images[{i}]") for i, image in enumerate(images)]
        for index, image in enumerate(tensors):
            check_rank(image, 3, f"images[{index}]", "(channels, height, width)")
            if image.shape != tensors[0].shape:
                raise ValueError(
                    f"all images must have one shape, got {tuple(tensors[0].shape)} for images[0] and "
                    f"{tuple(image.shape)} for images[{index}]"
                )
        batch = torch.stack([image.detach().cpu() for image in tensors])
    else:
        raise TypeError(f"images must be a tensor or a list of tensors, got {type(images).__name__}")
    check_rank(batch, 4, "images", "(num_images, channels, height, width)")
    check_floating(batch, "images")
    if batch.shape[0] == 0:
        raise ValueError("images is empty: nothing to save")
    if batch.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(batch.shape)}")
    batch = batch.detach().cpu().float()
    check_finite(batch, "images")
    low, high = float(batch.min()), float(batch.max())
    if low < -1e-6 or high > 1.0 + 1e-6:
        raise ValueError(f"images must have values in [0, 1], got values from {low:.4g} to {high:.4g}")
    return batch.clamp(0.0, 1.0)


def _save_png(figure: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    target = Path(path)
    with atomic_write(target) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return target
