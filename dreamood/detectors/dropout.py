"""Monte Carlo dropout: several stochastic forward passes with dropout left on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice, check_positive_int
from dreamood.detectors.base import Detector, check_images, eval_mode, finish_scores

__all__ = ["MCDropout"]

McScore = Literal["msp", "entropy", "mutual_information"]


@contextmanager
def _dropout_on(model: nn.Module) -> Iterator[None]:
    """Eval mode for the whole model except its dropout layers; every flag is restored afterwards."""
    with eval_mode(model):
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.train()
        yield


class MCDropout(Detector):
    """A score of the mean softmax over stochastic passes with dropout active; higher = more ID.

    Gal, Ghahramani. "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning",
    ICML 2016. The model runs ``passes`` times with its dropout layers in training mode (everything else, such
    as batch normalisation, in eval mode); with the per-pass softmax ``p_t`` and their mean ``p``:

    * ``"msp"``: ``max_c p_c``;
    * ``"entropy"``: ``sum_c p_c log p_c``, the negative predictive entropy;
    * ``"mutual_information"``: ``-(H(p) - mean_t H(p_t))``, the negative mutual information between the
      prediction and the weights (the epistemic part).

    Args:
        model: The classifier, images -> logits; it must contain dropout layers.
        passes: Number of stochastic passes ``T`` (the paper averages tens of them).
        score: ``"msp"``, ``"entropy"`` or ``"mutual_information"``.
        seed: Seed of the dropout masks (the global RNG is saved and restored around scoring); ``None`` uses
            the global RNG as it is.
        device: Where the model runs (``None``: the device of its first parameter).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If the model has no dropout layer, ``passes`` is not positive or ``score`` is unknown.
    """

    inputs = "images"
    reference = (
        "Gal, Ghahramani. Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning. "
        "ICML 2016."
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        passes: int = 20,
        score: McScore = "msp",
        seed: int | None = 0,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(device)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ValueError("model has no dropout layer: MC dropout needs one")
        check_positive_int(passes, "passes")
        check_choice(score, get_args(McScore), "score")
        self.model = model
        self.passes = passes
        self.score_kind: McScore = score
        self.seed = seed

    def _params(self) -> dict[str, object]:
        return {"passes": self.passes, "score": self.score_kind, "seed": self.seed, **super()._params()}

    def probabilities(self, x: Tensor) -> Tensor:
        """The softmax of every pass, ``(T, N, C)``, float64.

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            Per-pass probabilities on the model's device.
        """
        x = check_images(x)
        device = self._device_for(x, self.model)
        x = x.to(device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            with torch.no_grad(), _dropout_on(self.model):
                passes = [torch.softmax(self.model(x).to(torch.float64), dim=1) for _ in range(self.passes)]
        return torch.stack(passes)

    def score(self, x: Tensor) -> Tensor:
        """Score a batch of model inputs.

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            Scores ``(N,)`` on the device of ``x``.

        Raises:
            TypeError: If ``x`` is not floating point.
            NonFiniteError: If ``x`` or the model's outputs contain NaN or infinity.
        """
        p_t = self.probabilities(x)
        p = p_t.mean(dim=0)
        if self.score_kind == "msp":
            scores = p.amax(dim=1)
        else:
            entropy = -torch.special.xlogy(p, p).sum(dim=1)
            if self.score_kind == "entropy":
                scores = -entropy
            else:
                expected = -torch.special.xlogy(p_t, p_t).sum(dim=2).mean(dim=0)
                scores = -(entropy - expected)
        return finish_scores(scores, x, "MCDropout")
