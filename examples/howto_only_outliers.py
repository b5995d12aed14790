"""Only the outliers: train with DREAM-OOD's imagined outliers in your own loop, in OpenOOD or in pytorch-ood.

A DREAM-OOD run leaves its imagined outliers in ``<output_dir>/images`` (``dreamood generate``): class folders
``000/``, ``001/``, ... of PNG files with ``manifest.jsonl`` and ``classes.json``. That folder is all another
training setup needs. Here a toy decoder writes a folder of the same layout in a temporary directory (so the
script runs anywhere in seconds), and a small classifier of 8x8 "bar" images (class ``c``: a bright row band
at height ``c``) is trained three ways:

A. your own PyTorch loop: ``GeneratedImageFolder`` as the outlier loader and the energy loss of Eq. 7;
B. OpenOOD: ``export_generated(..., "openood")`` writes an image list (``<path> -1`` per line) to point
   OpenOOD's outlier-exposure config at;
C. pytorch-ood: ``outlier_dataset`` gives the images with target ``-1``, which pytorch-ood's losses read as
   "outlier"; it is concatenated with the ID set and trained with ``EnergyRegularizedLoss``.

The OOD test images are new draws of the toy decoder (other seeds): the table shows that the outliers reach
the model and move its energy score, not how DREAM-OOD's outliers generalise to real OOD sets. Run it with
``python examples/howto_only_outliers.py`` (part C needs ``pip install pytorch-ood``).
"""

from __future__ import annotations

import os
import tempfile
from itertools import cycle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from dreamood import EmbeddingSamples, EnergyOODRegularizer, GeneratedImageFolder, generate_images, ood_metrics
from dreamood.data import export_generated, outlier_dataset
from dreamood.evaluation import energy_score

NUM_CLASSES, SIZE = 3, 8


def bars(labels: Tensor, generator: torch.Generator) -> Tensor:
    """ID images ``(N, 3, 8, 8)``: class ``c`` is a bright band on rows ``2c + 1`` and ``2c + 2``, plus noise."""
    images = 0.15 * torch.rand(len(labels), 3, SIZE, SIZE, generator=generator)
    for index, label in enumerate(labels.tolist()):
        images[index, :, 2 * label + 1 : 2 * label + 3, :] += 0.8
    return images.clamp(0, 1)


class ToyOutlierDecoder:
    """Stands in for Stable Diffusion: the class band crossed by a vertical band (not a class)."""

    embedding_dim = 4
    class_names = ("low", "middle", "high")

    def decode(self, vectors: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
        images = []
        for label, seed in zip(labels.tolist(), seeds):
            generator = torch.Generator().manual_seed(seed % 2**31)
            image = 0.15 * torch.rand(3, SIZE, SIZE, generator=generator)
            column = int(torch.randint(0, SIZE - 1, (1,), generator=generator))
            image[:, 2 * label + 1 : 2 * label + 3, :] += 0.8
            image[:, :, column : column + 2] += 0.5
            images.append(image.clamp(0, 1))
        return torch.stack(images)


def make_generated_folder(root: Path) -> Path:
    """A folder as ``dreamood generate`` writes it: 32 outlier images per class."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(32)
    samples = EmbeddingSamples(torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(0)), labels)
    generate_images(ToyOutlierDecoder(), samples, root / "images", seed=0, show_progress=False)
    return root / "images"


def make_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def id_data(seed: int, per_class: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    return TensorDataset(bars(labels, generator), labels)


@torch.no_grad()
def evaluate(model: nn.Module, test: TensorDataset) -> dict[str, float]:
    """ID accuracy, and AUROC of the negative energy (higher = more ID) against new draws of the toy outliers."""
    model.eval()
    images, labels = test.tensors
    ood = ToyOutlierDecoder().decode(torch.zeros(len(labels), 4), labels, list(range(10_000, 10_000 + len(labels))))
    logits = model(images)
    metrics = ood_metrics(energy_score(logits), energy_score(model(ood)))
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()), "auroc": metrics.auroc}


# --8<-- [start:own-loop]
def train_own_loop(model: nn.Module, train: TensorDataset, folder: Path, epochs: int = 8, beta: float = 1.0) -> None:
    """Part A: cross-entropy on ID batches + beta * the energy loss (Eq. 7) on batches of generated outliers."""
    outliers = GeneratedImageFolder(folder, image_size=SIZE)  # (image tensor in [0, 1], class sampled around)
    id_loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    ood_loader = DataLoader(outliers, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    regularizer = EnergyOODRegularizer(head="linear")
    optimiser = torch.optim.SGD([*model.parameters(), *regularizer.parameters()], lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for (images, labels), (outlier_images, _) in zip(id_loader, cycle(ood_loader)):
            logits = model(torch.cat([images, outlier_images]))
            id_logits, ood_logits = logits[: len(images)], logits[len(images) :]
            loss = F.cross_entropy(id_logits, labels) + beta * regularizer(id_logits, ood_logits)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


# --8<-- [end:own-loop]


# --8<-- [start:openood]
def export_for_openood(folder: Path, out_dir: Path) -> Path:
    """Part B: an ImageFolder tree plus OpenOOD's image list, one '<path relative to out_dir> -1' line per image."""
    result = export_generated(folder, out_dir, "openood", image_size=SIZE)
    assert result.imglist is not None
    return result.imglist


# --8<-- [end:openood]


# --8<-- [start:pytorch-ood]
def train_pytorch_ood(model: nn.Module, train: TensorDataset, folder: Path, epochs: int = 8) -> None:
    """Part C: ID (targets 0..C-1) + outliers (targets -1) in one dataset, pytorch-ood's energy-regularised loss."""
    from pytorch_ood.loss import EnergyRegularizedLoss

    def to_tensor(image: Any) -> Tensor:
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255

    outliers = outlier_dataset(folder, transform=to_tensor)  # every target is -1
    labelled = [(image, int(label)) for image, label in zip(*train.tensors)]  # ID targets 0..C-1
    dataset: ConcatDataset[Any] = ConcatDataset([labelled, outliers])
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    criterion = EnergyRegularizedLoss(alpha=0.1)  # CE where target >= 0, energy margins where target < 0
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


# --8<-- [end:pytorch-ood]


def main() -> dict[str, Any]:
    """Write a generated folder, train the three ways, print their ID accuracy and AUROC."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the energy head starts from the global generator
    train, test = id_data(0, 64), id_data(1, 64)
    results: dict[str, dict[str, float]] = {}
    models: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_generated_folder(Path(tmp))

        baseline = make_model()
        train_own_loop(baseline, train, folder, beta=0.0)  # beta 0: cross-entropy only
        results["cross-entropy only"] = evaluate(baseline, test)
        models["cross-entropy only"] = baseline

        own = make_model()
        train_own_loop(own, train, folder)
        results["A. own loop + energy"] = evaluate(own, test)
        models["A. own loop + energy"] = own

        imglist = export_for_openood(folder, Path(tmp) / "openood")
        lines = imglist.read_text().splitlines()
        print(f"B. OpenOOD image list: {len(lines)} lines like {lines[0]!r}")
        print(f"   in OpenOOD's config: data_dir: {imglist.parent}{os.sep}  imglist_pth: {imglist}")

        try:
            import pytorch_ood  # noqa: F401
        except ImportError:
            print("C. skipped: pip install pytorch-ood")
        else:
            pood = make_model()
            train_pytorch_ood(pood, train, folder)
            results["C. pytorch-ood loss"] = evaluate(pood, test)
            models["C. pytorch-ood loss"] = pood

    print(f"{'training':<24}{'ID accuracy':>12}{'AUROC':>8}")
    for name, metrics in results.items():
        print(f"{name:<24}{metrics['accuracy']:>12.3f}{metrics['auroc']:>8.3f}")
    return {"results": results, "models": models, "test": test, "imglist_lines": lines}


if __name__ == "__main__":
    main()
