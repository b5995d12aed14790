"""MEMO: test-time adaptation of a classifier by minimising the marginal entropy over augmentations.

Zhang, Levine, Finn. "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022. For each test
image separately: draw ``B`` augmented copies, take one optimiser step on the entropy of the *average*
prediction over the copies, predict the original image with the adapted weights, then restore the weights.
DREAM-ID (Du et al., NeurIPS 2023, Table 4) compares with it on ImageNet-100 and its shifted test sets.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import (
    as_tensor,
    check_choice,
    check_finite,
    check_floating,
    check_positive,
    check_positive_int,
    check_rank,
)
from dreamood.baselines.augmentation import augment_image, augmentation_transform

__all__ = ["MEMO", "marginal_entropy"]

_REFERENCE = "Zhang, Levine, Finn. MEMO: Test Time Robustness via Adaptation and Augmentation. NeurIPS 2022."


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the average prediction over a batch: ``H(mean_b softmax(logits_b))`` (MEMO's loss).

    Computed in log space as the MEMO code does: ``log p_bar = logsumexp_b log_softmax(logits_b) - log B``.

    Args:
        logits: Logits ``(B, C)`` of ``B`` augmented copies of one image.

    Returns:
        The scalar entropy, in nats.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor.
        ValueError: ``logits`` is not a non-empty ``(B, C)`` batch.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    check_rank(logits, 2, "logits", "of shape (B, C)")
    check_floating(logits, "logits")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty (B, C) batch, got shape {tuple(logits.shape)}")
    log_mean = torch.logsumexp(F.log_softmax(logits, dim=1), dim=0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean * log_mean.exp()).sum()


class MEMO:
    """Adapt ``model`` to each test image with one marginal-entropy step, predict it, restore ``model`` exactly.

    Zhang, Levine, Finn, NeurIPS 2022. For test image ``k`` (counted from construction or :meth:`reset`):
    ``num_augmentations`` copies ``augment(x)`` are drawn with the CPU random state seeded from
    ``(seed, k, step)``; ``steps`` optimiser steps minimise :func:`marginal_entropy` of the model's logits on
    the copies; the result is the adapted model's logits on ``x`` itself. Every parameter and buffer, each
    module's train/eval flag, ``requires_grad`` and any ``.grad`` are then put back bit for bit, and every image
    gets a fresh optimiser, so no state carries over from one image to the next (nor after the call, even when
    it raises).

    The model runs in eval mode, as in the MEMO code. With ``prior_strength = N`` every ``BatchNorm2d``
    normalises with ``N/(N+1)`` times its running statistics plus ``1/(N+1)`` times the statistics of the
    current batch (the copies while adapting, the single image while predicting; the unbiased variance, as
    ``torch.nn.functional.batch_norm`` computes it), treated as constants: the code's single-point BN
    adaptation (16 on ImageNet). A layer whose input has one value per channel keeps its running statistics.
    ``None`` uses the running statistics alone.

    Defaults are the paper's ImageNet ResNet-50 settings: 64 copies, one SGD step (no momentum) with learning
    rate ``2.5e-4``, no weight decay, prior strength 16. The default augmentation is torchvision's AugMix
    (:func:`~dreamood.baselines.augmentation_transform`); the MEMO code precedes it with a random resized crop
    and flip for ImageNet, which you can add by passing your own ``augment``.

    Use it wherever a model is expected: ``classification_accuracy(memo, loader)`` or
    ``OODEvaluator(msp_score, model=memo)`` (it enables gradients itself).

    Args:
        model: The trained classifier (images -> logits ``(N, C)``).
        augment: Maps one image ``(C, H, W)`` in ``[0, 1]`` to an augmented image (torch's global random state
            is seeded for it); ``None``: AugMix.
        preprocess: Applied to a batch of images (copies or test images) before the model, e.g. normalisation;
            ``None``: the images go to the model as they are.
        num_augmentations: Copies per test image (``B``).
        lr: Learning rate of the adaptation step.
        optimizer: ``"sgd"`` (plain SGD) or ``"adamw"`` (the code's choice for vision transformers).
        weight_decay: Weight decay of the optimiser.
        steps: Optimiser steps per test image (fresh copies at each step).
        prior_strength: ``N`` of the BatchNorm statistics mix, or ``None`` for the running statistics only.
        seed: Seed of the augmentations.
        device: Where the model runs (``None``: the device of its first parameter).
        progress: Show a progress bar over the images of each call.

    Attributes:
        num_adapted: Number of images adapted so far; the next image uses index ``num_adapted``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or a callable argument is not callable.
        ValueError: A setting is out of range.
    """

    reference = _REFERENCE

    def __init__(
        self,
        model: nn.Module,
        augment: Callable[[Tensor], Tensor] | None = None,
        *,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        num_augmentations: int = 64,
        lr: float = 2.5e-4,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        steps: int = 1,
        prior_strength: float | None = 16.0,
        seed: int = 0,
        device: DeviceLike = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("augment", augment), ("preprocess", preprocess)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        check_positive_int(num_augmentations, "num_augmentations")
        check_positive(lr, "lr")
        check_choice(optimizer, ("sgd", "adamw"), "optimizer")
        check_positive(weight_decay, "weight_decay", allow_zero=True)
        check_positive_int(steps, "steps")
        if prior_strength is not None:
            check_positive(prior_strength, "prior_strength", allow_zero=True)
        check_positive_int(seed, "seed", allow_zero=True)
        self.model = model
        self.augment = augment
        self.preprocess = preprocess
        self.num_augmentations = num_augmentations
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.steps = steps
        self.prior_strength = prior_strength
        self.seed = seed
        self.device = device
        self.progress = progress
        self.num_adapted = 0
        self._augmix: Callable[[Any], Any] | None = None

    def __repr__(self) -> str:
        return (
            f"MEMO(num_augmentations={self.num_augmentations}, lr={self.lr}, optimizer={self.optimizer!r}, "
            f"steps={self.steps}, prior_strength={self.prior_strength}, seed={self.seed})"
        )

    def reset(self) -> None:
        """Start counting images from 0 again, so the next call repeats the augmentations of the first."""
        self.num_adapted = 0

    def augmented_copies(self, image: Tensor, index: int, step: int = 0) -> Tensor:
        """The ``num_augmentations`` copies of ``image`` used at ``step`` for the ``index``-th image.

        Args:
            image: One image ``(C, H, W)`` in ``[0, 1]``.
            index: The image's position (see :attr:`num_adapted`).
            step: The adaptation step.

        Returns:
            The copies ``(num_augmentations, C, H, W)`` on the CPU, before ``preprocess``.
        """
        import numpy as np

        augment = self.augment if self.augment is not None else self._default_augment
        seed = int(np.random.SeedSequence([self.seed, index, step]).generate_state(1, np.uint64)[0] % 2**63)
        image = image.detach().cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([augment(image) for _ in range(self.num_augmentations)])

    def _default_augment(self, image: Tensor) -> Tensor:
        if self._augmix is None:
            self._augmix = augmentation_transform("augmix")
        return augment_image(image, self._augmix)

    def __call__(self, images: Tensor) -> Tensor:
        """Adapt to each image of the batch in turn and return the adapted predictions.

        Args:
            images: Test images ``(N, C, H, W)`` in ``[0, 1]`` (before ``preprocess``).

        Returns:
            Logits ``(N, num_classes)`` on the model's device; row ``n`` comes from the model adapted to image
            ``n`` alone.

        Raises:
            TypeError: ``images`` is not floating point.
            ValueError: ``images`` is not a 4-D batch, or the model does not return ``(N, C)`` logits.
            NonFiniteError: ``images`` hold NaN or infinity.
        """
        batch = as_tensor(images, "images")
        check_floating(batch, "images")
        if batch.dim() != 4:
            raise ValueError(f"images must be a batch (N, C, H, W), got shape {tuple(batch.shape)}")
        check_finite(batch, "images")
        model = self.model
        device = self._model_device()
        tensors = list(chain(model.parameters(), model.buffers()))
        saved = [t.detach().clone() for t in tensors]
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        flags = [(m, m.training) for m in model.modules()]
        outputs: list[Tensor] = []
        try:
            model.eval()
            with torch.enable_grad():
                for image in progress(batch, enabled=self.progress, desc="MEMO", total=batch.shape[0]):
                    outputs.append(self._adapt_and_predict(image, device))
                    _restore(tensors, saved)
        finally:
            _restore(tensors, saved)
            for parameter, grad in zip(model.parameters(), grads):
                parameter.grad = grad
            for module, training in flags:
                module.training = training
        return torch.cat(outputs)

    def _model_device(self) -> torch.device:
        if self.device is not None:
            return resolve_device(self.device)
        for tensor in chain(self.model.parameters(), self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _forward(self, images: Tensor, device: torch.device) -> Tensor:
        inputs = images.to(device)
        if self.preprocess is not None:
            inputs = self.preprocess(inputs)
        logits = self.model(inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape (N, C) with N = {images.shape[0]}, got {shape}")
        return logits

    def _adapt_and_predict(self, image: Tensor, device: torch.device) -> Tensor:
        index = self.num_adapted
        self.num_adapted += 1
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if self.optimizer == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        with _batchnorm_prior(self.model, self.prior_strength):
            for step in range(self.steps):
                copies = self.augmented_copies(image, index, step)
                loss = marginal_entropy(self._forward(copies, device))
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                return self._forward(image.unsqueeze(0), device).detach()


def _restore(tensors: list[Tensor], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)


@contextlib.contextmanager
def _batchnorm_prior(model: nn.Module, prior_strength: float | None) -> Iterator[None]:
    """Inside the block, every ``BatchNorm2d`` with running statistics mixes them with the batch's."""
    if prior_strength is None:
        yield
        return
    prior = prior_strength / (prior_strength + 1.0)
    patched = [
        m
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
    ]
    for module in patched:
        module.forward = functools.partial(_prior_batchnorm, module, prior)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _prior_batchnorm(module: nn.BatchNorm2d, prior: float, input: Tensor) -> Tensor:
    """``BatchNorm2d`` with statistics ``prior * running + (1 - prior) * batch`` (batch statistics as constants)."""
    assert module.running_mean is not None and module.running_var is not None
    values_per_channel = input.numel() // max(input.shape[1], 1)
    mean, var = module.running_mean, module.running_var
    if values_per_channel > 1:
        detached = input.detach()
        batch_mean = detached.mean(dim=(0, 2, 3))
        batch_var = detached.var(dim=(0, 2, 3), unbiased=True)
        mean = prior * mean + (1.0 - prior) * batch_mean
        var = prior * var + (1.0 - prior) * batch_var
    return F.batch_norm(input, mean, var, module.weight, module.bias, False, 0.0, module.eps)
