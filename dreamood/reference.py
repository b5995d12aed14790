"""Load the artefacts the DREAM-OOD authors released with their public code (github deeplearning-wisc/dream-ood).

- Phase 1 checkpoints (``ResNet_Model`` of their ``scripts/resnet_anchor.py``: ``encoder.*`` + ``trans.*``)
  into a :class:`~dreamood.encoder.TextConditionedEncoder`: :func:`load_reference_encoder`.
- Phase 3 and DREAM-ID checkpoints (``ResNet_Model`` of their ``scripts/resnet.py``: ``encoder.*`` + ``fc.*``)
  into a :class:`~dreamood.models.Classifier`: :func:`load_reference_classifier`.
- Sampled outlier or inlier embeddings (``.npy`` of shape ``(num_classes, num_per_class, 768)``, already rescaled
  to ``||T(y)||``) into :class:`~dreamood.sampling.EmbeddingSamples`: :func:`load_reference_embeddings`.
- Generated image folders (one sub-folder per class index, ``<root>/<class index>/<word>_<count>.png``) as a
  :class:`~dreamood.data.GeneratedImageFolder`: :class:`ReferenceImageFolder`.

Their checkpoints are plain ``state_dict`` files, saved from ``torch.nn.DataParallel`` (keys prefixed with
``module.``) or not; both are read with ``weights_only=True``. Their ResNets always use the 3x3 stride-1 stem
without max-pool, also at 224 px on ImageNet-100, and name a block's projection shortcut ``shortcut`` where
torchvision says ``downsample``; the depth (18, 34 or 50) is read from the keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreamood.anchors import TokenEmbeddings
from dreamood.data.generated import GeneratedImageFolder
from dreamood.encoder import TextConditionedEncoder
from dreamood.errors import ArtifactError
from dreamood.io import load_checkpoint
from dreamood.models.classifier import Classifier
from dreamood.models.resnet import ResNetFeatures
from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "ReferenceImageFolder",
    "convert_reference_state_dict",
    "load_reference_classifier",
    "load_reference_embeddings",
    "load_reference_encoder",
    "reference_resnet_depth",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def convert_reference_state_dict(state: Mapping[str, Tensor], head: str) -> dict[str, Tensor]:
    """Rename the keys of one of the authors' ``ResNet_Model`` state dicts to dreamood's names.

    ``module.`` (DataParallel) is dropped, ``encoder.`` becomes ``backbone.``, ``shortcut.`` becomes
    ``downsample.``, and the head's prefix (``trans.`` of Phase 1, ``fc.`` of Phase 3) becomes ``head``.

    Args:
        state: The authors' state dict.
        head: ``"trans"`` (Phase 1 projection to 768, dreamood's ``projection``) or ``"fc"`` (Phase 3 linear
            classifier, dreamood's ``head``).

    Returns:
        The renamed state dict (same tensors).

    Raises:
        ArtifactError: A key is neither of the backbone nor of the expected head, or the head is missing.
    """
    if head not in ("trans", "fc"):
        raise ValueError(f"head must be 'trans' or 'fc', got {head!r}")
    target_head = "projection" if head == "trans" else "head"
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name.startswith("encoder."):
            converted["backbone." + name.removeprefix("encoder.").replace(".shortcut.", ".downsample.")] = value
        elif name.startswith(head + "."):
            converted[target_head + name.removeprefix(head)] = value
        else:
            expected = "encoder.* and trans.* (Phase 1)" if head == "trans" else "encoder.* and fc.* (Phase 3)"
            raise ArtifactError(f"unexpected key {key!r} in the authors' checkpoint: expected {expected}")
    for suffix in ("weight", "bias"):
        if f"{target_head}.{suffix}" not in converted:
            raise ArtifactError(f"the authors' checkpoint has no {head}.{suffix}: it is not a {head!r} model")
    return converted


def reference_resnet_depth(state: Mapping[str, Tensor]) -> int:
    """Depth (18, 34 or 50) of the ResNet whose (converted or original) state dict is ``state``.

    Raises:
        ArtifactError: The keys match none of the three.
    """
    blocks: dict[str, set[int]] = {}
    bottleneck = False
    for key in state:
        match = re.search(r"(layer[1-4])\.(\d+)\.", key)
        if match:
            blocks.setdefault(match.group(1), set()).add(int(match.group(2)))
            bottleneck = bottleneck or ".conv3." in key
    counts = tuple(len(blocks.get(f"layer{i}", ())) for i in range(1, 5))
    depths: dict[tuple[bool, tuple[int, ...]], int] = {
        (False, (2, 2, 2, 2)): 18,
        (False, (3, 4, 6, 3)): 34,
        (True, (3, 4, 6, 3)): 50,
    }
    depth = depths.get((bottleneck, counts))
    if depth is None:
        raise ArtifactError(
            f"the checkpoint's ResNet has {counts} blocks per stage ({'bottleneck' if bottleneck else 'basic'} "
            "blocks), which is none of ResNet-18, -34 or -50"
        )
    return depth


def _load_state(path: str | os.PathLike[str], map_location: str | torch.device) -> dict[str, Tensor]:
    state = load_checkpoint(path, map_location=map_location)
    # Some training scripts wrap the weights; the authors' files are the bare state dict.
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = dict(state["state_dict"])
    bad = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if bad:
        raise ArtifactError(f"checkpoint {path} is not a state dict: entry {bad[0]!r} is not a tensor")
    return state


def _load_strict(module: torch.nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ArtifactError(f"the authors' checkpoint {path} does not fit: {error}") from error


def load_reference_encoder(
    path: str | os.PathLike[str],
    anchors: TokenEmbeddings | Tensor,
    *,
    temperature: float = 0.1,
    map_location: str | torch.device = "cpu",
) -> TextConditionedEncoder:
    """Load one of the authors' Phase 1 checkpoints into a :class:`~dreamood.encoder.TextConditionedEncoder`.

    Args:
        path: The ``.pt`` file (a state dict with ``encoder.*`` and ``trans.*`` keys, with or without
            ``module.``).
        anchors: The class anchors the encoder was trained against (their anchors are the rows of
            ``token_embed_c100.npy`` / ``token_embed_in100.npy``; dreamood's reference configurations build the
            same ones with ``TokenEmbeddings.from_pretrained(..., "first", words=injection_words)``).
        temperature: The temperature of the cosine logits (0.1 in their code).
        map_location: Where the tensors are loaded.

    Returns:
        The encoder, in eval mode, with a 3x3-stem ResNet backbone of the checkpoint's depth.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ArtifactError: The file cannot be loaded with ``weights_only=True`` or its keys or shapes do not fit.
    """
    state = convert_reference_state_dict(_load_state(path, map_location), "trans")
    backbone = ResNetFeatures(reference_resnet_depth(state), small_input=True)
    encoder = TextConditionedEncoder(backbone, backbone.feature_dim, anchors, temperature)
    width = tuple(state["projection.weight"].shape)
    if width != tuple(encoder.projection.weight.shape):
        raise ArtifactError(
            f"the checkpoint's projection has shape {width} but the anchors need "
            f"{tuple(encoder.projection.weight.shape)}"
        )
    state["anchors"] = encoder.anchors
    _load_strict(encoder, state, path)
    return encoder.eval()


def load_reference_classifier(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Classifier:
    """Load one of the authors' Phase 3 (or DREAM-ID, or K+1-class) checkpoints into a :class:`Classifier`.

    The number of classes is read from ``fc.weight`` (101 for their ``--add_class`` models: the last output
    is the outlier class, see :func:`~dreamood.evaluation.outlier_class_score`).

    Args:
        path: The ``.pt`` file (a state dict with ``encoder.*`` and ``fc.*`` keys, with or without ``module.``).
        map_location: Where the tensors are loaded.

    Returns:
        The classifier, in eval mode, with a 3x3-stem ResNet backbone of the checkpoint's depth.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ArtifactError: The file cannot be loaded with ``weights_only=True`` or its keys or shapes do not fit.
    """
    state = convert_reference_state_dict(_load_state(path, map_location), "fc")
    backbone = ResNetFeatures(reference_resnet_depth(state), small_input=True)
    num_classes, width = (int(size) for size in state["head.weight"].shape)
    if width != backbone.feature_dim:
        raise ArtifactError(
            f"the checkpoint's fc layer takes {width} features but its ResNet gives {backbone.feature_dim}"
        )
    classifier = Classifier(backbone, num_classes)
    _load_strict(classifier, state, path)
    return classifier.eval()


def load_reference_embeddings(
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    kind: str = "outliers",
) -> EmbeddingSamples:
    """Load the authors' sampled embeddings (``.npy``, ``(num_classes, num_per_class, m)``) as EmbeddingSamples.

    Row ``i`` of class ``c`` becomes row ``c * num_per_class + i`` with label ``c``. Their vectors are already
    rescaled to the norm of the class anchor, as dreamood's sampler output is after ``rescale``. The file is
    read with ``allow_pickle=False``.

    Args:
        path: The ``.npy`` file (e.g. their ``cifar100_outlier_npos_embed_noise_0.07_select_50_KNN_300.npy``).
        class_names: Names of the classes, when known (checked against the first dimension).
        kind: ``"outliers"`` or ``"inliers"``, recorded in the provenance.

    Returns:
        The samples (float32), without anchor indices or k-NN distances (the files do not hold them).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ArtifactError: The file is not a 3-D floating-point array, or the number of classes disagrees.
    """
    import numpy as np

    if kind not in ("outliers", "inliers"):
        raise ValueError(f"kind must be 'outliers' or 'inliers', got {kind!r}")
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"embedding file not found: {target}")
    try:
        array = np.load(target, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ArtifactError(f"cannot read {target} as a .npy array: {error}") from error
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ArtifactError(
            f"{target} holds a {array.dtype} array of shape {array.shape}; the authors' embeddings are a floating-"
            "point array of shape (num_classes, num_per_class, embedding_dim)"
        )
    classes, per_class, dim = (int(size) for size in array.shape)
    if class_names is not None and len(class_names) != classes:
        raise ArtifactError(f"{target} holds {classes} classes but {len(class_names)} class names were given")
    vectors = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(classes * per_class, dim)
    labels = torch.arange(classes).repeat_interleave(per_class)
    config = {"source": "deeplearning-wisc/dream-ood", "file": target.name, "kind": kind, "per_class": per_class}
    return EmbeddingSamples(vectors, labels, config=config, class_names=class_names)


class ReferenceImageFolder(GeneratedImageFolder):
    """One of the authors' generated image folders, read as a :class:`~dreamood.data.GeneratedImageFolder`.

    Their generation script writes ``<root>/<class index>/<word>_<count>.png`` (their ImageNet-100 folders
    hold these class folders under ``samples/``, which is looked into when ``root`` has no class folders). The
    label of an image is the integer name of its folder, *not* the position of the folder in sorted order
    (``torchvision.datasets.ImageFolder`` would put ``"10"`` before ``"2"``). Images are listed in class order,
    then by file name. Nothing is written into ``root``.

    Args:
        root: The folder holding the class-index folders (or their ``samples/`` parent).
        class_names: Names of the classes, indexed by label (recorded in ``classes``); optional.
        image_size: Resize every image, e.g. to the ID resolution (their CIFAR-100 code crops 256 px images to
            32 px instead, see the "Differences from the reference code" page).
        transform: Optional callable applied to the PIL image.
        mode: ``"RGB"`` or ``"L"``.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no class-index folder with images.
        ArtifactError: A folder index is not below ``len(class_names)``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        class_names: Sequence[str] | None = None,
        image_size: int | Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
        mode: str = "RGB",
    ) -> None:
        from dreamood._validation import check_choice, check_size_pair

        check_choice(mode, ("RGB", "L"), "mode")
        folder = Path(root)
        if not folder.is_dir():
            raise FileNotFoundError(f"generated image folder not found: {folder}")
        if not _class_folders(folder) and (folder / "samples").is_dir():
            folder = folder / "samples"
        classes = _class_folders(folder)
        records: list[dict[str, Any]] = []
        for index, class_folder in classes:
            if class_names is not None and index >= len(class_names):
                raise ArtifactError(
                    f"{class_folder} is class {index} but only {len(class_names)} class names were given"
                )
            for image in sorted(p for p in class_folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
                record: dict[str, Any] = {"path": f"{class_folder.name}/{image.name}", "class_index": index}
                if class_names is not None:
                    record["class_name"] = class_names[index]
                records.append(record)
        if not records:
            raise FileNotFoundError(
                f"no images in class-index folders under {Path(root)} (expected <root>/<class index>/*.png, as the "
                "authors' generation script writes them)"
            )
        self.root = folder
        self.image_size = None if image_size is None else check_size_pair(image_size, "image_size")
        self.transform = transform
        self.mode = mode
        self.records = records
        self.samples = [(folder / r["path"], int(r["class_index"])) for r in records]
        self.targets = [label for _, label in self.samples]
        count = len(class_names) if class_names is not None else max(self.targets) + 1
        self.classes = [""] * count
        for record in records:
            self.classes[int(record["class_index"])] = str(record.get("class_name", ""))

    def __repr__(self) -> str:
        return f"ReferenceImageFolder(root={str(self.root)!r}, num_images={len(self)}, mode={self.mode!r})"


def _class_folders(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found)
