"""Bring your own Phase 2 sampler: any class with ``sample(bank, anchors, num_per_class, generator)``.

The sampler below, ``ShellSampler``, is a deliberately simple parametric alternative to DREAM-OOD's k-NN
boundary sampler: for every class it takes the direction of the class centroid on the unit sphere and draws
vectors on a "shell" at a fixed angle from it, a margin beyond the angle that holds most of the class's bank
embeddings. It satisfies :class:`dreamood.EmbeddingSampler`, so its output can go wherever the output of
:class:`dreamood.sampling.knn_boundary.KNNBoundarySampler` goes (saving, decoding, training).

Runs on tiny random data in seconds:

    python examples/howto_custom_sampler.py
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamood import EmbeddingSampler, EmbeddingSamples, FeatureBank, TokenEmbeddings
from dreamood.knn import kth_neighbor_distance
from dreamood.sampling.knn_boundary import KNNBoundarySampler


class ShellSampler:
    """Vectors at a fixed angle from each class centroid, just outside the class (an illustration).

    For class ``c`` with unit bank embeddings ``z_i``, let ``mu`` be the normalised mean of the ``z_i`` and
    ``theta_q`` the ``quantile`` of their angles to ``mu``. Each sample is
    ``v = cos(theta) mu + sin(theta) u`` with ``theta = min(margin * theta_q, pi)`` and ``u`` a random unit
    vector orthogonal to ``mu``, rescaled to the norm of the class token ``T(c)`` (as the k-NN boundary
    sampler does, so that the decoder receives vectors of the scale it expects).

    Args:
        quantile: Which quantile of the angles to the centroid defines the class's extent.
        margin: How far beyond that angle the shell lies, as a factor.
        seed: Seed of the generator used when :meth:`sample` gets none.
    """

    def __init__(self, quantile: float = 0.95, margin: float = 1.25, *, seed: int = 0) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
        if margin <= 0.0:
            raise ValueError(f"margin must be > 0, got {margin!r}")
        self.quantile = quantile
        self.margin = margin
        self.seed = seed

    def shell_angle(self, class_embeddings: Tensor) -> tuple[Tensor, float]:
        """The unit centroid ``mu`` of one class's unit embeddings and the shell angle ``theta`` (radians)."""
        mu = F.normalize(class_embeddings.mean(dim=0), dim=0)
        angles = torch.arccos((class_embeddings @ mu).clamp(-1.0, 1.0))
        theta = min(self.margin * float(torch.quantile(angles, self.quantile)), math.pi)
        return mu, theta

    def sample(
        self,
        bank: FeatureBank,
        anchors: TokenEmbeddings,
        num_per_class: int,
        generator: torch.Generator | None = None,
    ) -> EmbeddingSamples:
        """Draw ``num_per_class`` shell vectors for every class, grouped by class.

        Args:
            bank: L2-normalised feature bank with the classes of ``anchors``.
            anchors: The class tokens ``T(y)``; class ``c``'s samples get the norm of ``T(c)``.
            num_per_class: Samples per class.
            generator: Source of randomness; ``None`` uses a generator seeded with ``seed``.

        Returns:
            The samples, with labels, the configuration and the class names.
        """
        if bank.num_classes != anchors.num_classes or bank.dim != anchors.dim:
            raise ValueError(f"bank {bank} and anchors {anchors} disagree in classes or dimension")
        if not bank.is_normalized():
            raise ValueError("bank must be L2-normalised: pass bank.normalized()")
        rng = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        vectors = []
        for c in range(bank.num_classes):
            mu, theta = self.shell_angle(bank.per_class(c).double())
            u = torch.randn(num_per_class, bank.dim, generator=rng, dtype=torch.float64)
            u = F.normalize(u - (u @ mu)[:, None] * mu, dim=1)  # orthogonal to mu
            shell = math.cos(theta) * mu + math.sin(theta) * u
            vectors.append(shell * anchors.norms[c].double())
        return EmbeddingSamples(
            torch.cat(vectors).float(),
            torch.arange(bank.num_classes).repeat_interleave(num_per_class),
            config={"sampler": "ShellSampler", "quantile": self.quantile, "margin": self.margin, "seed": self.seed},
            class_names=anchors.class_names,
        )


def toy_problem(
    num_classes: int = 3, per_class: int = 40, dim: int = 32, seed: int = 0
) -> tuple[FeatureBank, TokenEmbeddings]:
    """A unit-norm feature bank of clustered classes and anchors with Stable-Diffusion-like norms (0.34-0.42)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    embeddings = F.normalize(centres[labels] + 0.12 * torch.randn(len(labels), dim, generator=g), dim=1)
    tokens = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    tokens = tokens * (0.34 + 0.08 * torch.rand(num_classes, 1, generator=g))
    names = ["cat", "dog", "ship", "horse", "truck"][:num_classes]
    return FeatureBank(embeddings, labels), TokenEmbeddings(names, tokens)


def mean_knn_distance(samples: EmbeddingSamples, bank: FeatureBank, k: int) -> list[float]:
    """Per class, the mean k-th nearest-neighbour distance of the normalised samples to the class's bank."""
    unit = F.normalize(samples.vectors, dim=1)
    return [
        float(kth_neighbor_distance(unit[samples.labels == c], bank.per_class(c), k).mean())
        for c in range(bank.num_classes)
    ]


def main() -> dict[str, object]:
    """Sample with the custom sampler and with the k-NN boundary sampler, and compare their distances."""
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    bank, anchors = toy_problem()
    k = 10

    shell = ShellSampler(quantile=0.95, margin=1.25)
    assert isinstance(shell, EmbeddingSampler)  # the protocol checks the method, no inheritance needed
    ours = shell.sample(bank, anchors, num_per_class=50, generator=torch.Generator().manual_seed(0))

    boundary = KNNBoundarySampler(
        k=k,
        boundary_size=10,
        anchors_per_round=5,
        candidates_per_anchor=100,
        sigma=0.1,
        keep_per_anchor=2,
        device="cpu",
        show_progress=False,
    )
    reference = boundary.sample(bank, anchors, num_per_class=50, generator=torch.Generator().manual_seed(0))

    # How far from its class each set lies: the k-NN distance of Eq. 5, measured the same way for both.
    bank_own = [
        float(kth_neighbor_distance(bank.per_class(c), bank.per_class(c), k, exclude_self=True).mean())
        for c in range(bank.num_classes)
    ]
    distances = {
        "bank itself": bank_own,
        "ShellSampler": mean_knn_distance(ours, bank, k),
        "KNNBoundarySampler": mean_knn_distance(reference, bank, k),
    }
    print(f"mean {k}-NN distance to the class's bank embeddings")
    print(f"{'':20}" + "".join(f"{name:>8}" for name in anchors.class_names))
    for name, values in distances.items():
        print(f"{name:20}" + "".join(f"{v:8.3f}" for v in values))

    # Samples are an artefact like any other: safetensors plus a JSON sidecar holding the sampler's config.
    with tempfile.TemporaryDirectory() as folder:
        path = ours.save(Path(folder) / "shell_samples")
        loaded = EmbeddingSamples.load(path)
    print(f"saved and reloaded {loaded} with config {loaded.config}")
    assert torch.equal(loaded.vectors, ours.vectors)
    return {"bank": bank, "anchors": anchors, "samples": ours, "reference": reference, "distances": distances}


if __name__ == "__main__":
    main()
