"""ODIN: temperature scaling and input perturbation (needs gradients with respect to the inputs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import as_tensor, check_finite, check_floating, check_positive
from dreamood.detectors.base import Detector, finish_scores

__all__ = ["ODIN", "channel_std", "scale_by_std"]


class ODIN(Detector):
    """Maximum softmax probability at temperature ``T`` of a slightly perturbed input; higher = more ID.

    Liang, Li, Srikant. "Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks",
    ICLR 2018. The input is moved by ``epsilon`` against the gradient sign of the temperature-scaled
    cross-entropy of the predicted class, ``x' = x - epsilon * sign(grad_x CE(f(x) / T, argmax f(x)))``, and the
    score is ``max_c softmax(f(x') / T)_c`` (input components with an exactly zero gradient stay unchanged). The
    perturbation is applied in the space of the model's input: if the model normalises images itself,
    ``epsilon`` is in pixel units; for a model fed normalised images, pass the normalisation's per-channel
    standard deviations as ``std`` and the step becomes ``epsilon * sign(g) / std_c`` in channel ``c``, a step of
    ``epsilon`` in pixel units, as the original code and OpenOOD do.

    The model is run in eval mode during scoring and each module's train/eval mode is restored afterwards;
    gradients are taken with respect to the input only, so no ``.grad`` is left on the model's parameters.

    Args:
        model: The classifier, mapping inputs ``(N, ...)`` to logits ``(N, C)``; an ``nn.Module`` or any
            differentiable callable.
        temperature: Softmax temperature ``T > 0`` (the paper uses 1000).
        epsilon: Perturbation size ``>= 0`` (0 gives temperature scaling alone).
        std: Per-channel standard deviations ``(C,)`` of the input normalisation (channel axis 1 of the input),
            each ``> 0``; ``None`` leaves the gradient sign undivided.
        device: Where the model runs. ``None``: the device of the model's first parameter (the batch's device
            for a model without parameters).

    Raises:
        TypeError: If ``model`` is not callable.
        ValueError: If ``temperature`` or ``epsilon`` is out of range, or ``std`` is not a 1-D sequence of
            positive finite numbers.
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
        *,
        std: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(device)
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        check_positive(temperature, "temperature")
        check_positive(epsilon, "epsilon", allow_zero=True)
        self.model = model
        self.temperature = temperature
        self.epsilon = epsilon
        self.std = None if std is None else channel_std(std)

    def _params(self) -> dict[str, object]:
        std = None if self.std is None else self.std.tolist()
        return {"temperature": self.temperature, "epsilon": self.epsilon, "std": std, **super()._params()}

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
            x = x - self.epsilon * scale_by_std(gradient.sign(), self.std)
        with torch.no_grad():
            return torch.softmax(self._logits(x) / self.temperature, dim=1).amax(dim=1)


def channel_std(std: Sequence[float] | Tensor) -> Tensor:
    """Validate per-channel standard deviations and return them as a float64 ``(C,)`` tensor.

    Args:
        std: The standard deviations, a sequence or a 1-D tensor of positive finite numbers.

    Returns:
        The float64 tensor on the CPU.

    Raises:
        ValueError: If ``std`` is not 1-D, empty, or holds a value that is not a finite number > 0.
    """
    values = torch.as_tensor(std.detach().cpu() if isinstance(std, Tensor) else list(std), dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"std must be a 1-D sequence of per-channel standard deviations, got {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise ValueError(f"std must hold finite numbers > 0, got {values.tolist()}")
    return values


def scale_by_std(step: Tensor, std: Tensor | None) -> Tensor:
    """Divide ``step`` ``(N, C, ...)`` by ``std[c]`` along its channel axis 1 (unchanged when ``std`` is None).

    Raises:
        ValueError: If the input has no channel axis or not ``len(std)`` channels.
    """
    if std is None:
        return step
    if step.dim() < 2 or step.shape[1] != std.shape[0]:
        raise ValueError(
            f"std has {std.shape[0]} channels but the inputs have shape {tuple(step.shape)} (channels on axis 1)"
        )
    shape = (1, std.shape[0]) + (1,) * (step.dim() - 2)
    return step / std.to(step.device, step.dtype).reshape(shape)
