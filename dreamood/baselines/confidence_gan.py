"""GAN-based outlier synthesis: a confidence-calibrated classifier trained jointly with a DCGAN.

Lee, Lee, Lee, Shin. "Training Confidence-calibrated Classifiers for Detecting Out-of-Distribution Samples",
ICLR 2018 (the joint confidence loss, Eq. 4 and Algorithm 1). A generator ``G`` and a discriminator ``D`` are
trained with the classifier so that ``G`` produces samples on the low-density boundary of the ID data:

* ``D`` minimises the usual GAN loss ``-log D(x) - log(1 - D(G(z)))``;
* ``G`` minimises ``-log D(G(z)) + beta * KL(U || p(y | G(z)))`` (fool ``D`` while the classifier is unsure);
* the classifier minimises ``CE(x, y) + beta * KL(U || p(y | G(z)))``, ``U`` the uniform distribution.

The classifier's part runs in the shared loop: :class:`GANOutlierLoader` takes one ``D`` and one ``G`` step per
batch and yields fresh ``G(z)`` samples as the loop's outliers, and :class:`UniformKLRegularizer` is its
``regularizer``::

    gan = ConfidenceGAN(image_size=32, channels=3, seed=0, device="cuda")
    train_classifier(model, id_loader, TrainingConfig(epochs=100, beta=gan.beta),
                     outlier_loader=GANOutlierLoader(gan, real_loader, model),
                     regularizer=UniformKLRegularizer(), device="cuda")

At test time the paper scores with the maximum softmax probability
(:func:`~dreamood.evaluation.msp_score`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._utils import DeviceLike, make_generator, resolve_device
from dreamood._validation import as_tensor, check_finite, check_floating, check_positive, check_positive_int, check_rank
from dreamood.errors import NonFiniteError
from dreamood.training.rng import loader_generators

__all__ = [
    "ConfidenceGAN",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GANLosses",
    "GANOutlierLoader",
    "UniformKLRegularizer",
    "kl_to_uniform",
]


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Per-sample ``KL(U || softmax(logits)) = -log C - mean_c log softmax(logits)_c``.

    Lee et al., ICLR 2018 (Eq. 1): zero exactly when the prediction is uniform over the ``C`` classes.

    Args:
        logits: Classifier logits ``(N, C)``, floating point.

    Returns:
        The divergences ``(N,)``, each ``>= 0``.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``logits`` is not ``(N, C)`` with ``C >= 1``.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    check_rank(logits, 2, "logits", "of shape (N, C)")
    check_floating(logits, "logits")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class column, got shape {tuple(logits.shape)}")
    return -math.log(logits.shape[1]) - F.log_softmax(logits, dim=1).mean(dim=1)


class UniformKLRegularizer(nn.Module):
    """Outlier loss of the confidence loss: the mean ``KL(U || p(y | x_out))`` over the outlier batch.

    Lee et al., ICLR 2018 (Eq. 1). A ``regularizer`` for :func:`~dreamood.training.train_classifier`, which
    then minimises ``CE + beta * mean KL``; the ID logits are checked but do not enter the loss. It has no
    parameters.
    """

    def forward(self, logits_id: Tensor, logits_ood: Tensor) -> Tensor:
        """Return the mean divergence of the outliers' predictions from the uniform distribution.

        Args:
            logits_id: Logits of ID samples ``(N_id, C)`` (only their width is checked).
            logits_ood: Logits of outliers ``(N_ood, C)``, ``N_ood >= 1``.

        Returns:
            The scalar loss.

        Raises:
            TypeError: A batch is not a floating-point tensor.
            ValueError: A batch is not 2-D, the outlier batch is empty, or the widths differ.
        """
        divergence = kl_to_uniform(logits_ood)
        if not isinstance(logits_id, Tensor) or logits_id.dim() != 2 or logits_id.shape[1] != logits_ood.shape[1]:
            shape = tuple(logits_id.shape) if isinstance(logits_id, Tensor) else type(logits_id).__name__
            raise ValueError(
                f"logits_id must be (N, {logits_ood.shape[1]}) like logits_ood {tuple(logits_ood.shape)}, got {shape}"
            )
        if divergence.shape[0] == 0:
            raise ValueError("logits_ood is an empty batch: at least one outlier is needed")
        return divergence.mean()


def _upsampling_steps(image_size: int) -> int:
    check_positive_int(image_size, "image_size")
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8 (8, 16, 32, 64, ...), got {image_size}")
    return image_size.bit_length() - 3  # stride-2 layers between 4x4 and image_size


def _dcgan_init(module: nn.Module, generator: torch.Generator) -> None:
    """DCGAN initialisation (Radford et al., 2016): conv weights ~ N(0, 0.02), BN scales ~ N(1, 0.02)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02, generator=generator)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02, generator=generator)
            nn.init.zeros_(layer.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator: latent codes ``(N, latent_dim)`` -> images ``(N, channels, image_size, image_size)``.

    Radford, Metz, Chintala, ICLR 2016, sized as in the public code of Lee et al. (ICLR 2018): a transposed
    convolution to ``4 x 4`` with ``width * 2^k`` channels, then ``k`` stride-2 transposed convolutions halving
    the channels and doubling the side (BN + ReLU after each but the last), and a sigmoid, so pixels lie in
    ``[0, 1]``. For 32x32 images ``k = 3`` (channels ``8w, 4w, 2w``); for 8x8 digits ``k = 1``. When
    ``mean``/``std`` are given the output is normalised as ``(image - mean) / std`` per channel, to match a
    classifier that takes normalised images.

    Args:
        image_size: Side of the square images, a power of two ``>= 8``.
        channels: Image channels.
        latent_dim: Width of the latent code.
        width: Base number of feature maps (``ngf``; 64 in DCGAN).
        mean: Per-channel mean subtracted from the output (``None``: no normalisation).
        std: Per-channel standard deviation the output is divided by (with ``mean``).
        seed: Seed of the DCGAN weight initialisation.

    Raises:
        ValueError: A size is invalid, or ``mean``/``std`` do not have one positive value per channel.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = 100,
        width: int = 64,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        steps = _upsampling_steps(image_size)
        check_positive_int(channels, "channels")
        check_positive_int(latent_dim, "latent_dim")
        check_positive_int(width, "width")
        mean_t, std_t = _normalisation(mean, std, channels)
        hidden = width * 2**steps
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, hidden, 4, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        ]
        for _ in range(steps - 1):
            layers += [
                nn.ConvTranspose2d(hidden, hidden // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(hidden // 2),
                nn.ReLU(inplace=True),
            ]
            hidden //= 2
        layers += [nn.ConvTranspose2d(hidden, channels, 4, 2, 1, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)
        _dcgan_init(self, torch.Generator().manual_seed(seed))
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.image_size = image_size
        self.channels = channels
        self.latent_dim = latent_dim

    def forward(self, z: Tensor) -> Tensor:
        """Images ``(N, channels, image_size, image_size)`` of the latent codes ``z`` ``(N, latent_dim)``."""
        images: Tensor = self.main(z.view(z.shape[0], self.latent_dim, 1, 1))
        return (images - self.mean) / self.std


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: images -> one logit per image (real = positive), shape ``(N,)``.

    Mirrors :class:`DCGANGenerator` as in the public code of Lee et al. (ICLR 2018): ``k`` stride-2 4x4
    convolutions from ``2 * width`` channels, doubling (LeakyReLU 0.2; BN from the second on) down to ``4 x 4``,
    then a 4x4 convolution to one logit. The sigmoid of the original is folded into the loss
    (``binary_cross_entropy_with_logits``), which computes the same loss stably.

    Args:
        image_size: Side of the square images, a power of two ``>= 8``.
        channels: Image channels.
        width: Base number of feature maps (``ndf``; 64 in DCGAN).
        seed: Seed of the DCGAN weight initialisation.

    Raises:
        ValueError: A size is invalid.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, width: int = 64, *, seed: int = 0) -> None:
        super().__init__()
        steps = _upsampling_steps(image_size)
        check_positive_int(channels, "channels")
        check_positive_int(width, "width")
        hidden = 2 * width
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(steps - 1):
            layers += [
                nn.Conv2d(hidden, 2 * hidden, 4, 2, 1, bias=False),
                nn.BatchNorm2d(2 * hidden),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            hidden *= 2
        layers.append(nn.Conv2d(hidden, 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)
        _dcgan_init(self, torch.Generator().manual_seed(seed))
        self.image_size = image_size
        self.channels = channels

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N,)`` that ``images`` are real."""
        logits: Tensor = self.main(images)
        return logits.view(images.shape[0])


def _normalisation(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> tuple[Tensor, Tensor]:
    if (mean is None) != (std is None):
        raise ValueError("give mean and std together (the classifier's input normalisation), or neither")
    if mean is None or std is None:
        return torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1)
    mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
    std_t = torch.as_tensor(list(std), dtype=torch.float32)
    if mean_t.shape != (channels,) or std_t.shape != (channels,):
        raise ValueError(
            f"mean and std must have one value per channel ({channels}), got {list(mean)!r} and {list(std)!r}"
        )
    if not bool((std_t > 0).all()) or not bool(torch.isfinite(mean_t).all()):
        raise ValueError(f"std must be positive and mean finite, got mean={list(mean)!r}, std={list(std)!r}")
    return mean_t.view(channels, 1, 1), std_t.view(channels, 1, 1)


@dataclass(frozen=True)
class GANLosses:
    """The losses of one :meth:`ConfidenceGAN.train_step`.

    Attributes:
        discriminator: ``-log D(x) - log(1 - D(G(z)))``, averaged over the batch (real and fake terms summed).
        generator_gan: ``-log D(G(z))`` of the generator step, averaged.
        generator_kl: ``KL(U || p(y | G(z)))`` of the generator step, averaged.
    """

    discriminator: float
    generator_gan: float
    generator_kl: float


class ConfidenceGAN(nn.Module):
    """The DCGAN pair of the joint confidence loss and its two Adam optimisers (Lee et al., ICLR 2018).

    :meth:`train_step` does Algorithm 1's discriminator and generator updates for one real batch and the
    current classifier; :meth:`sample` draws ``G(z)``, the outliers the classifier is trained on (through
    :class:`GANOutlierLoader`). Latent codes ``z ~ N(0, I)`` come from a ``torch.Generator`` seeded with
    ``seed``, and the weights are initialised from ``seed``, so a run is reproducible. The optimiser settings
    follow the public code: Adam, learning rate ``2e-4``, betas ``(0.5, 0.999)``; ``beta`` 0.1 is its
    CIFAR-10 value (1 elsewhere).

    Args:
        image_size: Side of the square images (a power of two ``>= 8``: 32 for CIFAR, 8 for the digits).
        channels: Image channels.
        latent_dim: Width of the latent code (100 in DCGAN).
        generator_width: Base feature maps of ``G`` (``ngf``).
        discriminator_width: Base feature maps of ``D`` (``ndf``).
        beta: Weight of the KL term in the generator loss; give the classifier the same ``beta``.
        lr: Adam learning rate of ``G`` and ``D``.
        betas: Adam betas of ``G`` and ``D``.
        mean: Per-channel normalisation of the classifier's inputs (``G``'s output is normalised the same way).
        std: Per-channel standard deviation of that normalisation.
        seed: Seed of the initialisation and of the latent codes.
        device: Device of ``G`` and ``D`` (``None``/``"auto"``: CUDA when available).

    ``state_dict()`` holds everything a continued training needs: both networks, both Adam states and the
    latent generator's state, so ``load_state_dict`` of a saved state continues exactly where it was saved.

    Attributes:
        generator: The :class:`DCGANGenerator`.
        discriminator: The :class:`DCGANDiscriminator`.
        last_losses_: The losses of the latest :meth:`train_step` (absent before the first).

    Raises:
        ValueError: A setting is out of range.
    """

    last_losses_: GANLosses

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        *,
        latent_dim: int = 100,
        generator_width: int = 64,
        discriminator_width: int = 64,
        beta: float = 0.1,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__()
        check_positive(beta, "beta", allow_zero=True)
        check_positive(lr, "lr")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        check_positive_int(seed, "seed", allow_zero=True)
        self.device = resolve_device(device)
        self.generator = DCGANGenerator(
            image_size, channels, latent_dim, generator_width, mean=mean, std=std, seed=seed
        ).to(self.device)
        self.discriminator = DCGANDiscriminator(image_size, channels, discriminator_width, seed=seed + 1).to(
            self.device
        )
        self.beta = float(beta)
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.channels = channels
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        self.noise_generator = cast(torch.Generator, make_generator(seed, self.device))  # an int seed: never None

    def get_extra_state(self) -> dict[str, Any]:
        """The optimisers' and the latent generator's states, stored by ``state_dict()`` beside the weights."""
        return {
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` returned (called by ``load_state_dict``).

        Raises:
            ValueError: ``state`` is not such a state.
        """
        keys = {"generator_optimizer", "discriminator_optimizer", "noise_generator"}
        if not isinstance(state, dict) or set(state) != keys:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"a ConfidenceGAN's extra state must hold {sorted(keys)}, got {found}")
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.noise_generator.set_state(state["noise_generator"])

    def latent(self, count: int) -> Tensor:
        """Draw ``count`` latent codes ``z ~ N(0, I)`` ``(count, latent_dim)`` from the seeded generator."""
        check_positive_int(count, "count")
        return torch.randn(count, self.latent_dim, generator=self.noise_generator, device=self.device)

    def sample(self, count: int) -> Tensor:
        """Generate ``count`` images ``G(z)`` (no gradient), in ``G``'s current train/eval mode.

        Args:
            count: Number of images.

        Returns:
            Images ``(count, channels, image_size, image_size)`` on the GAN's device.
        """
        with torch.no_grad():
            images: Tensor = self.generator(self.latent(count))
        return images

    def train_step(self, real_images: Tensor, classifier: Callable[[Tensor], Tensor]) -> GANLosses:
        """One discriminator update and one generator update of the joint confidence loss.

        The discriminator sees the real batch and ``G(z)``; the generator then minimises
        ``-log D(G(z)) + beta * KL(U || classifier(G(z)))`` on the same ``z``. Gradients reach ``D``'s and
        ``G``'s parameters only: the classifier is used as it is (its mode is not changed, so BatchNorm layers
        in train mode see the fake batch, as in the public code) and gets no ``.grad``.

        Args:
            real_images: A batch of ID images ``(N, channels, image_size, image_size)`` (labels are not used).
            classifier: Maps images to logits ``(N, C)``.

        Returns:
            The step's losses (also kept in ``last_losses_``).

        Raises:
            TypeError: ``real_images`` is not a floating-point tensor.
            ValueError: ``real_images`` has the wrong shape or ``classifier`` does not return ``(N, C)`` logits.
            NonFiniteError: A loss is NaN or infinite.
        """
        real = as_tensor(real_images, "real_images")
        check_floating(real, "real_images")
        expected = (self.channels, self.image_size, self.image_size)
        if real.dim() != 4 or tuple(real.shape[1:]) != expected or real.shape[0] == 0:
            raise ValueError(
                f"real_images must have shape (N, {', '.join(map(str, expected))}), got {tuple(real.shape)}"
            )
        real = real.detach().to(self.device, torch.float32)
        count = real.shape[0]
        self.generator.train()
        self.discriminator.train()

        fake = self.generator(self.latent(count))
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(d_loss)
        self.discriminator_optimizer.step()

        fooled_logits = self.discriminator(fake)
        g_gan = F.binary_cross_entropy_with_logits(fooled_logits, torch.ones_like(fooled_logits))
        logits = classifier(fake)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != count:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits of shape (N, C) with N = {count}, got {shape}")
        g_kl = kl_to_uniform(logits.float()).mean()
        g_loss = g_gan + self.beta * g_kl
        self.generator_optimizer.zero_grad(set_to_none=True)
        # Only G's parameters accumulate gradients: D was just updated and the classifier trains elsewhere.
        torch.autograd.backward(g_loss, inputs=list(self.generator.parameters()))
        self.generator_optimizer.step()

        losses = GANLosses(
            discriminator=float(d_loss.detach()), generator_gan=float(g_gan.detach()), generator_kl=float(g_kl.detach())
        )
        for name, value in asdict(losses).items():
            if not math.isfinite(value):
                raise NonFiniteError(f"the GAN's {name} loss is {value}; lower the learning rate or check the inputs")
        self.last_losses_ = losses
        return losses

    def outlier_loader(self, real_loader: Iterable[Any], classifier: Callable[[Tensor], Tensor]) -> GANOutlierLoader:
        """Shorthand for ``GANOutlierLoader(self, real_loader, classifier)``."""
        return GANOutlierLoader(self, real_loader, classifier)


class GANOutlierLoader:
    """The ``outlier_loader`` of :func:`~dreamood.training.train_classifier` for the joint confidence loss.

    Each item trains the GAN for one step (:meth:`ConfidenceGAN.train_step` on the next batch of
    ``real_loader`` and the classifier as it is now) and then yields ``G(z)`` for a fresh ``z``, detached, on
    the device and in the dtype of the real batch, with as many images as it. So every classifier step of the
    loop is preceded by one ``D`` and one ``G`` step, as in Algorithm 1 of Lee et al. (ICLR 2018), and the loop's
    ``beta * L_ood`` with :class:`UniformKLRegularizer` is the classifier's KL term. One pass has
    ``len(real_loader)`` items.

    Use it in a single process: the loop cannot shard it under ``torchrun``. Its :meth:`state_dict` holds the
    GAN's complete state and the random states of ``real_loader``; pass the loader as ``extra_state`` too
    (``extra_state={"gan": loader}``) and the loop's checkpoints hold it, so ``resume=True`` continues the GAN
    exactly as an uninterrupted run would.

    Args:
        gan: The :class:`ConfidenceGAN`.
        real_loader: Batches of ID training images (or ``(images, labels)``); usually a second shuffled loader
            over the ID training set.
        classifier: The classifier being trained (images -> logits).

    Raises:
        TypeError: An argument has the wrong type.
    """

    def __init__(self, gan: ConfidenceGAN, real_loader: Iterable[Any], classifier: Callable[[Tensor], Tensor]) -> None:
        if not isinstance(gan, ConfidenceGAN):
            raise TypeError(f"gan must be a ConfidenceGAN, got {type(gan).__name__}")
        if not isinstance(real_loader, Iterable):
            raise TypeError(f"real_loader must be an iterable of batches, got {type(real_loader).__name__}")
        if not callable(classifier):
            raise TypeError(f"classifier must be callable (images -> logits), got {type(classifier).__name__}")
        self.gan = gan
        self.real_loader = real_loader
        self.classifier = classifier

    def __len__(self) -> int:
        """Number of items of one pass (the length of ``real_loader``)."""
        return len(self.real_loader)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """The GAN's ``state_dict()`` and the states of the ``torch.Generator`` objects ``real_loader`` draws from."""
        return {
            "gan": self.gan.state_dict(),
            "real_loader": [generator.get_state() for generator in loader_generators(self.real_loader)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: ``state`` does not fit this loader (another number of ``real_loader`` generators).
        """
        generators = loader_generators(self.real_loader)
        if len(state["real_loader"]) != len(generators):
            raise ValueError(
                f"the saved state has {len(state['real_loader'])} real_loader generator state(s), but real_loader "
                f"draws from {len(generators)}"
            )
        self.gan.load_state_dict(state["gan"])
        for generator, generator_state in zip(generators, state["real_loader"]):
            generator.set_state(generator_state)

    def __iter__(self) -> Iterator[Tensor]:
        """Yield one batch of generated outliers per batch of ``real_loader``, training the GAN before each."""
        for batch in self.real_loader:
            real = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(real, Tensor):
                raise TypeError(f"real_loader must yield image tensors or (images, labels), got {type(real).__name__}")
            self.gan.train_step(real, self.classifier)
            fake = self.gan.sample(real.shape[0])
            check_finite(fake, "generated images")
            yield fake.to(real.device, real.dtype)
