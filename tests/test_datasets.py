"""Datasets, OOD test sets and the paper's transforms, on tiny fake folder trees."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamood.data.classes import IMAGENET1K_WNIDS, IMAGENET100_WNIDS
from dreamood.data.datasets import (
    ImageListDataset,
    ImageNet100,
    ImageNetA,
    ImageNetV2,
    cifar100,
    class_folder_dataset,
    find_images,
    link_imagenet_subset,
)
from dreamood.data.ood import CIFAR100_OOD_SETS, IMAGENET100_OOD_SETS, OODImageFolder, ood_test_sets
from dreamood.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar_test_transform,
    cifar_train_transform,
    get_transform,
    imagenet_test_transform,
    imagenet_train_transform,
)


def _image(path: Path, size: tuple[int, int] = (8, 8), seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)
    return path


def _random_pil(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# ---- transforms -------------------------------------------------------------------------------------------


def test_cifar_test_transform_is_the_normalised_image_in_float64() -> None:
    image = _random_pil(32, 32, seed=1)
    out = cifar_test_transform()(image)
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    expected = (pixels - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), expected, atol=1e-5)


def test_cifar_train_transform_is_a_window_of_the_zero_padded_image_maybe_flipped() -> None:
    image = _random_pil(32, 32, seed=2)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4))
    transform = cifar_train_transform(normalize=False)
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        out = transform(image)
        assert out.shape == (3, 32, 32)
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                padded[:, dy : dy + 32, dx : dx + 32].flip(-1) if flip else padded[:, dy : dy + 32, dx : dx + 32], out
            )
        ]
        assert matches, "the output is not a 32x32 window of the padded image"
        flips.update(flip for _, _, flip in matches)
    assert flips == {False, True}


def test_imagenet_test_transform_resizes_the_short_side_then_center_crops() -> None:
    image = _random_pil(400, 300, seed=3)
    out = imagenet_test_transform()(image)
    assert out.shape == (3, 224, 224)
    resized = image.resize((341, 256), Image.Resampling.BILINEAR)
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)
    crop = np.asarray(resized, dtype=np.float64)[top : top + 224, left : left + 224] / 255.0
    expected = (crop - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    # PIL's and torchvision's bilinear resizing agree up to one grey level.
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), expected, atol=1.5 / 255 / min(IMAGENET_STD))


def test_imagenet_train_transform_and_grey_images_give_three_channels() -> None:
    grey = Image.fromarray(np.zeros((300, 500), dtype=np.uint8), mode="L")
    assert imagenet_train_transform()(grey).shape == (3, 224, 224)
    assert get_transform("imagenet100", "test")(grey).shape == (3, 224, 224)
    assert get_transform("folder", "train", image_size=16)(grey).shape == (3, 16, 16)


def test_generated_cifar_images_are_resized_to_32_not_cropped() -> None:
    colour = (200, 30, 90)
    big = Image.new("RGB", (256, 256), colour)
    out = get_transform("cifar100", "generated", normalize=False)(big)
    assert out.shape == (3, 32, 32)
    # The random crop shifts by at most 4 pixels: the central 24x24 is the image's colour everywhere.
    centre = out[:, 4:28, 4:28]
    expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    assert torch.allclose(centre, expected.expand_as(centre), atol=1e-6)


def test_get_transform_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="benchmark"):
        get_transform("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        get_transform("cifar100", "val")
    with pytest.raises(ValueError, match="size must not exceed resize"):
        imagenet_test_transform(300, resize=256)


# ---- ImageNet-100 and its generalisation sets -------------------------------------------------------------


def _imagenet_tree(
    root: Path, wnids: list[str], per_class: int = 2, splits: tuple[str, ...] = ("train", "val")
) -> None:
    for split in splits:
        for index, wnid in enumerate(wnids):
            for j in range(per_class):
                _image(root / split / wnid / f"{wnid}_{j}.JPEG", seed=index * 10 + j)


def test_imagenet100_labels_follow_the_given_wnid_order_not_sorted_order(tmp_path: Path) -> None:
    wnids = [IMAGENET100_WNIDS[5], IMAGENET100_WNIDS[0], IMAGENET100_WNIDS[9]]
    _imagenet_tree(tmp_path, [*wnids, "n99999999"])  # a class folder outside the subset
    data = ImageNet100(tmp_path, "train", wnids=wnids)
    assert len(data) == 6
    assert data.classes == wnids
    for path, label in data.samples:
        assert Path(path).parent.name == wnids[label]
    assert all("n99999999" not in path for path, _ in data.samples)
    image, label = data[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert label == 0


def test_imagenet100_reads_the_paper_classes_in_the_paper_order(tmp_path: Path) -> None:
    _imagenet_tree(tmp_path, list(IMAGENET100_WNIDS), per_class=1, splits=("val",))
    data = ImageNet100(tmp_path, "val", transform=get_transform("imagenet100", "test"))
    assert len(data) == 100
    assert data.targets == list(range(100))
    assert [Path(p).parent.name for p, _ in data.samples] == list(IMAGENET100_WNIDS)
    assert data[3][0].shape == (3, 224, 224)


def test_imagenet100_errors_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        ImageNet100(tmp_path / "nowhere", "train")
    _imagenet_tree(tmp_path, list(IMAGENET100_WNIDS[:3]), per_class=1, splits=("train",))
    with pytest.raises(FileNotFoundError, match="97 class folder"):
        ImageNet100(tmp_path, "train")
    for j in range(3):  # the official flat val/ layout
        _image(tmp_path / "val" / f"ILSVRC2012_val_{j:08d}.JPEG")
    with pytest.raises(ValueError, match="directly instead of class folders"):
        ImageNet100(tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        ImageNet100(tmp_path, "test")
    (tmp_path / "train" / "n01234567").mkdir()
    with pytest.raises(ValueError, match="without images"):
        ImageNet100(tmp_path, "train", wnids=[IMAGENET100_WNIDS[0], "n01234567"])


def test_link_imagenet_subset_makes_links_not_copies(tmp_path: Path) -> None:
    source, target = tmp_path / "imagenet", tmp_path / "imagenet100"
    wnids = list(IMAGENET100_WNIDS[:3])
    _imagenet_tree(source, [*wnids, IMAGENET100_WNIDS[3]])
    link_imagenet_subset(source, target, wnids=wnids)
    link_imagenet_subset(source, target, wnids=wnids)  # idempotent
    for split in ("train", "val"):
        assert sorted(p.name for p in (target / split).iterdir()) == sorted(wnids)
        assert all((target / split / w).is_symlink() for w in wnids)
    original = ImageNet100(source, "train", wnids=wnids)
    linked = ImageNet100(target, "train", wnids=wnids)
    assert [Path(p).resolve() for p, _ in linked.samples] == [Path(p).resolve() for p, _ in original.samples]
    assert linked.targets == original.targets
    with pytest.raises(FileNotFoundError, match="missing"):
        link_imagenet_subset(source, tmp_path / "other", wnids=[*wnids, IMAGENET100_WNIDS[50]])


def test_imagenet_v2_maps_class_index_folders_through_the_sorted_wnids(tmp_path: Path) -> None:
    assert list(IMAGENET1K_WNIDS) == sorted(IMAGENET1K_WNIDS)
    wnids = [IMAGENET100_WNIDS[7], IMAGENET100_WNIDS[2]]
    sorted_wnids = sorted(IMAGENET1K_WNIDS)
    for wnid in [*wnids, IMAGENET100_WNIDS[4]]:
        folder = str(sorted_wnids.index(wnid))
        _image(tmp_path / folder / f"{wnid}.jpeg")
    data = ImageNetV2(tmp_path, wnids=wnids)
    assert len(data) == 2
    for path, label in data.samples:
        assert Path(path).stem == wnids[label]
    with pytest.raises(FileNotFoundError, match="class folder"):
        ImageNetV2(tmp_path, wnids=[IMAGENET100_WNIDS[10]])
    with pytest.raises(ValueError, match="not ImageNet-1k"):
        ImageNetV2(tmp_path, wnids=["n00000000"])
    with pytest.raises(FileNotFoundError, match="ImageNet-V2"):
        ImageNetV2(tmp_path / "missing")


def test_imagenet_a_keeps_the_shared_classes_with_subset_labels(tmp_path: Path) -> None:
    present = [IMAGENET100_WNIDS[1], IMAGENET100_WNIDS[40]]
    for wnid in [*present, "n09999999"]:
        _image(tmp_path / wnid / "a.jpg")
        _image(tmp_path / wnid / "b.jpg", seed=1)
    data = ImageNetA(tmp_path)
    assert data.present == present
    assert sorted(set(data.targets)) == [1, 40]
    assert len(data) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no folder for any"):
        ImageNetA(empty)


# ---- CIFAR-100 --------------------------------------------------------------------------------------------


def _fake_cifar(root: Path, n: int = 4) -> np.ndarray:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        batch = {"data": data, "fine_labels": list(range(n)), "coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return data


def test_cifar100_missing_gives_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/ holding the files train, test and meta"):
        cifar100(tmp_path)


def test_cifar100_failed_checksum_is_a_value_error(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    with pytest.raises(ValueError, match="corrupted or incomplete"):
        cifar100(tmp_path)


def test_cifar100_reads_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar

    data = _fake_cifar(tmp_path)
    # The fake files cannot match torchvision's MD5 checksums; everything else is torchvision's own reading.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        dataset = cifar100(root, train=False, transform=cifar_test_transform(normalize=False))
        assert len(dataset) == 4
        image, label = dataset[2]
        assert label == 2
        expected = torch.from_numpy(data[2].reshape(3, 32, 32).astype(np.float32) / 255)
        assert torch.allclose(image, expected)


# ---- OOD test sets ----------------------------------------------------------------------------------------


def _fake_cifar_ood_root(root: Path) -> None:
    from scipy.io import savemat

    _image(root / "dtd/images/banded/banded_0001.jpg", size=(40, 50))
    _image(root / "dtd/images/zigzagged/z_0002.jpg", size=(64, 48), mode="L")
    _image(root / "places365/a/airfield/1.jpg", size=(64, 64))
    _image(root / "LSUN_C/test/0.jpg", size=(32, 32))
    _image(root / "LSUN_C/test/1.jpg", size=(32, 32), seed=1)
    _image(root / "iSUN/iSUN_patches/x.png", size=(32, 32), mode="RGBA")
    svhn = root / "svhn"
    svhn.mkdir()
    rng = np.random.default_rng(0)
    savemat(svhn / "test_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8), "y": np.ones((3, 1))})


def test_cifar100_ood_sets_in_paper_order_with_the_test_transform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.svhn

    _fake_cifar_ood_root(tmp_path)
    with pytest.raises(ValueError, match="checksum"):
        ood_test_sets("cifar100", tmp_path, names=["SVHN"])
    # The fake .mat file cannot match torchvision's MD5 checksum; the reading itself is torchvision's.
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda path, md5=None: True)
    sets = ood_test_sets("cifar100", tmp_path, get_transform("cifar100", "test"))
    assert list(sets) == ["Textures", "SVHN", "Places365", "LSUN-C", "iSUN"] == [s.name for s in CIFAR100_OOD_SETS]
    assert [len(d) for d in sets.values()] == [2, 3, 1, 2, 1]
    for name, dataset in sets.items():
        image, label = dataset[0]
        assert image.shape == (3, 32, 32), name
        if name != "SVHN":
            assert label == -1


def test_ood_sets_errors_and_overrides(tmp_path: Path) -> None:
    _fake_cifar_ood_root(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'iNaturalist' not found.*iNaturalist/images"):
        ood_test_sets("imagenet100", tmp_path)
    with pytest.raises(ValueError, match="unknown OOD test set 'MNIST'"):
        ood_test_sets("cifar100", tmp_path, names=["MNIST"])
    with pytest.raises(FileNotFoundError, match="test_32x32.mat"):
        ood_test_sets("cifar100", tmp_path / "dtd", names=["SVHN"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file"):
        ood_test_sets("cifar100", tmp_path, names=["iSUN"], paths={"iSUN": "empty"})
    sets = ood_test_sets("imagenet100", None, paths={"Textures": tmp_path / "dtd" / "images"}, names=["Textures"])
    assert len(sets["Textures"]) == 2
    custom = ood_test_sets("folder", tmp_path, paths={"Noise": "LSUN_C"})
    assert list(custom) == ["Noise"] and len(custom["Noise"]) == 2
    assert [s.name for s in IMAGENET100_OOD_SETS] == ["iNaturalist", "SUN", "Places", "Textures"]


def test_ood_image_folder_finds_nested_images_and_skips_other_files(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "b" / "one.PNG")
    _image(tmp_path / "two.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    _image(tmp_path / ".hidden.jpg")
    dataset = OODImageFolder(tmp_path)
    assert [Path(p).name for p, _ in dataset.samples] == ["one.PNG", "two.jpg"]
    assert find_images(tmp_path, recursive=False) == [tmp_path / "two.jpg"]
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


def test_class_folder_dataset(tmp_path: Path) -> None:
    for name in ("dog", "cat"):
        for j in range(3):
            _image(tmp_path / name / f"{j}.png", seed=j)
    data = class_folder_dataset(tmp_path)
    assert data.classes == ["cat", "dog"]
    assert data.targets == [0, 0, 0, 1, 1, 1]
    ordered = class_folder_dataset(tmp_path, classes=["dog", "cat"])
    assert ordered.targets == [0, 0, 0, 1, 1, 1]
    assert all(Path(p).parent.name == "dog" for p, label in ordered.samples if label == 0)
    assert isinstance(ordered, ImageListDataset)
    with pytest.raises(FileNotFoundError, match="bird"):
        class_folder_dataset(tmp_path, classes=["bird"])
    with pytest.raises(FileNotFoundError, match="one sub-folder of images per class"):
        class_folder_dataset(tmp_path / "nothing")


# ---- views of one loaded set ------------------------------------------------------------------------------


def test_with_transform_shares_the_images_and_leaves_the_original_alone(tmp_path: Path) -> None:
    import torchvision.transforms as T

    from dreamood.data.datasets import with_transform

    paths = [_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    original = ImageListDataset([(p, i) for i, p in enumerate(paths)], T.PILToTensor(), classes=["a", "b", "c"])
    view = with_transform(original, None)
    assert type(view) is ImageListDataset and view.samples is original.samples and view.classes is original.classes
    image, label = view[1]
    assert isinstance(image, Image.Image) and label == 1
    assert torch.equal(original[1][0], torch.from_numpy(np.array(image)).permute(2, 0, 1))
    with pytest.raises(TypeError, match="'transform' attribute"):
        with_transform(torch.utils.data.TensorDataset(torch.zeros(2)), None)


def test_with_transform_of_a_torchvision_dataset_keeps_transforms_in_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.cifar
    from torchvision.datasets import VisionDataset

    from dreamood.data.datasets import with_transform

    _fake_cifar(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    dataset = cifar100(tmp_path, train=False, transform=cifar_test_transform())
    view = with_transform(dataset, None)
    assert view.data is dataset.data and view.targets is dataset.targets
    assert view.transforms is None and view.transform is None and dataset.transform is not None
    assert isinstance(view[0][0], Image.Image) and isinstance(dataset[0][0], torch.Tensor)
    labelled = with_transform(cifar100(tmp_path, train=False, transform=None), cifar_test_transform())
    assert labelled.transforms is not None and labelled.transforms.transform is labelled.transform
    joint = VisionDataset(str(tmp_path), transforms=lambda image, label: (image, label))
    with pytest.raises(ValueError, match="joint transforms"):
        with_transform(joint, None)


def test_build_data_reads_cifar100_once_per_split_with_unchanged_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets
    import torchvision.datasets.cifar

    from dreamood.config import load_config
    from dreamood.pipeline import build_data
    from dreamood.pipeline.data import _raw_transform

    _fake_cifar(tmp_path / "cifar", n=6)
    _fake_cifar_ood_root(tmp_path / "ood")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    loads: list[bool] = []

    class CountingCIFAR100(torchvision.datasets.CIFAR100):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            loads.append(self.train)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", CountingCIFAR100)
    config = load_config(
        "cifar100",
        {"data.root": str(tmp_path / "cifar"), "data.ood_root": str(tmp_path / "ood"), "data.ood_sets": ["LSUN-C"]},
    )
    data = build_data(config)
    assert sorted(loads) == [False, True]  # the training split once for its three views, the test split once
    assert data.bank.data is data.train.data and data.raw_train.data is data.train.data  # type: ignore[attr-defined,union-attr]

    # Each view reads as a dataset loaded on its own with that view's transform.
    transforms = {name: get_transform("cifar100", name) for name in ("train", "test")}
    expected = {
        "train": cifar100(tmp_path / "cifar", True, transforms["train"]),
        "bank": cifar100(tmp_path / "cifar", True, transforms["test"]),
        "raw_train": cifar100(tmp_path / "cifar", True, _raw_transform(config)),
        "test": cifar100(tmp_path / "cifar", False, transforms["test"]),
    }
    for name, reference in expected.items():
        view = getattr(data, name)
        assert len(view) == len(reference) == 6, name
        for index in range(len(view)):
            torch.manual_seed(index)  # the training augmentation draws from torch's generator
            image, label = view[index]
            torch.manual_seed(index)
            reference_image, reference_label = reference[index]
            assert label == reference_label, name
            if isinstance(image, torch.Tensor):
                assert torch.equal(image, reference_image), (name, index)
            else:
                assert np.array_equal(np.asarray(image), np.asarray(reference_image)), (name, index)
    assert isinstance(data.raw_train[0][0], Image.Image)  # type: ignore[index]
