"""The OOD test sets of the paper's two benchmarks, read from folders with the paper's preprocessing.

CIFAR-100 (as in VOS, NPOS and DREAM-OOD): Textures (DTD, Cimpoi et al., CVPR 2014), SVHN (Netzer et al., 2011,
through torchvision), Places365 (Zhou et al., TPAMI 2017), LSUN-C and iSUN (the 32x32 versions distributed with
ODIN, Liang et al., ICLR 2018). ImageNet-100: the iNaturalist, SUN, Places and Textures subsets of MOS (Huang &
Li, CVPR 2021). Each set lives in its own folder under one OOD data root (the sub-folder names below are the
defaults; any of them can be overridden), and every image file under a set's folder is used, whatever the
nesting, with the ID test transform of the benchmark (:func:`~dreamood.data.transforms.get_transform`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamood.data.datasets import ImageListDataset, find_images

__all__ = [
    "CIFAR100_OOD_SETS",
    "IMAGENET100_OOD_SETS",
    "OODImageFolder",
    "OODSetSpec",
    "ood_sets_of",
    "ood_test_sets",
    "svhn_test",
]

Transform = Callable[[Any], Any]


@dataclass(frozen=True)
class OODSetSpec:
    """Where an OOD test set lives under the OOD data root and how it is read.

    Attributes:
        name: The set's name in reports (``"Textures"``).
        folder: Default folder relative to the OOD data root (``"dtd/images"``).
        kind: ``"folder"`` (every image under the folder) or ``"svhn"`` (torchvision's SVHN test split).
        layout: What the folder holds, shown when it is missing.
    """

    name: str
    folder: str
    kind: str
    layout: str


#: The five OOD test sets of the CIFAR-100 benchmark.
CIFAR100_OOD_SETS: tuple[OODSetSpec, ...] = (
    OODSetSpec("Textures", "dtd/images", "folder", "DTD's images/ folder: one folder of .jpg per texture category"),
    OODSetSpec("SVHN", "svhn", "svhn", "test_32x32.mat of SVHN (format 2, http://ufldl.stanford.edu/housenumbers/)"),
    OODSetSpec("Places365", "places365", "folder", "the Places365 test images (any nesting of .jpg files)"),
    OODSetSpec("LSUN-C", "LSUN_C", "folder", "the LSUN (crop) 32x32 images distributed with ODIN"),
    OODSetSpec("iSUN", "iSUN", "folder", "the iSUN 32x32 images distributed with ODIN"),
)

#: The four OOD test sets of the ImageNet-100 benchmark (the subsets curated by MOS).
IMAGENET100_OOD_SETS: tuple[OODSetSpec, ...] = (
    OODSetSpec("iNaturalist", "iNaturalist", "folder", "MOS's iNaturalist subset (iNaturalist/images/*.jpg)"),
    OODSetSpec("SUN", "SUN", "folder", "MOS's SUN subset (SUN/images/*.jpg)"),
    OODSetSpec("Places", "Places", "folder", "MOS's Places subset (Places/images/*.jpg)"),
    OODSetSpec("Textures", "dtd/images", "folder", "DTD's images/ folder: one folder of .jpg per texture category"),
)

_SETS_OF_BENCHMARK: dict[str, tuple[OODSetSpec, ...]] = {
    "cifar100": CIFAR100_OOD_SETS,
    "imagenet100": IMAGENET100_OOD_SETS,
}


class OODImageFolder(ImageListDataset):
    """Every image file under ``root`` (any nesting), labelled ``-1``: an OOD test set.

    Args:
        root: The set's folder.
        transform: Applied to each PIL image (the ID test transform).
        name: The set's name, used in error messages.
        layout: What the folder should hold, used in error messages.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``root`` holds no image file.
    """

    def __init__(
        self, root: str | os.PathLike[str], transform: Transform | None = None, *, name: str = "OOD", layout: str = ""
    ) -> None:
        folder = Path(root).expanduser()
        expected = f" Expected {layout}." if layout else ""
        if not folder.is_dir():
            raise FileNotFoundError(f"OOD test set {name!r} not found: no folder {folder}.{expected}")
        images = find_images(folder)
        if not images:
            raise ValueError(f"OOD test set {name!r} has no image file under {folder}.{expected}")
        super().__init__([(path, -1) for path in images], transform)
        self.name = name


def svhn_test(root: str | os.PathLike[str], transform: Transform | None = None) -> Any:
    """SVHN's 26,032 test images through ``torchvision.datasets.SVHN``, with a clear error when missing.

    Args:
        root: Folder holding ``test_32x32.mat``.
        transform: Applied to each PIL image.

    Returns:
        The torchvision dataset (labels are digit classes; OOD evaluation ignores them).

    Raises:
        FileNotFoundError: ``root/test_32x32.mat`` is missing.
        ValueError: The file fails torchvision's checksum or cannot be read.
    """
    folder = Path(root).expanduser()
    matrix = folder / "test_32x32.mat"
    if not matrix.is_file():
        raise FileNotFoundError(
            f"OOD test set 'SVHN' not found: no file {matrix}. Expected the test_32x32.mat file of SVHN "
            "(format 2, http://ufldl.stanford.edu/housenumbers/test_32x32.mat) in that folder."
        )
    from torchvision.datasets import SVHN

    try:
        return SVHN(str(folder), split="test", transform=transform, download=False)
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        raise ValueError(
            f"SVHN file {matrix} failed torchvision's checksum or cannot be read ({type(error).__name__}: {error}); "
            "download test_32x32.mat again"
        ) from error


def ood_sets_of(benchmark: str) -> tuple[OODSetSpec, ...]:
    """The OOD test sets of ``benchmark`` (``"cifar100"`` or ``"imagenet100"``).

    Args:
        benchmark: The benchmark name.

    Returns:
        The set specifications, in the paper's order.

    Raises:
        ValueError: ``benchmark`` has no predefined OOD sets.
    """
    if benchmark not in _SETS_OF_BENCHMARK:
        raise ValueError(f"benchmark must be one of {sorted(_SETS_OF_BENCHMARK)}, got {benchmark!r}")
    return _SETS_OF_BENCHMARK[benchmark]


def ood_test_sets(
    benchmark: str,
    root: str | os.PathLike[str] | None,
    transform: Transform | None = None,
    *,
    names: Sequence[str] | None = None,
    paths: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Build the OOD test sets of a benchmark, by name, in the paper's order.

    Args:
        benchmark: ``"cifar100"`` or ``"imagenet100"`` (the predefined sets), or any other name when every set
            is given in ``paths``.
        root: The OOD data root holding each set's default folder (see :data:`CIFAR100_OOD_SETS` and
            :data:`IMAGENET100_OOD_SETS`); may be ``None`` when ``paths`` locates every set.
        transform: Applied to each PIL image: the benchmark's ID test transform.
        names: The sets to build (default: all of the benchmark's, or every key of ``paths`` for other
            benchmarks).
        paths: Folder of a set by name, overriding ``root/<default folder>``; relative paths are taken from
            ``root``. A name that is not predefined is read as an image folder.

    Returns:
        A dict from set name to dataset.

    Raises:
        ValueError: A name is neither predefined nor in ``paths``, or a set folder holds no image.
        FileNotFoundError: A set's folder or file is missing (the message names the expected layout).
    """
    specs = {spec.name: spec for spec in _SETS_OF_BENCHMARK.get(benchmark, ())}
    overrides = dict(paths or {})
    wanted = list(names) if names is not None else (list(specs) if specs else list(overrides))
    if not wanted:
        raise ValueError(f"no OOD test set to build for benchmark {benchmark!r}: give names or paths")
    base = None if root is None else Path(root).expanduser()
    sets: dict[str, Any] = {}
    for name in wanted:
        spec = specs.get(name)
        if spec is None and name not in overrides:
            known = sorted(set(specs) | set(overrides))
            raise ValueError(f"unknown OOD test set {name!r} for benchmark {benchmark!r}; known sets: {known}")
        if name in overrides:
            location = Path(overrides[name]).expanduser()
        else:
            assert spec is not None
            location = Path(spec.folder)
        if not location.is_absolute():
            if base is None:
                raise ValueError(f"OOD test set {name!r} has the relative folder {str(location)!r} but root is None")
            location = base / location
        if spec is not None and spec.kind == "svhn":
            sets[name] = svhn_test(location, transform)
        else:
            sets[name] = OODImageFolder(location, transform, name=name, layout=spec.layout if spec else "")
    return sets
