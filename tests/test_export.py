"""export_generated (ImageFolder tree, OpenOOD image list) and outlier_dataset (pytorch-ood targets)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from dreamood.data.export import export_generated, outlier_dataset
from dreamood.data.generated import GeneratedImageFolder
from dreamood.decoding.generation import generate_images
from dreamood.sampling.samples import EmbeddingSamples

NAMES = ["apple", "aquarium fish", "baby/child", *[f"c{i}" for i in range(3, 12)]]


class ColourDecoder:
    """Paints every image of class ``y`` with grey level ``10 * y``."""

    embedding_dim = 2
    class_names = NAMES

    def decode(self, vectors: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
        return (labels.float() * 10 / 255).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone()


@pytest.fixture
def generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    labels = torch.arange(12).repeat_interleave(2)
    samples = EmbeddingSamples(torch.zeros(len(labels), 2), labels)
    generate_images(ColourDecoder(), samples, tmp_path / "gen", show_progress=False, writer_threads=0)
    return tmp_path / "gen"


def _grey(path: Path) -> int:
    with Image.open(path) as image:
        return int(np.asarray(image.convert("RGB"))[0, 0, 0])


def test_imagefolder_tree_has_names_and_the_same_labels(generated: Path, tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    result = export_generated(generated, tmp_path / "tree")
    assert result.num_images == 24 and result.imglist is None
    dataset = ImageFolder(str(tmp_path / "tree"))
    assert dataset.classes[:3] == ["000_apple", "001_aquarium_fish", "002_baby_child"]
    assert dataset.classes[11] == "011_c11"
    assert dataset.targets == GeneratedImageFolder(generated).targets
    for path, label in dataset.samples:
        assert _grey(Path(path)) == 10 * label
    assert json.loads((tmp_path / "tree" / "classes.json").read_text()) == NAMES
    assert not (tmp_path / "tree" / "imglist.txt").exists()


def _read_openood_list(data_dir: Path, imglist: Path) -> list[tuple[Path, int]]:
    """What OpenOOD's ImglistDataset does with each line: split at the first space, join data_dir, int label."""
    rows = []
    for line in imglist.read_text().splitlines():
        name, extra = line.strip("\n").split(" ", 1)
        assert not name.startswith("/")
        rows.append((Path(os.path.join(data_dir, name)), int(extra)))
    return rows


def test_openood_list_marks_outliers_with_minus_one(generated: Path, tmp_path: Path) -> None:
    result = export_generated(generated, tmp_path / "ood", "openood")
    assert result.imglist == tmp_path / "ood" / "imglist.txt"
    rows = _read_openood_list(tmp_path / "ood", result.imglist)
    assert len(rows) == 24 and {label for _, label in rows} == {-1}
    for path, _ in rows:
        assert path.is_file()
    # The folder of each line still tells its class: its grey level.
    assert [_grey(path) // 10 for path, _ in rows] == [y for y in range(12) for _ in range(2)]


def test_openood_list_with_class_labels_for_inliers(generated: Path, tmp_path: Path) -> None:
    result = export_generated(generated, tmp_path / "id", "openood", labels="class")
    assert result.imglist is not None
    for path, label in _read_openood_list(tmp_path / "id", result.imglist):
        assert _grey(path) == 10 * label


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_links_point_at_the_same_images(generated: Path, tmp_path: Path, link: str) -> None:
    export_generated(generated, tmp_path / link, link=link)
    files = sorted((tmp_path / link).rglob("*.png"))
    assert len(files) == 24
    assert all(f.is_symlink() for f in files) is (link == "symlink")
    originals = {p.name: p.read_bytes() for p in generated.rglob("*.png")}
    assert all(f.read_bytes() == originals[f.name] for f in files)


def test_resized_export(generated: Path, tmp_path: Path) -> None:
    export_generated(GeneratedImageFolder(generated), tmp_path / "small", image_size=4)
    with Image.open(next((tmp_path / "small").rglob("*.png"))) as image:
        assert image.size == (4, 4)
    with pytest.raises(ValueError, match="link must be 'copy'"):
        export_generated(generated, tmp_path / "x", image_size=4, link="symlink")


def test_bad_exports_are_refused(generated: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        export_generated(generated, tmp_path / "a", "coco")
    with pytest.raises(ValueError, match="labels must be one of"):
        export_generated(generated, tmp_path / "a", labels="none")
    with pytest.raises(ValueError, match="inside the generated folder"):
        export_generated(generated, generated / "export")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_generated(generated, tmp_path / "busy")
    export_generated(generated, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").exists()
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        export_generated(tmp_path / "busy", tmp_path / "b")


def test_outlier_dataset_has_negative_targets(generated: Path) -> None:
    dataset = outlier_dataset(generated, transform=lambda image: torch.tensor(np.asarray(image)[0, 0, 0]))
    assert len(dataset) == 24 and set(dataset.targets) == {-1}
    value, target = dataset[5]
    assert target == -1 and int(value) == 10 * 2
    assert dataset.classes == NAMES
    with pytest.raises(ValueError, match="negative integer"):
        outlier_dataset(generated, label=0)


def test_cli_export_writes_the_openood_list(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dreamood.cli import main

    code = main(["export", str(generated), str(tmp_path / "cli"), "--format", "openood", "--image-size", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wrote 24 images in 12 class folders" in out and "imglist.txt" in out
    rows = _read_openood_list(tmp_path / "cli", tmp_path / "cli" / "imglist.txt")
    assert len(rows) == 24 and all(label == -1 and path.is_file() for path, label in rows)
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
    assert "no manifest.jsonl" in capsys.readouterr().err
