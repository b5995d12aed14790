"""Settings of ``dreamood demo``: what to run and every hyper-parameter, with where each value comes from.

This module imports nothing heavy, so the command line can be built without loading torch.

Hyper-parameters are fixed before any OOD test set is seen: they are the paper's settings (Du et al.,
NeurIPS 2023, and its public code) scaled to the size of this data, as the field comments say. None of them
was tuned on the OOD test sets.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "default_cache_dir"]

# The paper's reference values that the demo scales: its ImageNet-100 Phase 2 setting, Stable Diffusion's CLIP
# token embeddings (768-d, norm about 0.38), and the KNN detector's k on CIFAR (Sun et al., ICML 2022).
PAPER_EMBEDDING_DIM = 768
PAPER_SIGMA = 0.03
PAPER_INLIER_SIGMA = 0.01
PAPER_INLIER_ANCHORS_PER_ROUND = 100
PAPER_TOKEN_NORM = 0.38
PAPER_BANK_PER_CLASS = 1000
PAPER_K = 300
PAPER_BOUNDARY = 200
PAPER_ANCHORS_PER_ROUND = 50
PAPER_KNN_DETECTOR_K = 50
PAPER_KNN_DETECTOR_TRAIN = 50000


def default_cache_dir() -> Path:
    """``$DREAMOOD_CACHE`` when set, else ``~/.cache/dreamood``."""
    env = os.environ.get("DREAMOOD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dreamood"


@dataclass(frozen=True)
class DemoConfig:
    """Everything ``dreamood demo`` does, as plain values (JSON-serialisable through :meth:`to_dict`).

    Run options:
        id_classes: The in-distribution digits; the other digits are the near-OOD test set.
        seeds: Number of seeds; seeds ``seed, seed + 1, ...`` repeat Phases 1-3 and the outlier decoding and
            the report gives mean and standard deviation. The decoder (the stand-in for the pretrained
            Stable Diffusion) and the data split are shared by all seeds.
        seed: The first seed (also the seed of the data split, the far-OOD crops and the decoder).
        out_dir: Output folder; ``None`` makes ``./dreamood-demo-<timestamp>``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        threads: Number of CPU threads for torch during the run (``None``: leave torch's setting).
        cache_dir: Where trained decoders are cached (``None``: :func:`default_cache_dir`).
        use_cache: Read and write the decoder cache.
        progress: Show progress bars.
        quick: The reduced configuration used by the tests (tiny networks, few epochs, few images).

    Data:
        test_fraction: Fraction of every ID class held out for testing (stratified).
        far_ood_per_set: Images in the textures and photos sets (faces: at most 100).

    Decoder (an ``InDomainDiffusionDecoder`` trained on the ID images; its class embeddings are T(y)):
        decoder_*: Architecture and training at the digits' native 8x8; decode with ``ddim_steps`` DDIM steps
            and classifier-free guidance ``guidance_scale``. Chosen on ID data only, before any OOD set was
            scored: with linear betas, 30 epochs and guidance 2, a logistic regression trained on real digit
            pixels recognises the class of about 99% of the images decoded from T(y), whose grey levels match
            the digits'.

    Phase 1 (text-conditioned encoder, paper Eq. 2) and Phase 3 (classifiers):
        encoder_*, classifier_*: A ``SmallConvNet`` trained with the paper's SGD recipe (Nesterov 0.9,
            weight decay 5e-4, cosine learning rate, temperature 0.1 in Phase 1).
        beta, ood_head: The energy regulariser of Eq. 7 as in the paper's CIFAR-100 setting (trained from
            scratch: beta 2.5, linear head). The same regulariser is used for every outlier source so that
            only the source differs.
        feature_ood_start: Fraction of the epochs trained with cross-entropy alone before VOS/NPOS start
            (VOS: 40 of 100 epochs); image outliers are used from the first epoch.

    OOD-detection baselines (paper Tables 1 and 3), trained with the Phase 3 recipe and initial backbone:
        godin_similarity: GODIN's ``h`` (Hsu et al., CVPR 2020): ``"cosine"``, the paper's best. Its input
            perturbation is chosen by ``GODIN.fit`` from the paper's grid on the ID training images.
        gan_beta: Weight of the KL-to-uniform term of the joint confidence loss (Lee et al., ICLR 2018): 1, the
            public code's default, used there for SVHN digits (0.1 only for CIFAR-10).
        gan_width: Base feature maps of the DCGAN generator and discriminator (64 in DCGAN).

    Generalisation (DREAM-ID, paper Tables 4 and 5; the packaged ``imagenet100-dream-id`` sampler settings):
        inlier_sigma: Noise standard deviation of the inlier sampler; ``None`` scales the paper's 0.01 as
            ``sigma`` is scaled: ``0.01 * sqrt(768 / m)``.
        inlier_boundary_fraction, inlier_anchors_fraction: The densest-anchor set as a fraction of the smallest
            class in the bank (1.0: the whole bank, as 1,000 of 1,000) and anchors per round as a fraction of
            it (0.1: 100 of 1,000); one candidate kept per anchor.
        inliers_per_class: Inlier embeddings sampled and decoded per class; each augmentation baseline appends
            as many augmented copies per class.
        rotation_degrees: The shifted test set rotates every ID test digit by an angle drawn uniformly from
            ``[-rotation_degrees, rotation_degrees]``.
        memo_augmentations, memo_lr, memo_prior_strength: MEMO (Zhang et al., NeurIPS 2022) with its CIFAR-10
            code's settings (32 AugMix copies, one SGD step of learning rate 0.005) and the BatchNorm prior
            strength 16 of its ImageNet code (the CIFAR-10 network has no BatchNorm).

    Phase 2 (KNNBoundarySampler), scaled from the paper's ImageNet-100 setting (k 300 and boundary 200 of
    1,000 bank embeddings per class, 50 anchors per round, sigma 0.03 in 768 dimensions):
        k_fraction, boundary_fraction: k and the boundary size as fractions of the smallest class in the
            bank (0.3 and 0.2).
        anchors_fraction: Anchors per round as a fraction of the boundary (0.25).
        candidates_per_anchor, keep_per_anchor: As in the paper (1,500 and 2) unless changed.
        sigma: Noise standard deviation; ``None`` keeps the paper's expected noise norm
            ``0.03 * sqrt(768)`` in ``m`` dimensions: ``0.03 * sqrt(768 / m)``.
        sigma_multipliers: The sigmas of the outlier grid (paper Fig. 5), as multiples of ``sigma``.
        outliers_per_class: Outlier embeddings sampled and decoded per class.
        token_noise_std: Table 2 variant (I): ``None`` keeps the paper's noise-to-token ratio
            ``0.03 * sqrt(768) / 0.38`` (noise norm over CLIP token norm) for the learned tokens.
    """

    id_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    seeds: int = 1
    seed: int = 0
    out_dir: str | None = None
    device: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    progress: bool = True
    quick: bool = False

    test_fraction: float = 0.3
    far_ood_per_set: int = 300

    decoder_block_channels: tuple[int, ...] = (32, 64)
    decoder_embedding_dim: int = 64
    decoder_beta_schedule: str = "linear"
    decoder_epochs: int = 30
    decoder_batch_size: int = 64
    decoder_lr: float = 2e-3
    ddim_steps: int = 20
    guidance_scale: float = 2.0
    decode_batch_size: int = 128

    encoder_width: int = 32
    encoder_feature_dim: int = 64
    encoder_epochs: int = 30
    encoder_lr: float = 0.05
    encoder_batch_size: int = 64

    k_fraction: float = PAPER_K / PAPER_BANK_PER_CLASS
    boundary_fraction: float = PAPER_BOUNDARY / PAPER_BANK_PER_CLASS
    anchors_fraction: float = PAPER_ANCHORS_PER_ROUND / PAPER_BOUNDARY
    candidates_per_anchor: int = 1500
    keep_per_anchor: int = 2
    sigma: float | None = None
    sigma_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    outliers_per_class: int = 128
    token_noise_std: float | None = None

    classifier_width: int = 32
    classifier_feature_dim: int = 64
    classifier_epochs: int = 30
    classifier_lr: float = 0.05
    classifier_batch_size: int = 64
    beta: float = 2.5
    ood_head: str = "linear"
    feature_ood_start: float = 0.4
    feature_queue_size: int = 64

    godin_similarity: str = "cosine"
    gan_beta: float = 1.0
    gan_width: int = 64

    inlier_sigma: float | None = None
    inlier_boundary_fraction: float = 1.0
    inlier_anchors_fraction: float = PAPER_INLIER_ANCHORS_PER_ROUND / PAPER_BANK_PER_CLASS
    inliers_per_class: int = 128
    rotation_degrees: float = 15.0
    memo_augmentations: int = 32
    memo_lr: float = 0.005
    memo_prior_strength: float | None = 16.0

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """The reduced configuration of the tests: the same code path with tiny networks and few images.

        Args:
            **overrides: Fields to set on top of the quick settings.

        Returns:
            The configuration.
        """
        quick = cls(
            quick=True,
            far_ood_per_set=24,
            decoder_block_channels=(8, 16),
            decoder_embedding_dim=16,
            decoder_epochs=1,
            decoder_batch_size=64,
            ddim_steps=2,
            decode_batch_size=64,
            encoder_width=8,
            encoder_feature_dim=16,
            encoder_epochs=1,
            candidates_per_anchor=64,
            sigma_multipliers=(1.0, 2.0),
            outliers_per_class=8,
            classifier_width=8,
            classifier_feature_dim=16,
            classifier_epochs=2,
            feature_queue_size=16,
            gan_width=8,
            inliers_per_class=8,
            memo_augmentations=4,
        )
        return replace(quick, **overrides)

    def effective_sigma(self, embedding_dim: int) -> float:
        """The Phase 2 noise standard deviation for anchors of dimension ``embedding_dim``."""
        if self.sigma is not None:
            return float(self.sigma)
        return PAPER_SIGMA * math.sqrt(PAPER_EMBEDDING_DIM / embedding_dim)

    def effective_inlier_sigma(self, embedding_dim: int) -> float:
        """The DREAM-ID inlier noise standard deviation for anchors of dimension ``embedding_dim``."""
        if self.inlier_sigma is not None:
            return float(self.inlier_sigma)
        return PAPER_INLIER_SIGMA * math.sqrt(PAPER_EMBEDDING_DIM / embedding_dim)

    def effective_token_noise_std(self, embedding_dim: int, mean_token_norm: float) -> float:
        """The Table 2 (I) noise standard deviation for tokens of dimension ``embedding_dim`` and mean norm."""
        if self.token_noise_std is not None:
            return float(self.token_noise_std)
        return PAPER_SIGMA * math.sqrt(PAPER_EMBEDDING_DIM / embedding_dim) * mean_token_norm / PAPER_TOKEN_NORM

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data
