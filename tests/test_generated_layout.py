"""Generated folders read the same by torchvision's ImageFolder and GeneratedImageFolder; old layouts stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import dreamood.decoding.generation as generation
from dreamood.data.generated import GeneratedImageFolder
from dreamood.decoding.generation import CLASSES_NAME, MANIFEST_NAME, class_folder_name, generate_images
from dreamood.errors import ArtifactError
from dreamood.sampling.samples import EmbeddingSamples

NAMES = [f"class {i}" for i in range(12)]


class ColourDecoder:
    """Paints every image of class ``y`` with grey level ``10 * y``, so a label can be read back from pixels."""

    embedding_dim = 2
    class_names = NAMES

    def decode(self, vectors: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
        return (labels.float() * 10 / 255).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _samples(per_class: int = 2) -> EmbeddingSamples:
    labels = torch.arange(12).repeat_interleave(per_class).flip(0)  # not in class order
    return EmbeddingSamples(torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0)), labels)


def _generate(out: Path) -> None:
    generate_images(ColourDecoder(), _samples(), out, batch_size=5, show_progress=False, writer_threads=0)


def test_class_folder_names_sort_in_class_order() -> None:
    assert class_folder_name(7, 12) == "007"
    assert class_folder_name(99, 100) == "099" and class_folder_name(999, 1000) == "999"
    assert class_folder_name(7, 1001) == "0007"
    for count in (2, 11, 12, 100, 101, 1001):
        names = [class_folder_name(i, count) for i in range(count)]
        assert sorted(names) == names
    with pytest.raises(ValueError, match=r"class_index must lie in \[0, 12\), got 12"):
        class_folder_name(12, 12)


def test_twelve_classes_imagefolder_labels_equal_ours(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    _generate(tmp_path)
    ours = GeneratedImageFolder(tmp_path)
    theirs = ImageFolder(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [f"{i:03d}" for i in range(12)]
    assert len(theirs) == len(ours) == 24
    assert [(Path(p), y) for p, y in theirs.samples] == ours.samples
    assert theirs.targets == ours.targets == [y for y in range(12) for _ in range(2)]
    # The label agrees with what the decoder painted, read back from the pixels.
    for image, label in theirs:
        assert np.asarray(image)[0, 0, 0] == 10 * label
    assert ours.classes == NAMES and ours.class_to_idx["class 11"] == 11
    assert json.loads((tmp_path / CLASSES_NAME).read_text()) == NAMES


def test_classes_json_names_classes_without_images(tmp_path: Path) -> None:
    samples = EmbeddingSamples(torch.zeros(2, 2), torch.tensor([3, 1]))
    generate_images(ColourDecoder(), samples, tmp_path, show_progress=False, writer_threads=0)
    dataset = GeneratedImageFolder(tmp_path)
    assert dataset.targets == [1, 3] and dataset.classes == NAMES
    (tmp_path / CLASSES_NAME).write_text('["a", "b"]')
    with pytest.raises(ArtifactError, match=r"classes.json names 2 classes but .* class_index up to 3"):
        GeneratedImageFolder(tmp_path)
    (tmp_path / CLASSES_NAME).write_text('{"a": 1}')
    with pytest.raises(ArtifactError, match="JSON list of class names"):
        GeneratedImageFolder(tmp_path)


def _legacy_folder(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder as earlier versions wrote it: class folders 0/ ... 11/, no classes.json."""
    with monkeypatch.context() as patch:
        patch.setattr(generation, "_legacy_layout", lambda root, count: True)
        _generate(out)
    (out / CLASSES_NAME).unlink()


def test_old_unpadded_folders_keep_their_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _legacy_folder(tmp_path, monkeypatch)
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {str(i) for i in range(12)}
    dataset = GeneratedImageFolder(tmp_path)
    assert dataset.targets == [y for y in range(12) for _ in range(2)]
    assert [path.parent.name for path, _ in dataset.samples] == [str(y) for y in dataset.targets]
    assert dataset.classes == NAMES
    for index in (0, 5, 23):
        image, label = dataset[index]
        assert round(float(image[0, 0, 0]) * 255) == 10 * label


def test_an_interrupted_old_generation_resumes_in_its_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _legacy_folder(tmp_path, monkeypatch)
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*.png")}
    (tmp_path / "10" / "000021.png").unlink()
    (tmp_path / MANIFEST_NAME).unlink()
    with caplog.at_level("WARNING", logger="dreamood"):
        generate_images(ColourDecoder(), _samples(), tmp_path, batch_size=5, show_progress=False, writer_threads=0)
    assert "unpadded layout" in caplog.text
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*.png")}
    assert after == before
    assert GeneratedImageFolder(tmp_path).targets == [y for y in range(12) for _ in range(2)]
