"""Bring your own decoder: any object with ``embedding_dim``, ``class_names`` and ``decode(vectors, labels, seeds)``.

``GeneratorDecoder`` wraps a conditional generator network ``G(vector, noise) -> image`` (for example a
conditional GAN generator trained on your domain) as a :class:`dreamood.EmbeddingDecoder`. The contract it
must keep: images in ``[0, 1]`` of shape ``(B, 3, H, W)``, and one seed per image, so that the same
``(vector, label, seed)`` gives the same image whatever batch it is decoded in. That is what lets
:func:`dreamood.decoding.generation.generate_images` shard a generation over processes and resume it after
a crash.

Here the generator is tiny and randomly initialised, so the script runs in seconds on a CPU:

    python examples/howto_custom_decoder.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood import EmbeddingDecoder, FeatureBank, TokenEmbeddings
from dreamood.data.generated import GeneratedImageFolder
from dreamood.decoding.generation import generate_images
from dreamood.sampling.knn_boundary import KNNBoundarySampler


class TinyGenerator(nn.Module):
    """``(vector, noise) -> image``: a linear layer to a 4x4 map and two transposed convolutions to 16x16."""

    def __init__(self, embedding_dim: int, noise_dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        with torch.random.fork_rng():  # seeded initial weights; in a real use case, load trained ones
            torch.manual_seed(seed)
            self.stem = nn.Linear(embedding_dim + noise_dim, 32 * 4 * 4)
            self.up = nn.Sequential(
                nn.ReLU(),
                nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                nn.ReLU(),
                nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1),
            )

    def forward(self, vectors: Tensor, noise: Tensor) -> Tensor:
        hidden = self.stem(torch.cat([vectors, noise], dim=1)).view(-1, 32, 4, 4)
        return torch.sigmoid(self.up(hidden))  # (B, 3, 16, 16) in (0, 1)


class GeneratorDecoder:
    """An :class:`~dreamood.protocols.EmbeddingDecoder` around a conditional generator ``G(vector, noise)``.

    Every image's noise comes from its own ``torch.Generator`` seeded with its seed, and the generator runs
    in eval mode (no batch statistics), so an image never depends on the rest of its batch.

    Args:
        generator: Module mapping ``(vectors (B, m), noise (B, noise_dim))`` to images ``(B, 3, H, W)`` in
            ``[0, 1]``; it must expose ``noise_dim``.
        class_names: Class names, indexed by label.
        embedding_dim: The dimension ``m`` of the vectors.
        output_size: Resize the images to this side (e.g. the ID resolution); ``None`` keeps them.
    """

    def __init__(
        self, generator: nn.Module, class_names: Sequence[str], embedding_dim: int, output_size: int | None = None
    ) -> None:
        self.generator = generator.eval()
        self._class_names = list(class_names)
        self._embedding_dim = embedding_dim
        self.output_size = output_size

    @property
    def embedding_dim(self) -> int:
        """Dimension ``m`` of the vectors the decoder accepts."""
        return self._embedding_dim

    @property
    def class_names(self) -> list[str]:
        """Names of the classes, indexed by label."""
        return self._class_names

    @property
    def config(self) -> dict[str, object]:
        """What identifies the images; ``generate_images`` stores its hash with every image to detect changes."""
        return {"decoder": "GeneratorDecoder", "output_size": self.output_size, "noise_dim": self.generator.noise_dim}

    @torch.no_grad()
    def decode(self, vectors: Tensor, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """Render one image per vector (``labels`` are unused: the vector alone conditions this generator)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"vectors must have shape (B, {self.embedding_dim}), got {tuple(vectors.shape)}")
        if len(seeds) != len(vectors) or len(labels) != len(vectors):
            raise ValueError(f"need one label and one seed per vector, got {len(labels)}, {len(seeds)}, {len(vectors)}")
        noise_dim = self.generator.noise_dim
        noise = torch.stack([torch.randn(noise_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
        images: Tensor = self.generator(vectors.float(), noise)
        if self.output_size is not None:
            images = F.interpolate(images, size=self.output_size, mode="bilinear", antialias=True)
        return images.clamp(0.0, 1.0)


def toy_problem(
    num_classes: int = 3, per_class: int = 40, dim: int = 32, seed: int = 0
) -> tuple[FeatureBank, TokenEmbeddings]:
    """A unit-norm feature bank of clustered classes and anchors with Stable-Diffusion-like norms."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    embeddings = F.normalize(centres[labels] + 0.12 * torch.randn(len(labels), dim, generator=g), dim=1)
    tokens = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * 0.38
    return FeatureBank(embeddings, labels), TokenEmbeddings(["cat", "dog", "ship"][:num_classes], tokens)


def main() -> dict[str, object]:
    """Sample outlier embeddings, render them with the custom decoder, and read the images back."""
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    bank, anchors = toy_problem()
    sampler = KNNBoundarySampler(
        k=10,
        boundary_size=10,
        anchors_per_round=5,
        candidates_per_anchor=100,
        sigma=0.1,
        keep_per_anchor=2,
        device="cpu",
        show_progress=False,
    )
    samples = sampler.sample(bank, anchors, num_per_class=8)

    decoder = GeneratorDecoder(TinyGenerator(anchors.dim), anchors.class_names, anchors.dim, output_size=32)
    assert isinstance(decoder, EmbeddingDecoder)  # the protocol checks the members, no inheritance needed

    # The contract: an image depends on its (vector, label, seed) only, not on the batch around it.
    seeds = [11, 12, 13, 14]
    together = decoder.decode(samples.vectors[:4], samples.labels[:4], seeds)
    alone = torch.cat(
        [decoder.decode(samples.vectors[i : i + 1], samples.labels[i : i + 1], seeds[i : i + 1]) for i in range(4)]
    )
    low, high, gap = float(together.min()), float(together.max()), float((together - alone).abs().max())
    print(f"decoded {tuple(together.shape)} in [{low:.3f}, {high:.3f}]; batch vs one by one: max |diff| = {gap:.1e}")

    with tempfile.TemporaryDirectory() as folder:
        # Resumable and shardable: run it again (or under torchrun) and only missing images are rendered.
        result = generate_images(decoder, samples, folder, images_per_class=4, batch_size=4, show_progress=False)
        again = generate_images(decoder, samples, folder, images_per_class=4, batch_size=4, show_progress=False)
        images = GeneratedImageFolder(folder)
        image, label = images[0]
        print(f"generate_images wrote {result.generated} images; the re-run skipped {again.skipped}")
        print(f"read back {len(images)} images, the first {tuple(image.shape)} of class {images.classes[label]!r}")
        labels = list(images.targets)
    return {"decoder": decoder, "samples": samples, "together": together, "alone": alone, "labels": labels}


if __name__ == "__main__":
    main()
