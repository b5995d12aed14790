"""Image mosaics for the demo's report: many tiny images in one picture, one labelled row per group.

The images are tiled into one array (1-pixel white gaps) and drawn with a single ``imshow``, the row labels as
horizontal tick labels on the left. One axes instead of one per image keeps a 150-image figure fast to draw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from dreamood._validation import check_positive_int, check_rank
from dreamood.io import atomic_write

__all__ = ["mosaic", "save_mosaic"]


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
