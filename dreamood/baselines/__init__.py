"""The paper's remaining baselines: GODIN, GAN-based outlier synthesis, and DREAM-ID's augmentation baselines.

OOD detection (DREAM-OOD Tables 1 and 3):

* GODIN (Hsu et al., CVPR 2020): :class:`GodinClassifier`, :func:`train_godin`, the :class:`GODIN` detector.
* GAN-based synthesis (Lee et al., ICLR 2018): :class:`ConfidenceGAN` with :class:`GANOutlierLoader` and
  :class:`UniformKLRegularizer` in :func:`~dreamood.training.train_classifier`.

Generalisation (DREAM-ID, Tables 4 and 5):

* RandAugment, AutoAugment, AugMix, CutMix through torchvision: :class:`AugmentedPool` (appended copies) and
  :class:`AugmentedLoader` (every batch augmented).
* DeepAugment images you supply: :func:`deepaugment_dataset`.
* Generic prompts: :func:`generate_generic_prompt_images`.
* MEMO test-time adaptation (Zhang et al., NeurIPS 2022): :class:`MEMO`.
* :func:`classification_accuracy` and :func:`rotate_images` for an accuracy table on shifted data.

Every baseline that trains a classifier trains with :func:`~dreamood.training.train_classifier`, GODIN's
weight-decay exemption and CutMix's mixed labels included, so checkpoints, ``resume``, AMP and ``torchrun`` apply
to all of them. :func:`train_supervised` is ``train_classifier`` without outliers, kept under its older name.
"""

from dreamood.baselines.augmentation import (
    AUGMENTATIONS,
    IMAGE_AUGMENTATIONS,
    AugmentedLoader,
    AugmentedPool,
    augment_image,
    augmentation_transform,
)
from dreamood.baselines.confidence_gan import (
    ConfidenceGAN,
    DCGANDiscriminator,
    DCGANGenerator,
    GANLosses,
    GANOutlierLoader,
    UniformKLRegularizer,
    kl_to_uniform,
)
from dreamood.baselines.deepaugment import deepaugment_dataset
from dreamood.baselines.generalization import classification_accuracy, rotate_images
from dreamood.baselines.generic_prompts import PlainPromptDecoder, PromptDecoder, generate_generic_prompt_images
from dreamood.baselines.godin import DEFAULT_EPSILONS, GODIN, SIMILARITIES, GodinClassifier, GodinHead, train_godin
from dreamood.baselines.memo import MEMO, marginal_entropy
from dreamood.baselines.supervised import soft_cross_entropy, train_supervised

__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_EPSILONS",
    "GODIN",
    "IMAGE_AUGMENTATIONS",
    "MEMO",
    "SIMILARITIES",
    "AugmentedLoader",
    "AugmentedPool",
    "ConfidenceGAN",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GANLosses",
    "GANOutlierLoader",
    "GodinClassifier",
    "GodinHead",
    "PlainPromptDecoder",
    "PromptDecoder",
    "UniformKLRegularizer",
    "augment_image",
    "augmentation_transform",
    "classification_accuracy",
    "deepaugment_dataset",
    "generate_generic_prompt_images",
    "kl_to_uniform",
    "marginal_entropy",
    "rotate_images",
    "soft_cross_entropy",
    "train_godin",
    "train_supervised",
]
