"""Loading the authors' released artefacts: files in their layouts are built here, on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dreamood import TokenEmbeddings
from dreamood.data import GeneratedImageFolder
from dreamood.errors import ArtifactError
from dreamood.models.resnet import ResNetFeatures, uses_small_stem
from dreamood.reference import (
    ReferenceImageFolder,
    convert_reference_state_dict,
    load_reference_classifier,
    load_reference_embeddings,
    load_reference_encoder,
    reference_resnet_depth,
)


class _AuthorsBlock(nn.Module):
    """The layout of the authors' BasicBlock (scripts/resnet.py): a projection shortcut named ``shortcut``."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _AuthorsResNet(nn.Module):
    """The authors' ResNet-18 encoder: 3x3 stride-1 stem, no max-pool, at every resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, planes = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_AuthorsBlock(planes, width, stride), _AuthorsBlock(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.avgpool(out), 1)


class _AuthorsModel(nn.Module):
    """``ResNet_Model``: ``encoder`` + ``trans`` (Phase 1, resnet_anchor.py) or ``encoder`` + ``fc`` (Phase 3)."""

    def __init__(self, head: str, outputs: int) -> None:
        super().__init__()
        self.encoder = _AuthorsResNet()
        self.head_name = head
        setattr(self, head, nn.Linear(512, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer: nn.Module = getattr(self, self.head_name)
        return layer(self.encoder(x))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics, so that a wrong mapping cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator) + 0.5 if "running_var" in name else None
                tensor.copy_(values if values is not None else torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def anchors() -> TokenEmbeddings:
    vectors = torch.randn(10, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    return TokenEmbeddings([f"class {i}" for i in range(10)], vectors)


@pytest.mark.parametrize("data_parallel", [False, True])
def test_phase1_checkpoint_loads_into_the_encoder(
    tmp_path: Path, anchors: TokenEmbeddings, data_parallel: bool
) -> None:
    theirs = _randomised(_AuthorsModel("trans", 768), 1)
    state = theirs.state_dict()
    if data_parallel:
        state = {"module." + key: value for key, value in state.items()}
    torch.save(state, tmp_path / "ckpt.pt")
    encoder = load_reference_encoder(tmp_path / "ckpt.pt", anchors)
    assert not encoder.training and isinstance(encoder.backbone, ResNetFeatures)
    assert encoder.backbone.small_input and encoder.backbone.depth == 18
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = F.normalize(theirs(images), dim=1)
        torch.testing.assert_close(encoder.embed(images), expected, rtol=1e-5, atol=1e-5)
        # Their cosine logits: normalised embedding against normalised anchors, over the temperature 0.1.
        logits = expected @ F.normalize(anchors.vectors, dim=1).T / 0.1
        torch.testing.assert_close(encoder(images), logits, rtol=1e-4, atol=1e-4)


def test_phase3_checkpoint_loads_into_the_classifier_at_224px(tmp_path: Path) -> None:
    theirs = _randomised(_AuthorsModel("fc", 101), 3)  # a K+1-class model (--add_class)
    torch.save({"module." + k: v for k, v in theirs.state_dict().items()}, tmp_path / "ckpt.pt")
    classifier = load_reference_classifier(tmp_path / "ckpt.pt")
    assert classifier.num_classes == 101
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), theirs(images), rtol=1e-4, atol=1e-4)
    # The 3x3 stem at any resolution: also what the stem option gives for ImageNet-100.
    assert uses_small_stem("3x3", 224) and not uses_small_stem("auto", 224) and uses_small_stem("auto", 32)
    assert not uses_small_stem("7x7", 32)
    with pytest.raises(ValueError, match="stem must be one of"):
        uses_small_stem("5x5", 32)


def test_checkpoint_errors(tmp_path: Path, anchors: TokenEmbeddings) -> None:
    theirs = _AuthorsModel("fc", 10)
    torch.save(theirs.state_dict(), tmp_path / "phase3.pt")
    with pytest.raises(ArtifactError, match="unexpected key 'fc.weight'"):
        load_reference_encoder(tmp_path / "phase3.pt", anchors)
    state = theirs.state_dict()
    del state["encoder.layer4.1.conv2.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ArtifactError, match="does not fit"):
        load_reference_classifier(tmp_path / "broken.pt")
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "tiny.pt")
    with pytest.raises(ArtifactError, match="none of ResNet-18, -34 or -50"):
        load_reference_classifier(tmp_path / "tiny.pt")
    with pytest.raises(FileNotFoundError):
        load_reference_classifier(tmp_path / "missing.pt")


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_depth_is_read_from_the_keys(depth: int) -> None:
    ours = ResNetFeatures(depth, small_input=True)
    # Back to the authors' names: encoder.* and shortcut instead of downsample.
    theirs = {("encoder." + k).replace(".downsample.", ".shortcut."): v for k, v in ours.state_dict().items()}
    theirs.update({"fc.weight": torch.zeros(3, ours.feature_dim), "fc.bias": torch.zeros(3)})
    assert reference_resnet_depth(theirs) == depth
    converted = convert_reference_state_dict(theirs, "fc")
    assert set(converted) == {"backbone." + k for k in ours.state_dict()} | {"head.weight", "head.bias"}


def test_embedding_npy_loads_as_samples(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    np.save(tmp_path / "outliers.npy", array)
    samples = load_reference_embeddings(tmp_path / "outliers.npy", class_names=["a", "b", "c"])
    assert samples.vectors.shape == (12, 8) and samples.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(samples.vectors[5], torch.from_numpy(array[1, 1]))
    assert samples.class_names == ["a", "b", "c"] and samples.config["kind"] == "outliers"
    np.save(tmp_path / "flat.npy", array.reshape(12, 8))
    with pytest.raises(ArtifactError, match=r"shape \(12, 8\)"):
        load_reference_embeddings(tmp_path / "flat.npy")
    with pytest.raises(ArtifactError, match="3 classes but 2 class names"):
        load_reference_embeddings(tmp_path / "outliers.npy", class_names=["a", "b"])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ArtifactError, match="cannot read"):
        load_reference_embeddings(tmp_path / "objects.npy")


@pytest.mark.parametrize("nested", [False, True])
def test_generated_folders_load_with_folder_index_labels(tmp_path: Path, nested: bool) -> None:
    root = tmp_path / "txt2img-samples"
    folder = root / "samples" if nested else root
    colours = {}
    for index in (0, 2, 10):  # ImageFolder's sorted order would label "10" before "2"
        (folder / str(index)).mkdir(parents=True)
        for count in range(2):
            colour = (index * 20, count * 100, 50)
            Image.new("RGB", (256, 256), colour).save(folder / str(index) / f"word_{index:03d}{count:05d}.png")
            colours[(index, count)] = colour
    (folder / "notes").mkdir()
    names = [f"class {i}" for i in range(11)]
    data = ReferenceImageFolder(root, class_names=names, image_size=32)
    assert isinstance(data, GeneratedImageFolder) and len(data) == 6
    assert data.targets == [0, 0, 2, 2, 10, 10]
    assert data.classes[10] == "class 10" and data.classes[1] == ""
    image, label = data[5]
    assert label == 10 and image.shape == (3, 32, 32)
    expected = torch.tensor(colours[(10, 1)], dtype=torch.float32) / 255
    torch.testing.assert_close(image[:, 0, 0], expected)
    with pytest.raises(ArtifactError, match="class 10 but only 5 class names"):
        ReferenceImageFolder(root, class_names=names[:5])
    with pytest.raises(FileNotFoundError, match="no images"):
        ReferenceImageFolder(tmp_path / "txt2img-samples" / ("samples" if nested else "") / "notes")
