"""Detectors on several intermediate feature maps: multi-layer Mahalanobis (with input pre-processing) and Gram.

Both read the outputs of chosen modules of the network through forward hooks, so any ``nn.Module`` works; and
both learn from in-distribution data batch by batch with ``fit_loader`` (``fit`` takes one batch of images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dreamood._utils import DeviceLike
from dreamood._validation import as_tensor, check_positive, check_positive_int
from dreamood.detectors.base import Detector, check_images, check_labels, eval_mode, finish_scores
from dreamood.detectors.distance import squared_mahalanobis, symmetric_pinv
from dreamood.detectors.odin import channel_std, scale_by_std

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Gram", "MultiLayerMahalanobis", "capture_outputs"]


@contextmanager
def capture_outputs(layers: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Record the output of each module of ``layers`` during the forward passes run inside the block.

    Args:
        layers: The modules to listen to.

    Yields:
        A list that holds, after a forward pass, the outputs of the modules in ``layers`` order (each pass
        overwrites them).
    """
    outputs: list[Tensor] = []
    slots: dict[int, Tensor] = {}

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {index} returned {type(output).__name__}, expected a tensor")
            slots[index] = output
            if len(slots) == len(layers):
                outputs[:] = [slots[i] for i in range(len(layers))]

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _pooled(output: Tensor) -> Tensor:
    """A layer output as ``(N, C)``: the mean over its spatial axes (unchanged when already 2-D)."""
    return output.flatten(2).mean(dim=2) if output.dim() > 2 else output


def _check_layers(model: nn.Module, layers: Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers is empty: give the modules whose outputs the detector reads")
    own = {id(m) for m in model.modules()}
    for index, layer in enumerate(layers):
        if not isinstance(layer, nn.Module) or id(layer) not in own:
            raise ValueError(f"layers[{index}] must be a submodule of model, got {type(layer).__name__}")
    return layers


def _batches(loader: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor | None]]:
    from dreamood.evaluation.evaluator import _split_batch

    for batch in loader:
        images, labels = _split_batch(batch)
        yield images, None if labels is None else as_tensor(labels, "labels")


class MultiLayerMahalanobis(Detector):
    """Weighted sum over layers of Mahalanobis confidences after input pre-processing; higher = more ID.

    Lee, Lee, Lee, Shin. "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018 (the full method). For each chosen layer ``l`` the output is averaged over its
    spatial axes to ``f_l(x)`` (``(N, C_l)``); ``fit_loader`` estimates class means ``mu_{l,c}`` and a tied
    covariance per layer (float64). The layer confidence is ``M_l(x) = max_c -(f_l(x) - mu_{l,c})^T S_l^+
    (f_l(x) - mu_{l,c})``. With ``epsilon > 0`` the input is first moved to raise it,
    ``x' = x + epsilon * sign(grad_x M_l(x)) / std`` (one perturbation per layer, ``std`` the per-channel input
    standard deviation, as the authors' code), and ``score(x) = sum_l w_l M_l(x')`` (the paper's factor 1/2 on
    the distance, a common scale, is left out). The paper learns the weights ``w_l`` by logistic regression on
    validation data: pass them as ``weights`` (default: equal) or learn them with :meth:`fit_weights`.

    Args:
        model: The classifier (an ``nn.Module``), run in eval mode.
        layers: Submodules of ``model`` whose outputs are the feature maps, in order.
        epsilon: Input step ``>= 0`` (the paper picks one of 0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01).
        std: Per-channel standard deviations of the input normalisation (``None``: no division).
        weights: One weight per layer (``None``: all 1).
        device: Where the model runs (``None``: the device of its first parameter).

    Attributes:
        classes_: Sorted distinct labels ``(C,)``.
        means_: Class means per layer, a list of ``(C, C_l)`` float64 tensors.
        precisions_: Tied precision matrix per layer, a list of ``(C_l, C_l)`` float64 tensors.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If ``layers`` is empty or holds a module outside ``model``, ``epsilon`` is negative,
            ``std`` is malformed or ``weights`` does not have one entry per layer.
    """

    inputs = "images"
    reference = (
        "Lee, Lee, Lee, Shin. A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
        "Adversarial Attacks. NeurIPS 2018."
    )

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module],
        *,
        epsilon: float = 0.0,
        std: Sequence[float] | Tensor | None = None,
        weights: Sequence[float] | None = None,
        device: DeviceLike = None,
    ) -> None:
        super().__init__(device)
        self.layers = _check_layers(model, layers)
        check_positive(epsilon, "epsilon", allow_zero=True)
        if weights is not None and len(weights) != len(self.layers):
            raise ValueError(f"weights must have one entry per layer ({len(self.layers)}), got {len(weights)}")
        self.model = model
        self.epsilon = epsilon
        self.std = None if std is None else channel_std(std)
        self.weights = None if weights is None else [float(w) for w in weights]

    def _params(self) -> dict[str, object]:
        return {"layers": len(self.layers), "epsilon": self.epsilon, "weights": self.weights, **super()._params()}

    def _layer_features(self, x: Tensor) -> list[Tensor]:
        with capture_outputs(self.layers) as outputs:
            self.model(x)
            return [_pooled(output) for output in outputs]

    def fit(self, x: Tensor, labels: Tensor | None = None) -> Self:
        """Estimate the class Gaussians of every layer from one batch of ID images.

        Args:
            x: ID images ``(N, ...)``.
            labels: Their integer labels ``(N,)`` (required).

        Returns:
            ``self``.
        """
        return self.fit_loader([(x, check_labels(labels, as_tensor(x, "x").shape[0]))])

    def fit_loader(self, loader: Iterable[Any]) -> Self:
        """Estimate the class Gaussians of every layer from ``(images, labels)`` batches, in one pass.

        Per layer, the class sums and the sum of outer products are accumulated in float64; the tied
        covariance is ``1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T``.

        Args:
            loader: Iterable of ``(images, labels)`` batches of ID training data.

        Returns:
            ``self``.

        Raises:
            ValueError: If a batch has no labels, the loader is empty, or a covariance is zero.
        """
        sums: list[dict[int, Tensor]] = [{} for _ in self.layers]
        counts: dict[int, int] = {}
        outer: list[Tensor | None] = [None for _ in self.layers]
        with torch.no_grad(), eval_mode(self.model):
            for images, labels in _batches(loader):
                images = check_images(images, "images")
                labels = check_labels(labels, images.shape[0])
                device = self._device_for(images, self.model)
                features = self._layer_features(images.to(device))
                for index, feature in enumerate(features):
                    f = feature.to(torch.float64)
                    product = f.T @ f
                    outer[index] = product if outer[index] is None else outer[index] + product  # type: ignore[operator]
                    for label in torch.unique(labels).tolist():
                        rows = f[(labels == label).to(f.device)]
                        total = rows.sum(dim=0)
                        sums[index][label] = sums[index][label] + total if label in sums[index] else total
                for label, count in zip(*torch.unique(labels, return_counts=True)):
                    counts[int(label)] = counts.get(int(label), 0) + int(count)
        if not counts:
            raise ValueError("the fit loader yielded no batches")
        classes = sorted(counts)
        n = sum(counts.values())
        n_c = torch.tensor([counts[c] for c in classes], dtype=torch.float64)
        self.classes_ = torch.tensor(classes)
        self.means_, self.precisions_ = [], []
        for index in range(len(self.layers)):
            class_sums = torch.stack([sums[index][c] for c in classes])
            means = class_sums / n_c.to(class_sums.device).unsqueeze(1)
            scatter = outer[index]
            assert scatter is not None
            # sum_i (f_i - mu_y)(f_i - mu_y)^T = sum_i f_i f_i^T - sum_c n_c mu_c mu_c^T
            within = scatter - (means * n_c.to(means.device).unsqueeze(1)).T @ means
            self.means_.append(means)
            self.precisions_.append(symmetric_pinv((within + within.T) / (2 * n)))
        return self

    def _confidence(self, feature: Tensor, index: int) -> Tensor:
        means, precision = self.means_[index].to(feature.device), self.precisions_[index].to(feature.device)
        return -squared_mahalanobis(feature.to(torch.float64), means, precision).amin(dim=1)

    def layer_scores(self, x: Tensor) -> Tensor:
        """The per-layer confidences ``M_l(x')`` after each layer's input pre-processing, ``(N, L)`` float64.

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            The confidences, on the model's device.

        Raises:
            NotFittedError: If neither :meth:`fit` nor :meth:`fit_loader` has been called.
        """
        self._check_fitted("precisions_")
        x = check_images(x)
        x = x.to(self._device_for(x, self.model))
        columns = []
        with eval_mode(self.model):
            for index in range(len(self.layers)):
                inputs = x
                if self.epsilon > 0:
                    with torch.enable_grad():
                        x_grad = x.clone().requires_grad_(True)
                        confidence = self._confidence(self._layer_features(x_grad)[index], index)
                        (gradient,) = torch.autograd.grad(confidence.sum(), x_grad)
                    inputs = x + self.epsilon * scale_by_std(gradient.sign(), self.std)
                with torch.no_grad():
                    columns.append(self._confidence(self._layer_features(inputs)[index], index))
        return torch.stack(columns, dim=1)

    def fit_weights(self, id_inputs: Tensor, ood_inputs: Tensor, *, seed: int = 0) -> Self:
        """Learn the layer weights by logistic regression of ID (1) against OOD (0) validation inputs.

        The paper's ensemble: a logistic regression on the per-layer confidences of held-out ID inputs and of
        validation outliers (or adversarial examples), whose coefficients become ``weights``. This uses
        scikit-learn's ``LogisticRegression`` with its default L2 strength (``C=1``); the authors' code
        cross-validates ``C`` (``LogisticRegressionCV``).

        Args:
            id_inputs: Held-out ID inputs ``(N, ...)``.
            ood_inputs: Validation OOD inputs ``(M, ...)``.
            seed: Seed of the solver.

        Returns:
            ``self``.

        Raises:
            NotFittedError: If the class Gaussians are not fitted yet.
        """
        from sklearn.linear_model import LogisticRegression

        features = torch.cat([self.layer_scores(id_inputs), self.layer_scores(ood_inputs)]).cpu().numpy()
        target = [1] * id_inputs.shape[0] + [0] * ood_inputs.shape[0]
        regression = LogisticRegression(random_state=seed, max_iter=1000).fit(features, target)
        self.weights = [float(w) for w in regression.coef_[0]]
        return self

    def score(self, x: Tensor) -> Tensor:
        """Score a batch of model inputs.

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            Scores ``(N,)`` on the device of ``x``.

        Raises:
            NotFittedError: If the detector is not fitted.
            TypeError: If ``x`` is not floating point.
            NonFiniteError: If ``x`` or the scores contain NaN or infinity.
        """
        scores = self.layer_scores(x)
        weights = (
            torch.ones(scores.shape[1], dtype=torch.float64)
            if self.weights is None
            else torch.tensor(self.weights, dtype=torch.float64)
        )
        return finish_scores(scores @ weights.to(scores.device), as_tensor(x, "x"), "MultiLayerMahalanobis")


def gram_features(output: Tensor, powers: int) -> Tensor:
    """Row sums of the ``p``-th order Gram matrices of a feature map, ``(N, powers, C)``, float64.

    For ``F`` the ``C x HW`` map of one sample and ``p = 1..powers``: ``G_p = F^p (F^p)^T`` (entrywise powers),
    its row sums ``r = G_p 1`` and the signed root ``sign(r) |r|^(1/p)``, as the authors' code.

    Args:
        output: Layer output ``(N, C, ...)`` (a 2-D output counts as one position).
        powers: Highest order ``P``.

    Returns:
        The values ``(N, P, C)``.
    """
    flat = output.to(torch.float64)
    flat = flat.reshape(flat.shape[0], flat.shape[1], -1)
    values = []
    for p in range(1, powers + 1):
        fp = flat.pow(p)
        rows = (fp @ fp.transpose(1, 2)).sum(dim=2)
        values.append(rows.sign() * rows.abs().pow(1.0 / p))
    return torch.stack(values, dim=1)


class Gram(Detector):
    """Negative normalised deviation of Gram-matrix statistics from their ID range; higher = more ID.

    Sastry, Oore. "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020. For each chosen layer
    and order ``p = 1..powers`` the values of :func:`gram_features` are compared with their minimum and maximum
    over the fit samples *predicted* as the same class: a value ``v`` outside ``[lo, hi]`` deviates by
    ``(lo - v) / |lo + 1e-6|`` or ``(v - hi) / |hi + 1e-6|``. A layer's deviation is the sum over orders and
    channels; ``score(x) = -sum_l dev_l(x) / E[dev_l]``, where ``E[dev_l]`` is the mean deviation of held-out
    ID data (:meth:`fit_normalizer`; 1 until it is called).

    Args:
        model: The classifier (an ``nn.Module`` returning logits), run in eval mode.
        layers: Submodules of ``model`` whose outputs are the feature maps.
        powers: Highest Gram order ``P`` (paper: 10).
        device: Where the model runs (``None``: the device of its first parameter).

    Attributes:
        mins_: Per layer, the minima ``(K, P, C_l)`` by predicted class (``+inf`` for classes never predicted).
        maxs_: Per layer, the maxima ``(K, P, C_l)``.
        normalizer_: Per layer expected deviation ``(L,)`` (ones until :meth:`fit_normalizer`).

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If ``layers`` is empty or holds a module outside ``model``, or ``powers`` is not positive.
    """

    inputs = "images"
    reference = "Sastry, Oore. Detecting Out-of-Distribution Examples with Gram Matrices. ICML 2020."

    def __init__(
        self, model: nn.Module, layers: Sequence[nn.Module], *, powers: int = 10, device: DeviceLike = None
    ) -> None:
        super().__init__(device)
        self.layers = _check_layers(model, layers)
        check_positive_int(powers, "powers")
        self.model = model
        self.powers = powers

    def _params(self) -> dict[str, object]:
        return {"layers": len(self.layers), "powers": self.powers, **super()._params()}

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], int]:
        """Predicted classes, the Gram values of every layer, and the number of classes."""
        device = self._device_for(x, self.model)
        with torch.no_grad(), eval_mode(self.model), capture_outputs(self.layers) as outputs:
            logits = self.model(x.to(device))
            values = [gram_features(output, self.powers) for output in outputs]
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError("model must return logits of shape (N, K)")
        return logits.argmax(dim=1), values, logits.shape[1]

    def fit(self, x: Tensor, labels: Tensor | None = None) -> Self:
        """Record the ranges from one batch of ID images (labels are ignored: classes are predicted).

        Args:
            x: ID images ``(N, ...)``.
            labels: Ignored.

        Returns:
            ``self``.
        """
        return self.fit_loader([x])

    def fit_loader(self, loader: Iterable[Any]) -> Self:
        """Record, per predicted class, layer and order, the range of the Gram values of ID training data.

        Args:
            loader: Iterable of image batches or ``(images, labels)`` batches (labels are ignored).

        Returns:
            ``self``.

        Raises:
            ValueError: If the loader is empty.
        """
        mins: list[Tensor] = []
        maxs: list[Tensor] = []
        for images, _ in _batches(loader):
            predicted, values, n_classes = self._forward(check_images(images, "images"))
            if not mins:
                for value in values:
                    shape = (n_classes, *value.shape[1:])
                    mins.append(torch.full(shape, float("inf"), dtype=torch.float64, device=value.device))
                    maxs.append(torch.full(shape, float("-inf"), dtype=torch.float64, device=value.device))
            for index, value in enumerate(values):
                rows = predicted.to(value.device).view(-1, 1, 1).expand_as(value)
                mins[index].scatter_reduce_(0, rows, value, reduce="amin")
                maxs[index].scatter_reduce_(0, rows, value, reduce="amax")
        if not mins:
            raise ValueError("the fit loader yielded no batches")
        self.mins_, self.maxs_ = mins, maxs
        self.normalizer_ = torch.ones(len(self.layers), dtype=torch.float64)
        return self

    def layer_deviations(self, x: Tensor) -> Tensor:
        """The deviation of every layer, ``(N, L)``, float64 (before normalisation).

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            The deviations on the model's device.

        Raises:
            NotFittedError: If :meth:`fit_loader` has not been called.
            ValueError: If a sample is predicted as a class that no fit sample was predicted as.
        """
        self._check_fitted("mins_")
        predicted, values, _ = self._forward(check_images(x))
        columns = []
        for index, value in enumerate(values):
            lo, hi = self.mins_[index][predicted.to(value.device)], self.maxs_[index][predicted.to(value.device)]
            if not bool(torch.isfinite(lo).all()):
                raise ValueError("a sample is predicted as a class that no fit sample was predicted as")
            below = torch.relu(lo - value) / (lo + 1e-6).abs()
            above = torch.relu(value - hi) / (hi + 1e-6).abs()
            columns.append((below + above).sum(dim=(1, 2)))
        return torch.stack(columns, dim=1)

    def fit_normalizer(self, loader: Iterable[Any]) -> Self:
        """Set each layer's expected deviation from held-out ID images (not the fit data: it deviates by 0).

        Args:
            loader: Iterable of image batches or ``(images, labels)`` batches of held-out ID data.

        Returns:
            ``self``.

        Raises:
            ValueError: If the loader is empty or a layer's mean deviation is 0.
        """
        deviations = [self.layer_deviations(images) for images, _ in _batches(loader)]
        if not deviations:
            raise ValueError("the loader yielded no batches")
        mean = torch.cat(deviations).mean(dim=0).cpu()
        if bool((mean <= 0).any()):
            raise ValueError(f"a layer's held-out deviation is 0 ({mean.tolist()}); use more or other held-out data")
        self.normalizer_ = mean
        return self

    def score(self, x: Tensor) -> Tensor:
        """Score a batch of model inputs.

        Args:
            x: Model inputs ``(N, ...)``.

        Returns:
            Scores ``(N,)`` (``<= 0``) on the device of ``x``.

        Raises:
            NotFittedError: If the detector is not fitted.
            TypeError: If ``x`` is not floating point.
            NonFiniteError: If ``x`` or the scores contain NaN or infinity.
        """
        deviations = self.layer_deviations(x)
        total = (deviations / self.normalizer_.to(deviations.device)).sum(dim=1)
        return finish_scores(-total, as_tensor(x, "x"), "Gram")
