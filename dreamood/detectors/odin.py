"""ODIN: temperature scaling and input perturbation (needs gradients with respect to the inputs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import as_tensor, check_finite, check_floating, check_positive
from dreamood.detectors.base import Detector, finish_scores

__all__ = ["ODIN"]


class ODIN(Detector):
    """Maximum softmax probability at temperature ``T`` of a slightly perturbed input; higher = more ID.

    Liang, Li, Srikant. "Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks",
    ICLR 2018. The input is moved by ``epsilon`` against the gradient sign of the temperature-scaled
    cross-entropy of the predicted class, ``x' = x - epsilon * sign(grad_x CE(f(x) / T, argmax f(x)))``, and the
    score is ``max_c softmax(f(x') / T)_c`` (input components with an exactly zero gradient stay unchanged). The
    perturbation is applied in the space of the model's input: if
    the model normalises images itself, ``epsilon`` is in pixel units; otherwise in normalised units (the
    original code divides the sign by the per-channel standard deviation for that reason).

    The model is run in eval mode during scoring and each module's train/eval mode is restored afterwards;
    gradients are taken with respect to the input only, so no ``.grad`` is left on the model's parameters.

    Args:
        model: The classifier, mapping inputs ``(N, ...)`` to logits ``(N, C)``; an ``nn.Module`` or any
            differentiable callable.
        temperature: Softmax temperature ``T > 0`` (the paper uses 1000).
        epsilon: Perturbation size ``>= 0`` (0 gives temperature scaling alone).
        device: Where the model runs. ``None``: the device of the model's first parameter (the batch's device
            for a model without parameters).

    Raises:
        TypeError: If ``model`` is not callable.
        ValueError: If ``temperature`` or ``epsilon`` is out of range.
    """

    inputs = "images"
    reference = (
        "Liang, Li, Srikant. Enhancing The Reliability of Out-of-distribution Image Detection in Neural "
        "Networks. ICLR 2018."
    )

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor], Tensor],
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(device)
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        check_positive(temperature, "temperature")
        check_positive(epsilon, "epsilon", allow_zero=True)
        self.model = model
        self.temperature = temperature
        self.epsilon = epsilon

    def _params(self) -> dict[str, object]:
        return {"temperature": self.temperature, "epsilon": self.epsilon, **super()._params()}

    def score_inputs(self, x: Tensor) -> Tensor:
        """Score a batch of model inputs.

        Args:
            x: Inputs ``(N, ...)`` as the model takes them (for example images ``(N, 3, H, W)``).

        Returns:
            Scores ``(N,)`` in ``[1/C, 1]``, on the device of ``x``.

        Raises:
            TypeError: If ``x`` is not floating point.
            ValueError: If ``x`` has no batch dimension, the model does not return ``(N, C)`` logits, or a
                hyperparameter is out of range.
            NonFiniteError: If ``x`` or the model's outputs contain NaN or infinity.
        """
        check_positive(self.temperature, "temperature")
        check_positive(self.epsilon, "epsilon", allow_zero=True)
        x = as_tensor(x, "x")
        check_floating(x, "x")
        if x.dim() < 1:
            raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
        check_finite(x, "x")
        modes = (
            [(module, module.training) for module in self.model.modules()] if isinstance(self.model, nn.Module) else []
        )
        try:
            if isinstance(self.model, nn.Module):
                self.model.eval()
            scores = self._perturbed_msp(x.detach().to(self._model_device(x)))
        finally:
            for module, training in modes:
                module.training = training
        return finish_scores(scores, x, "ODIN")

    def score(self, x: Tensor) -> Tensor:
        """Same as :meth:`score_inputs`.

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            Scores ``(N,)``.
        """
        return self.score_inputs(x)

    def _model_device(self, x: Tensor) -> torch.device:
        if self.device is not None or not isinstance(self.model, nn.Module):
            return self._compute_device(x)
        parameter = next(self.model.parameters(), None)
        return x.device if parameter is None else parameter.device

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape (N, C) with N = {x.shape[0]}, got {shape}")
        check_finite(logits, "model output")
        return logits

    def _perturbed_msp(self, x: Tensor) -> Tensor:
        if self.epsilon > 0:
            with torch.enable_grad():
                x_grad = x.clone().requires_grad_(True)
                scaled = self._logits(x_grad) / self.temperature
                # Summed, not averaged: only the per-sample gradient sign matters, and a mean could underflow.
                loss = nn.functional.cross_entropy(scaled, scaled.argmax(dim=1), reduction="sum")
                (gradient,) = torch.autograd.grad(loss, x_grad)
            x = x - self.epsilon * gradient.sign()
        with torch.no_grad():
            return torch.softmax(self._logits(x) / self.temperature, dim=1).amax(dim=1)
