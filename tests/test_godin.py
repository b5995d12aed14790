"""GODIN: the decomposed-confidence head against float64 formulas, the input pre-processing against the analytic
gradient, epsilon selection on ID data, and training without weight decay on h."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics.pairwise import cosine_similarity
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.baselines import GODIN, GodinClassifier, GodinHead, train_godin
from dreamood.detectors import NotFittedError
from dreamood.evaluation import OODEvaluator, max_logit_score
from dreamood.models import SmallConvNet
from dreamood.training import TrainingConfig


class FlatFeatures(nn.Module):
    """Identity backbone on flattened inputs, so the features are the pixels and gradients are analytic."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def _h_numpy(features: np.ndarray, weight: np.ndarray, similarity: str) -> np.ndarray:
    if similarity == "cosine":
        return cosine_similarity(features, weight)
    if similarity == "inner":
        return features @ weight.T
    return -((features[:, None, :] - weight[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("similarity", ["cosine", "inner", "euclidean"])
def test_similarities_match_float64_formulas(similarity: str) -> None:
    head = GodinHead(4, 3, similarity, seed=1).double()
    features = torch.randn(6, 4, dtype=torch.float64)
    expected = _h_numpy(features.numpy(), head.weight.detach().numpy(), similarity)
    np.testing.assert_allclose(head.similarities(features).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_denominator_and_quotient_follow_the_paper() -> None:
    head = GodinHead(4, 3, "cosine", seed=2).double().eval()
    head.g_norm.running_mean.fill_(0.3)
    head.g_norm.running_var.fill_(2.0)
    with torch.no_grad():
        head.g_norm.weight.fill_(1.5)
        head.g_norm.bias.fill_(-0.2)
    features = torch.randn(5, 4, dtype=torch.float64)
    f = features.numpy()
    w_g = head.g_linear.weight.detach().numpy()[0]
    b_g = float(head.g_linear.bias.detach()[0])
    normed = (f @ w_g + b_g - 0.3) / np.sqrt(2.0 + head.g_norm.eps) * 1.5 - 0.2
    g = 1.0 / (1.0 + np.exp(-normed))
    h = cosine_similarity(f, head.weight.detach().numpy())
    np.testing.assert_allclose(head.denominator(features).detach().numpy(), g, rtol=1e-12)
    np.testing.assert_allclose(head(features).detach().numpy(), h / g[:, None], rtol=1e-12)


def test_classifier_predicts_argmax_h_and_validates() -> None:
    model = GodinClassifier(SmallConvNet(1, 8, width=4, seed=0), 3, seed=0).eval()
    images = torch.rand(7, 1, 8, 8)
    logits = model(images)
    h, g = model.decompose(images)
    assert logits.shape == (7, 3) and h.shape == (7, 3) and g.shape == (7,)
    assert bool(((g > 0) & (g < 1)).all())
    assert torch.equal(logits.argmax(1), h.argmax(1))
    torch.testing.assert_close(model.similarity_model()(images), model.similarities(images))
    with pytest.raises(ValueError, match="similarity"):
        GodinHead(4, 3, "manhattan")
    with pytest.raises(ValueError, match="feature_dim"):
        GodinClassifier(nn.Flatten(), 3)


def _analytic_scores(x: np.ndarray, weight: np.ndarray, epsilon: float) -> np.ndarray:
    """max_i cos(w_i, x') with x' = x + eps * sign(grad_x max_i cos(w_i, x)), computed by hand in float64."""
    h = cosine_similarity(x, weight)
    k = h.argmax(axis=1)
    norm_x = np.linalg.norm(x, axis=1, keepdims=True)
    w_k = weight[k]
    gradient = w_k / (np.linalg.norm(w_k, axis=1, keepdims=True) * norm_x) - h[np.arange(len(x)), k][:, None] * x / (
        norm_x**2
    )
    moved = x + epsilon * np.sign(gradient)
    return cosine_similarity(moved, weight).max(axis=1)


@given(seed=st.integers(0, 10_000), epsilon=st.sampled_from([0.0, 0.01, 0.08]))
@settings(max_examples=15, deadline=None)
def test_preprocessing_matches_the_analytic_gradient(seed: int, epsilon: float) -> None:
    torch.manual_seed(seed)
    model = GodinClassifier(FlatFeatures(6), 4, seed=seed).double()
    x = torch.randn(5, 1, 2, 3, dtype=torch.float64)
    detector = GODIN(model, epsilons=(epsilon,)).fit(x)
    expected = _analytic_scores(x.flatten(1).numpy(), model.head.weight.detach().numpy(), epsilon)
    np.testing.assert_allclose(detector.score(x).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_fit_picks_the_largest_mean_validation_score_and_restores_the_model() -> None:
    torch.manual_seed(3)
    model = GodinClassifier(FlatFeatures(6), 4, seed=3).double().train()
    validation = torch.randn(20, 6, dtype=torch.float64)
    grid = (0.0, 0.005, 0.02, 0.3, 2.0)
    detector = GODIN(model, epsilons=grid, batch_size=7).fit(validation)
    weight = model.head.weight.detach().numpy()
    means = {e: float(_analytic_scores(validation.numpy(), weight, e).mean()) for e in grid}
    assert detector.epsilon_ == max(grid, key=lambda e: means[e])
    for epsilon in grid:
        assert detector.validation_scores_[epsilon] == pytest.approx(means[epsilon], rel=1e-10)
    # The same choice from a loader of (images, labels) batches.
    loader = DataLoader(TensorDataset(validation, torch.zeros(20, dtype=torch.long)), batch_size=6)
    assert GODIN(model, epsilons=grid).fit(loader).validation_scores_ == pytest.approx(detector.validation_scores_)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_detector_errors() -> None:
    model = GodinClassifier(FlatFeatures(6), 4, seed=0)
    with pytest.raises(NotFittedError):
        GODIN(model).score(torch.randn(2, 6))
    with pytest.raises(ValueError, match="epsilons"):
        GODIN(model, epsilons=())
    with pytest.raises(ValueError, match="epsilons"):
        GODIN(model, epsilons=(0.01, -0.1))
    with pytest.raises(TypeError, match="floating"):
        GODIN(model, epsilons=(0.0,)).fit(torch.ones(2, 6, dtype=torch.long))


def test_evaluator_rows_from_the_similarity_model_and_the_detector() -> None:
    torch.manual_seed(4)
    model = GodinClassifier(SmallConvNet(1, 8, width=4, seed=4), 3, seed=4)
    images, labels = torch.rand(12, 1, 8, 8), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    ood = DataLoader(TensorDataset(torch.rand(9, 1, 8, 8)), batch_size=5)
    report = OODEvaluator(max_logit_score, model=model.similarity_model(), progress=False).evaluate(loader, {"n": ood})
    model.eval()
    with torch.no_grad():
        h = model.similarities(images)
    assert report.id_accuracy == pytest.approx(float((h.argmax(1) == labels).float().mean()))
    detector = GODIN(model, epsilons=(0.0,)).fit(images)
    scores = OODEvaluator(detector, progress=False).compute_scores(loader)
    torch.testing.assert_close(scores, h.amax(1))


def test_train_godin_applies_no_weight_decay_to_h() -> None:
    torch.manual_seed(5)
    model = GodinClassifier(SmallConvNet(1, 8, width=4, seed=5), 3, seed=5)
    images, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    lr, momentum, decay = 0.1, 0.9, 0.5
    reference = copy.deepcopy(model).train()
    loss = nn.functional.cross_entropy(reference(images), labels)
    grads = dict(
        zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(loss, list(reference.parameters())))
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    result = train_godin(
        model,
        loader,
        TrainingConfig(epochs=1, lr=lr, momentum=momentum, weight_decay=decay, min_lr=0.0),
        device="cpu",
        progress=False,
    )
    assert result.final.steps == 1
    assert result.final.ce_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, parameter in model.named_parameters():
        # First Nesterov SGD step: p - lr * (1 + momentum) * (grad + decay * p), with decay 0 for h's weights.
        d_p = grads[name] + (0.0 if name == "head.weight" else decay) * before[name]
        torch.testing.assert_close(parameter.detach(), before[name] - lr * (1 + momentum) * d_p, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="GodinClassifier"):
        train_godin(nn.Linear(2, 2), loader, TrainingConfig(epochs=1))  # type: ignore[arg-type]
