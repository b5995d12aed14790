"""The demo's data: scikit-learn's handwritten digits as the ID set, real photographs as far-OOD sets.

Everything here ships with scikit-learn and scikit-image; nothing is downloaded.

* **ID**: ``sklearn.datasets.load_digits`` (1,797 greyscale 8x8 digits, values ``0..16``, made by counting
  the set pixels of 4x4 blocks of 32x32 bitmaps), divided by 16 into ``[0, 1]``. The ID classes are any
  subset of the ten digits; a stratified, seeded split gives the train and test sets.
* **Near-OOD**: every digit image whose class is not an ID class.
* **Far-OOD**: crops of real photographs brought to the digits' format: ``textures`` (scikit-image's brick,
  grass and gravel), ``faces`` (the 100 faces of scikit-image's LFW subset) and ``photos`` (scikit-learn's
  two sample photographs and six natural photographs of scikit-image). Each crop is converted to grey,
  area-averaged to 8x8 (what the digits' block counts are), stretched to ``[0, 1]`` and quantised to the
  digits' 17 levels.

A far-OOD set whose brightness alone gives it away measures little: digits are mostly black background while
photographs are mid-grey. :func:`match_intensity` therefore gives every far-OOD image the exact pixel values
of a random ID training image (its own pixels keep only their rank order), and the demo reports every far-OOD
set in both versions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dreamood._validation import as_tensor, check_floating, check_positive_int, check_rank

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = [
    "DIGIT_LEVELS",
    "DIGIT_NAMES",
    "FAR_OOD_SETS",
    "DigitsData",
    "far_ood_sets",
    "load_digits_data",
    "match_intensity",
    "parse_id_classes",
    "to_digit_format",
]

#: Class name of each digit, indexed by the digit.
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Number of grey levels of the digits (pixel values are ``0/16, 1/16, ..., 16/16``).
DIGIT_LEVELS = 17

#: Names of the far-OOD sets built by :func:`far_ood_sets`, in report order.
FAR_OOD_SETS: tuple[str, ...] = ("textures", "faces", "photos")

_SIZE = 8
_TEXTURES = ("brick", "grass", "gravel")
_SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "stereo_motorcycle")
# Sides of the square crops of textures and photos, multiples of 8 so that area averaging is exact.
_CROP_SIDES = tuple(range(32, 129, 8))


@dataclass(frozen=True)
class DigitsData:
    """The ID train/test split of the digits and the near-OOD digits.

    Images are float32 tensors ``(N, 1, 8, 8)`` with values in ``{0, 1/16, ..., 1}``.

    Attributes:
        id_classes: The digits that are in-distribution, in label order: label ``i`` is digit
            ``id_classes[i]``.
        class_names: Names of the ID classes (``"zero"``, ...), indexed by label.
        train_images: ID training images.
        train_labels: Their labels in ``[0, len(id_classes))`` (int64).
        test_images: ID test images.
        test_labels: Their labels.
        near_ood_images: Every image of a digit outside ``id_classes`` (empty when all ten are ID).
        near_ood_digits: The digit of each near-OOD image.
        seed: Seed of the split.
    """

    id_classes: tuple[int, ...]
    class_names: tuple[str, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    near_ood_images: Tensor
    near_ood_digits: Tensor
    seed: int

    @property
    def num_classes(self) -> int:
        """Number of ID classes."""
        return len(self.id_classes)


def parse_id_classes(text: str | Sequence[int]) -> tuple[int, ...]:
    """Read a set of ID digits such as ``"0,1,2,3,4,5"``, ``"4-9"`` or ``[4, 5]``.

    Args:
        text: Comma-separated digits and ``a-b`` ranges, or a sequence of ints.

    Returns:
        The digits, sorted, without duplicates.

    Raises:
        ValueError: An entry is not a digit 0-9, fewer than two classes are given, or all ten are (no digit
            would be left as near-OOD).
    """
    digits: set[int] = set()
    if isinstance(text, str):
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            bounds = part.split("-")
            try:
                values = [int(b) for b in bounds]
            except ValueError:
                raise ValueError(f"id_classes must list digits 0-9 such as '0,1,2' or '4-9', got {text!r}") from None
            if len(values) == 2:
                digits.update(range(values[0], values[1] + 1))
            elif len(values) == 1:
                digits.add(values[0])
            else:
                raise ValueError(f"id_classes has a malformed range {part!r} in {text!r}")
            if any(not 0 <= v <= 9 for v in values) or (len(values) == 2 and values[0] > values[1]):
                raise ValueError(f"id_classes must list digits 0-9 in increasing ranges, got {part!r} in {text!r}")
    else:
        for value in text:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
                raise ValueError(f"id_classes must hold digits 0-9, got {value!r} in {list(text)!r}")
            digits.add(value)
    if len(digits) < 2:
        raise ValueError(f"id_classes needs at least two digits, got {sorted(digits)} from {text!r}")
    if len(digits) == 10:
        raise ValueError("id_classes holds all ten digits: at least one digit must be left out as near-OOD")
    return tuple(sorted(digits))


def load_digits_data(
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5), *, test_fraction: float = 0.3, seed: int = 0
) -> DigitsData:
    """Load scikit-learn's digits and split the ID classes into a stratified, seeded train/test split.

    Args:
        id_classes: The in-distribution digits (at least two, not all ten).
        test_fraction: Fraction of every ID class that goes to the test set, in ``(0, 1)``.
        seed: Seed of the split.

    Returns:
        The split and the near-OOD digits.

    Raises:
        ValueError: ``id_classes`` or ``test_fraction`` is out of range.
    """
    classes = parse_id_classes(id_classes)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    digits = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    is_id = torch.isin(digits, torch.tensor(classes))
    id_rows = torch.nonzero(is_id).flatten().numpy()
    label_of = torch.full((10,), -1, dtype=torch.long)
    label_of[list(classes)] = torch.arange(len(classes))
    labels = label_of[digits]
    train_rows, test_rows = train_test_split(
        id_rows, test_size=test_fraction, stratify=labels[id_rows].numpy(), random_state=seed
    )
    train = torch.from_numpy(np.sort(train_rows))
    test = torch.from_numpy(np.sort(test_rows))
    near = torch.nonzero(~is_id).flatten()
    return DigitsData(
        id_classes=classes,
        class_names=tuple(DIGIT_NAMES[d] for d in classes),
        train_images=images[train].contiguous(),
        train_labels=labels[train].contiguous(),
        test_images=images[test].contiguous(),
        test_labels=labels[test].contiguous(),
        near_ood_images=images[near].contiguous(),
        near_ood_digits=digits[near].contiguous(),
        seed=seed,
    )


def to_digit_format(image: Any) -> Tensor:
    """Bring a photograph crop to the digits' format: grey, 8x8 by area averaging, ``[0, 1]``, 17 levels.

    Args:
        image: An ``(H, W)`` grey or ``(H, W, 3|4)`` colour array (any numeric dtype) whose sides are
            multiples of 8.

    Returns:
        A float32 tensor ``(1, 8, 8)``: the block means stretched to ``[0, 1]`` (a constant crop becomes all
        zeros) and rounded to multiples of 1/16.

    Raises:
        ValueError: The array is not 2-D or 3-D, or a side is not a positive multiple of 8.
    """
    import numpy as np

    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 3:
        pixels = _grey(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"image must be an (H, W) or (H, W, C) array, got shape {pixels.shape}")
    height, width = pixels.shape
    if height == 0 or width == 0 or height % _SIZE or width % _SIZE:
        raise ValueError(f"image sides must be positive multiples of {_SIZE}, got shape {pixels.shape}")
    blocks = pixels.reshape(_SIZE, height // _SIZE, _SIZE, width // _SIZE).mean(axis=(1, 3))
    low, high = blocks.min(), blocks.max()
    scaled = (blocks - low) / (high - low) if high > low else np.zeros_like(blocks)
    levels = DIGIT_LEVELS - 1
    return torch.from_numpy(np.round(scaled * levels) / levels).float().unsqueeze(0)


def far_ood_sets(num_per_set: int = 300, *, seed: int = 0) -> dict[str, Tensor]:
    """Build the far-OOD test sets from bundled photographs, in the digits' format.

    ``textures``: random square crops (side 32-128 pixels) of scikit-image's brick, grass and gravel, in equal
    parts. ``faces``: the faces of scikit-image's LFW subset (25x25, at most 100), each cropped to 24x24 at a
    random offset. ``photos``: random square crops of scikit-learn's ``china.jpg`` and ``flower.jpg`` and of
    scikit-image's astronaut, camera, coffee, chelsea, rocket and motorcycle, in equal parts.

    Args:
        num_per_set: Images in each of ``textures`` and ``photos`` (``faces`` has at most 100).
        seed: Seed of the crops.

    Returns:
        ``{"textures": ..., "faces": ..., "photos": ...}``, float32 tensors ``(N, 1, 8, 8)`` in ``[0, 1]``.

    Raises:
        ValueError: ``num_per_set`` is not a positive integer.
    """
    check_positive_int(num_per_set, "num_per_set")
    import numpy as np

    rng = np.random.default_rng(seed)
    textures = [_skimage(name) for name in _TEXTURES]
    photos = [*_sklearn_photos(), *(_skimage(name) for name in _SKIMAGE_PHOTOS)]
    return {
        "textures": _random_crops(textures, num_per_set, rng),
        "faces": _faces(min(num_per_set, 100), rng),
        "photos": _random_crops(photos, num_per_set, rng),
    }


def match_intensity(images: Tensor, reference: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Give every image the pixel values of a random reference image, keeping only its own pixels' rank order.

    For image ``x`` and a reference ``r`` drawn uniformly (with replacement) from ``reference``, the output puts
    the ``j``-th smallest value of ``r`` where ``x`` has its ``j``-th smallest pixel (ties broken by position).
    The output's pixel multiset is exactly ``r``'s, so brightness, contrast and the value histogram match the
    ID data and only the spatial structure of ``x`` remains.

    Args:
        images: Images ``(N, C, H, W)`` to transform.
        reference: Reference images ``(M, C, H, W)`` of the same ``C, H, W`` (the ID training images).
        generator: Source of randomness for the choice of references.

    Returns:
        The transformed images ``(N, C, H, W)``, in ``reference``'s dtype.

    Raises:
        TypeError: An input is not a floating-point tensor.
        ValueError: The shapes disagree or ``reference`` is empty.
    """
    source = as_tensor(images, "images")
    pool = as_tensor(reference, "reference")
    check_rank(source, 4, "images", "(num_images, channels, height, width)")
    check_rank(pool, 4, "reference", "(num_images, channels, height, width)")
    check_floating(source, "images")
    check_floating(pool, "reference")
    if source.shape[1:] != pool.shape[1:]:
        raise ValueError(
            f"images have shape {tuple(source.shape[1:])} per image but reference has {tuple(pool.shape[1:])}"
        )
    if pool.shape[0] == 0:
        raise ValueError("reference is empty: at least one reference image is needed")
    chosen = torch.randint(pool.shape[0], (source.shape[0],), generator=generator)
    flat = source.flatten(1)
    values = pool.flatten(1)[chosen.to(pool.device)].sort(dim=1).values
    order = flat.argsort(dim=1, stable=True)
    matched = torch.empty_like(values).scatter_(1, order.to(values.device), values)
    return matched.view(source.shape[0], *pool.shape[1:])


def _grey(pixels: NDArray[np.float64]) -> NDArray[np.float64]:
    """ITU-R 601 luma of an ``(H, W, 3|4)`` array (alpha dropped)."""
    import numpy as np

    if pixels.shape[2] not in (3, 4):
        raise ValueError(f"a colour image must have 3 or 4 channels, got shape {pixels.shape}")
    return np.asarray(pixels[:, :, :3] @ np.array([0.299, 0.587, 0.114]), dtype=np.float64)


def _skimage_array(name: str) -> NDArray[np.float64]:
    """A bundled scikit-image data set as a float64 array (the left view for ``stereo_motorcycle``)."""
    import numpy as np
    import skimage.data

    loader: Callable[[], Any] = getattr(skimage.data, name)
    image = loader()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    return np.asarray(image, dtype=np.float64)


def _skimage(name: str) -> NDArray[np.float64]:
    """A bundled scikit-image photograph in grey."""
    pixels = _skimage_array(name)
    return _grey(pixels) if pixels.ndim == 3 else pixels


def _sklearn_photos() -> list[NDArray[np.float64]]:
    import numpy as np
    from sklearn.datasets import load_sample_images

    return [_grey(np.asarray(image, dtype=np.float64)) for image in load_sample_images().images]


def _random_crops(sources: Sequence[NDArray[np.float64]], count: int, rng: np.random.Generator) -> Tensor:
    crops: list[Tensor] = []
    for index in range(count):
        image = sources[index % len(sources)]
        side = min(int(rng.choice(_CROP_SIDES)), (min(image.shape) // _SIZE) * _SIZE)
        top = int(rng.integers(0, image.shape[0] - side + 1))
        left = int(rng.integers(0, image.shape[1] - side + 1))
        crops.append(to_digit_format(image[top : top + side, left : left + side]))
    return torch.stack(crops)


def _faces(count: int, rng: np.random.Generator) -> Tensor:
    # The first 100 images of the LFW subset are faces, the last 100 are not.
    faces = _skimage_array("lfw_subset")[:100]
    side = 24
    crops: list[Tensor] = []
    for face in faces[:count]:
        top, left = (int(v) for v in rng.integers(0, face.shape[0] - side + 1, size=2))
        crops.append(to_digit_format(face[top : top + side, left : left + side]))
    return torch.stack(crops)
