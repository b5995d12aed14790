"""DREAM-ID's augmentation baselines: torchvision settings, the appended pool and the per-batch loader (seeded,
CutMix labels consistent with the pasted area), the soft-label loop, DeepAugment folders, generic-prompt images,
rotation shift and accuracy."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from dreamood.baselines import (
    AugmentedLoader,
    AugmentedPool,
    augment_image,
    augmentation_transform,
    classification_accuracy,
    deepaugment_dataset,
    generate_generic_prompt_images,
    rotate_images,
    soft_cross_entropy,
    train_supervised,
)
from dreamood.data.generated import GeneratedImageFolder
from dreamood.decoding.generation import image_seed
from dreamood.decoding.stable_diffusion import StableDiffusionDecoder
from dreamood.models import Classifier, SmallConvNet
from dreamood.training import TrainingConfig, train_classifier


def _digits(n: int = 12, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 17, (n, 1, 8, 8), generator=generator).float() / 16
    return images, torch.arange(n) % classes


def _constant_images(n: int) -> Tensor:
    """Image k is flat with value (k + 1) / (n + 1), so every pixel tells which image it came from."""
    return (torch.arange(n, dtype=torch.float32) + 1).div(n + 1).view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()


def test_torchvision_transforms_with_the_paper_settings() -> None:
    randaugment = augmentation_transform("randaugment")
    autoaugment = augmentation_transform("autoaugment")
    augmix = augmentation_transform("augmix")
    assert isinstance(randaugment, transforms.RandAugment)
    assert (randaugment.num_ops, randaugment.magnitude) == (2, 9)
    assert isinstance(autoaugment, transforms.AutoAugment)
    assert autoaugment.policy == transforms.AutoAugmentPolicy.IMAGENET
    assert isinstance(augmix, transforms.AugMix)
    assert (augmix.mixture_width, augmix.alpha) == (3, 1.0)
    with pytest.raises(ValueError, match="name"):
        augmentation_transform("cutmix")


@pytest.mark.parametrize("name", ["randaugment", "autoaugment", "augmix"])
def test_augment_image_runs_torchvision_on_quantised_pixels(name: str) -> None:
    image = _digits(1)[0][0]
    transform = augmentation_transform(name)
    torch.manual_seed(11)
    got = augment_image(image, transform)
    torch.manual_seed(11)
    expected = transform((image * 255).round().to(torch.uint8)).float() / 255
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32 and got.shape == image.shape
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment_image(image * 3 - 1, transform)


def test_pool_balances_classes_and_reproduces_each_item_from_its_seed() -> None:
    images, labels = _digits(10, classes=3)  # class sizes 4, 3, 3
    dataset = TensorDataset(images, labels)
    pool = AugmentedPool(dataset, "randaugment", num_per_class=5, seed=3)
    assert len(pool) == 15
    for label in range(3):
        block = pool.sources[label * 5 : label * 5 + 5]
        members = set((labels == label).nonzero().squeeze(1).tolist())
        assert set(block.tolist()) == members  # every image of the class before any repeats
        assert all(pool[label * 5 + i][1] == label for i in range(5))
    transform = augmentation_transform("randaugment")
    for index in (0, 7, 14):
        torch.manual_seed(int(pool.seeds[index]))
        expected = augment_image(images[int(pool.sources[index])], transform)
        torch.testing.assert_close(pool[index][0], expected)
        torch.testing.assert_close(pool[index][0], pool[index][0])
    again = AugmentedPool(dataset, "randaugment", num_per_class=5, seed=3)
    assert torch.equal(again.sources, pool.sources) and torch.equal(again[9][0], pool[9][0])
    with pytest.raises(ValueError, match="class 3 has no image"):
        AugmentedPool(dataset, "augmix", num_per_class=2, num_classes=4)
    with pytest.raises(TypeError, match="labels"):
        AugmentedPool([images[0]], "augmix", num_per_class=2)  # type: ignore[arg-type]


def test_cutmix_pool_labels_match_the_pasted_area() -> None:
    n, classes = 9, 3
    images = _constant_images(n)
    labels = torch.arange(n) % classes
    pool = AugmentedPool(TensorDataset(images, labels), "cutmix", num_per_class=6, seed=5)
    assert pool.partners is not None
    mixed_somewhere = False
    for index in range(len(pool)):
        image, target = pool[index]
        source, partner = int(pool.sources[index]), int(pool.partners[index])
        assert target.shape == (classes,) and float(target.sum()) == pytest.approx(1.0)
        from_partner = float((image == images[partner]).float().mean())
        from_source = float((image == images[source]).float().mean())
        if source != partner:
            assert from_source + from_partner == pytest.approx(1.0)
        expected = torch.zeros(classes, dtype=torch.float64)
        expected[int(labels[source])] += 1.0 - from_partner if source != partner else 1.0
        expected[int(labels[partner])] += from_partner if source != partner else 0.0
        torch.testing.assert_close(target.double(), expected, atol=1e-6, rtol=0)
        mixed_somewhere |= 0 < from_partner < 1
    assert mixed_somewhere


def test_loader_augments_each_epoch_anew_and_reproducibly() -> None:
    images, labels = _digits(8)
    base = DataLoader(TensorDataset(images, labels), batch_size=4)
    loader = AugmentedLoader(base, "augmix", seed=1)
    first, second = list(loader), list(loader)
    assert len(loader) == 2 and loader.epoch == 2
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, second))  # labels kept
    assert not torch.equal(first[0][0], second[0][0])
    loader.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, list(loader)))
    assert torch.equal(list(AugmentedLoader(base, "augmix", seed=1))[1][0], first[1][0])


def test_cutmix_loader_mixes_each_image_with_the_previous_one() -> None:
    images = _constant_images(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ((mixed, target),) = list(
        AugmentedLoader(DataLoader(TensorDataset(images, labels), batch_size=6), "cutmix", num_classes=3)
    )
    assert target.shape == (6, 3)
    for i in range(6):
        from_previous = float((mixed[i] == images[i - 1]).float().mean())
        assert from_previous + float((mixed[i] == images[i]).float().mean()) == pytest.approx(1.0)
        expected = torch.zeros(3)
        expected[int(labels[i])] += 1 - from_previous
        expected[int(labels[i - 1])] += from_previous
        torch.testing.assert_close(target[i], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_classes"):
        AugmentedLoader(DataLoader(TensorDataset(images, labels)), "cutmix")


def test_soft_cross_entropy_matches_float64() -> None:
    logits = torch.randn(4, 3, dtype=torch.float64)
    targets = torch.softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    log_p = logits.numpy() - np.log(np.exp(logits.numpy()).sum(axis=1, keepdims=True))
    assert float(soft_cross_entropy(logits, targets)) == pytest.approx(float(-(targets.numpy() * log_p).sum(1).mean()))
    hard = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(
        soft_cross_entropy(logits, hard), soft_cross_entropy(logits, torch.eye(3)[hard].double())
    )
    with pytest.raises(ValueError, match="distributions"):
        soft_cross_entropy(logits, targets * 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        soft_cross_entropy(logits, torch.tensor([0, 3, 1, 1]))


def test_train_supervised_step_on_real_and_mixed_labels_is_exact() -> None:
    torch.manual_seed(2)
    model = Classifier(SmallConvNet(1, 8, width=4, seed=2), 3)
    images, labels = _digits(6)
    extra = torch.rand(4, 1, 8, 8)
    extra_targets = torch.softmax(torch.randn(4, 3), dim=1)
    reference = copy.deepcopy(model).train()
    logits = reference(torch.cat([images, extra]))
    loss = (
        nn.functional.cross_entropy(logits[:6], labels, reduction="sum")
        - (extra_targets * torch.log_softmax(logits[6:], dim=1)).sum()
    ) / 10
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    result = train_supervised(
        model,
        DataLoader(TensorDataset(images, labels), batch_size=6),
        TrainingConfig(epochs=1, lr=0.05, momentum=0.0, nesterov=False, weight_decay=0.0),
        synthetic_id_loader=DataLoader(TensorDataset(extra, extra_targets), batch_size=4),
        device="cpu",
        progress=False,
    )
    assert result.final.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    assert result.final.accuracy == pytest.approx(float((logits[:6].argmax(1) == labels).float().mean()))
    for after, start, grad in zip(model.parameters(), before, grads):
        torch.testing.assert_close(after.detach(), start - 0.05 * grad, rtol=1e-5, atol=1e-6)


def test_train_supervised_writes_checkpoints_and_resumes(tmp_path: Path) -> None:
    # The shared loop's options now apply: a finished run in output_dir resumes to the same weights and history.
    images, labels = _digits(8)
    mixed = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=1)

    def run(seed: int) -> tuple[nn.Module, Any]:
        model = Classifier(SmallConvNet(1, 8, width=4, seed=seed), 3)
        result = train_supervised(
            model,
            DataLoader(TensorDataset(images, labels), batch_size=4),
            TrainingConfig(epochs=2),
            synthetic_id_loader=DataLoader(TensorDataset(torch.rand(4, 1, 8, 8), mixed), batch_size=2),
            output_dir=tmp_path,
            resume=True,
            device="cpu",
            progress=False,
        )
        return model, result

    first_model, first = run(seed=0)
    assert first.checkpoint_path == tmp_path / "checkpoint.pt" and first.checkpoint_path.is_file()
    assert (tmp_path / "metrics.json").is_file()
    again_model, again = run(seed=7)  # loads the finished checkpoint, trains nothing
    assert again.history == first.history
    for a, b in zip(first_model.state_dict().values(), again_model.state_dict().values()):
        assert torch.equal(a, b)


def test_cosine_schedule_of_train_supervised() -> None:
    images, labels = _digits(8)
    result = train_supervised(
        Classifier(SmallConvNet(1, 8, width=4, seed=0), 3),
        DataLoader(TensorDataset(images, labels), batch_size=2),
        TrainingConfig(epochs=2, lr=0.1, min_lr=0.01),
        device="cpu",
        progress=False,
    )
    # Epoch e records the rate of its last step t = 4e + 3 of T = 8.
    for epoch, record in enumerate(result.history):
        t = 4 * epoch + 3
        assert record.lr == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * t / 8)))


def test_pools_plug_into_the_training_loops() -> None:
    images, labels = _digits(12)
    id_loader = DataLoader(TensorDataset(images, labels), batch_size=6)
    pool = AugmentedPool(TensorDataset(images, labels), "autoaugment", num_per_class=2, seed=0)
    result = train_classifier(
        Classifier(SmallConvNet(1, 8, width=4, seed=0), 3),
        id_loader,
        TrainingConfig(epochs=1),
        synthetic_id_loader=DataLoader(pool, batch_size=3),
        device="cpu",
        progress=False,
    )
    assert result.final.steps == 2
    cutmix = AugmentedPool(TensorDataset(images, labels), "cutmix", num_per_class=2, seed=0)
    result = train_supervised(
        Classifier(SmallConvNet(1, 8, width=4, seed=0), 3),
        AugmentedLoader(id_loader, "cutmix", num_classes=3),
        TrainingConfig(epochs=1),
        synthetic_id_loader=DataLoader(cutmix, batch_size=3),
        device="cpu",
        progress=False,
    )
    assert math.isfinite(result.final.loss)


def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


def test_deepaugment_folders_and_manifest(tmp_path: Path) -> None:
    classes = ["zebra", "ant"]  # label order differs from the sorted folder order
    _write_png(tmp_path / "zebra" / "a.png", 10)
    _write_png(tmp_path / "ant" / "b.png", 20)
    _write_png(tmp_path / "ant" / "c.png", 30)
    dataset = deepaugment_dataset(tmp_path, classes)
    assert sorted((Path(p).name, label) for p, label in dataset.samples) == [("a.png", 0), ("b.png", 1), ("c.png", 1)]
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nzebra/a.png,ant\nant/b.png,0\n")
    dataset = deepaugment_dataset(tmp_path, classes, manifest=manifest, transform=transforms.PILToTensor())
    assert [label for _, label in dataset.samples] == [1, 0]
    image, label = dataset[0]
    assert label == 1 and int(image[0, 0, 0]) == 10
    for text, error in [
        ("file,label\nzebra/a.png,0\n", ValueError),
        ("path,label\nzebra/a.png,lion\n", ValueError),
        ("path,label\nzebra/a.png,2\n", ValueError),
        ("path,label\nzebra/missing.png,0\n", FileNotFoundError),
    ]:
        manifest.write_text(text)
        with pytest.raises(error):
            deepaugment_dataset(tmp_path, classes, manifest=manifest)
    with pytest.raises(FileNotFoundError):
        deepaugment_dataset(tmp_path, ["zebra", "lion"])


class FakePromptDecoder:
    """Renders a prompt as noise drawn from its seed, and records the calls."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = list(names)
        self.calls: list[tuple[list[str], list[int]]] = []

    @property
    def class_names(self) -> list[str]:
        return self._names

    @property
    def prompts(self) -> list[str]:
        return [f"A high-quality photo of a {name}" for name in self._names]

    @staticmethod
    def render(seed: int) -> Tensor:
        return torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))

    def decode_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        self.calls.append((list(prompts), list(seeds)))
        return torch.stack([self.render(seed) for seed in seeds])


def test_generic_prompt_images_through_generate_images(tmp_path: Path) -> None:
    decoder = FakePromptDecoder(["cat", "dog"])
    result = generate_generic_prompt_images(decoder, tmp_path, 3, seed=4, batch_size=2, show_progress=False)
    assert result.num_images == result.generated == 6 and result.manifest is not None
    assert [len(prompts) for prompts, _ in decoder.calls] == [2, 2, 2]
    assert decoder.calls[0][0] == ["A high-quality photo of a cat"] * 2
    folder = GeneratedImageFolder(tmp_path)
    assert folder.targets == [0, 0, 0, 1, 1, 1] and folder.classes == ["cat", "dog"]
    for index in range(6):
        path, label = folder.samples[index]
        assert path == tmp_path / f"{label:03d}" / f"{index:06d}.png"
        expected = (decoder.render(image_seed(4, index)) * 255).round().byte().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
        assert decoder.calls[index // 2][0][index % 2] == f"A high-quality photo of a {('cat', 'dog')[label]}"
    (tmp_path / "001" / "000005.png").unlink()
    decoder.calls.clear()
    again = generate_generic_prompt_images(decoder, tmp_path, 3, seed=4, batch_size=2, show_progress=False)
    assert again.generated == 1 and decoder.calls == [
        (["A high-quality photo of a dog"] * 2, [image_seed(4, 4), image_seed(4, 5)])
    ]
    with pytest.raises(TypeError, match="decode_prompts"):
        generate_generic_prompt_images(object(), tmp_path, 1)  # type: ignore[arg-type]
    assert all(hasattr(StableDiffusionDecoder, name) for name in ("class_names", "prompts", "decode_prompts"))


def test_rotation_moves_a_blob_like_a_rotation() -> None:
    image = torch.zeros(1, 1, 21, 21)
    image[0, 0, 9:12, 14:17] = 1.0  # centred 5 pixels right of the centre (10, 10)
    generator = torch.Generator().manual_seed(8)
    angle = float((torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * 40)
    rotated = rotate_images(image, 40.0, seed=8)[0, 0]
    rows, cols = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    centroid = ((rotated * rows).sum() / rotated.sum(), (rotated * cols).sum() / rotated.sum())
    theta = math.radians(angle)  # counter-clockwise on screen: the row coordinate decreases
    assert float(centroid[0]) == pytest.approx(10 - 5 * math.sin(theta), abs=0.25)
    assert float(centroid[1]) == pytest.approx(10 + 5 * math.cos(theta), abs=0.25)
    torch.testing.assert_close(rotate_images(image, 0.0), image)
    assert torch.equal(rotate_images(image, 20.0, seed=1), rotate_images(image, 20.0, seed=1))


def test_classification_accuracy_matches_a_manual_count_and_restores_modes() -> None:
    images, labels = _digits(10)
    model = Classifier(SmallConvNet(1, 8, width=4, seed=1), 3).train()
    accuracy = classification_accuracy(
        model, DataLoader(TensorDataset(images, labels), batch_size=4), progress_bar=False
    )
    assert all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        expected = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(expected)
    with pytest.raises(ValueError, match="no image"):
        classification_accuracy(model, [], progress_bar=False)
