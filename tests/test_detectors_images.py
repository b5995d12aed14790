"""Detectors that need the network: RankFeat, MC dropout, multi-layer Mahalanobis, Gram matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from torch import nn

from dreamood.detectors import NotFittedError
from dreamood.detectors.distance import Mahalanobis
from dreamood.detectors.dropout import MCDropout
from dreamood.detectors.layers import Gram, MultiLayerMahalanobis, gram_features
from dreamood.detectors.rankfeat import RankFeat


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores.double().numpy(), ood_scores.double().numpy()]))


class _MeanPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


# ---------------------------------------------------------------- RankFeat


def test_rankfeat_matches_float64_svd() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=1).double()
    linear = nn.Linear(3, 4).double()
    head = nn.Sequential(_MeanPool(), linear)
    x = torch.randn(6, 2, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        maps = conv(x).numpy()
    expected = []
    for sample in maps:
        flat = sample.reshape(3, -1)
        u, s, vh = np.linalg.svd(flat, full_matrices=False)
        removed = flat - s[0] * np.outer(u[:, 0], vh[0])
        logits = linear.weight.detach().numpy() @ removed.mean(axis=1) + linear.bias.detach().numpy()
        expected.append(2.0 * logsumexp(logits / 2.0))
    detector = RankFeat(conv, head, temperature=2.0)
    np.testing.assert_allclose(detector.score(x).numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="one channel or one spatial position"):
        detector.score(torch.randn(2, 2, 1, 1, dtype=torch.float64))


def test_rankfeat_separates_an_overconfident_rank_one_ood_set() -> None:
    # ID maps: a strong background pattern on channel 4 (ignored by the head) plus a weaker class pattern on
    # channel y. OOD maps: a strong class pattern alone (rank 1): the plain energy prefers OOD; RankFeat removes
    # the background of ID maps and all of the OOD signal.
    rng = np.random.default_rng(1)
    a, b = np.array([1.0, 1, 1, 1, 0, 0]) / 2, np.array([0.0, 0, 0, 0, 1, 1]) / np.sqrt(2)
    labels = rng.integers(0, 4, size=60)
    id_maps = 0.05 * rng.normal(size=(60, 5, 6))
    id_maps[:, 4] += 6 * a
    id_maps[np.arange(60), labels] += 3 * b
    ood_maps = 0.05 * rng.normal(size=(60, 5, 6))
    ood_maps[np.arange(60), rng.integers(0, 4, size=60)] += 6 * b
    head = nn.Sequential(_MeanPool(), nn.Linear(5, 4, bias=False)).double()
    with torch.no_grad():
        head[1].weight.copy_(torch.eye(5, dtype=torch.float64)[:4] * 6)
    detector = RankFeat(nn.Identity(), head)
    id_scores, ood_scores = detector.score(torch.from_numpy(id_maps)), detector.score(torch.from_numpy(ood_maps))
    assert _auroc(id_scores, ood_scores) > 0.95
    with torch.no_grad():
        plain = [torch.logsumexp(head(torch.from_numpy(m)), dim=1) for m in (id_maps, ood_maps)]
    assert _auroc(*plain) < 0.5  # the energy alone is fooled


# ---------------------------------------------------------------- MC dropout


def _dropout_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 3), nn.BatchNorm1d(3)).double()


@pytest.mark.parametrize("kind", ["msp", "entropy", "mutual_information"])
def test_mc_dropout_matches_float64_formulas_on_the_recorded_masks(kind: str) -> None:
    model = _dropout_model(2)
    model.train()
    x = torch.randn(10, 6, dtype=torch.float64)
    recorded: list[np.ndarray] = []
    handle = model[2].register_forward_hook(lambda m, i, o: recorded.append(o.detach().numpy().copy()))
    detector = MCDropout(model, passes=7, score=kind, seed=3)  # type: ignore[arg-type]
    scores = detector.score(x).numpy()
    handle.remove()
    assert len(recorded) == 7 and [m.training for m in model.modules()] == [True] * 6  # flags restored
    bn = model[4]
    weight, bias = model[3].weight.detach().numpy(), model[3].bias.detach().numpy()
    scale = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
    p_t = np.stack(
        [
            softmax(((h @ weight.T + bias) - bn.running_mean.numpy()) * scale + bn.bias.detach().numpy(), axis=1)
            for h in recorded
        ]
    )
    p = p_t.mean(axis=0)
    entropy = -(p * np.log(p)).sum(axis=1)
    expected = {
        "msp": p.max(axis=1),
        "entropy": -entropy,
        "mutual_information": -(entropy - (-(p_t * np.log(p_t)).sum(axis=2)).mean(axis=0)),
    }[kind]
    np.testing.assert_allclose(scores, expected, rtol=1e-10)
    np.testing.assert_array_equal(detector.score(x).numpy(), scores)  # the seed fixes the masks
    assert any(not np.array_equal(recorded[0], r) for r in recorded[1:])  # the passes differ


def test_mc_dropout_separates_and_validates() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=80)
    id_x = 4.0 * np.eye(6)[labels] + 0.3 * rng.normal(size=(80, 6))
    ood_x = 0.3 * rng.normal(size=(80, 6))
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(6, dtype=torch.float64))
        model[0].bias.zero_()
        model[2].weight.copy_(2 * torch.eye(6, dtype=torch.float64)[:3])
        model[2].bias.zero_()
    detector = MCDropout(model, passes=10)
    assert _auroc(detector.score(torch.from_numpy(id_x)), detector.score(torch.from_numpy(ood_x))) > 0.95
    with pytest.raises(ValueError, match="model has no dropout layer"):
        MCDropout(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="score must be one of"):
        MCDropout(model, score="variance")  # type: ignore[arg-type]


# ---------------------------------------------------------------- multi-layer Mahalanobis


def _gaussian_reference(features: np.ndarray, labels: np.ndarray):
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    precision = EmpiricalCovariance(assume_centered=True).fit(features - means[labels]).precision_
    return means, precision


def test_multilayer_mahalanobis_input_preprocessing_matches_the_analytic_gradient() -> None:
    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    train = rng.normal(size=(90, 4))
    labels = np.arange(3).repeat(30)
    train[:, :3] += 3 * np.eye(3)[labels]
    test = rng.normal(size=(12, 4))
    weight, bias = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    means, precision = _gaussian_reference(train @ weight.T + bias, labels)
    std, epsilon = np.array([0.5, 1.0, 2.0, 0.25]), 0.05

    def confidence(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = x @ weight.T + bias
        distances = np.stack([np.einsum("nd,de,ne->n", f - mu, precision, f - mu) for mu in means], axis=1)
        return -distances.min(axis=1), distances.argmin(axis=1)

    _, closest = confidence(test)
    # d/dx -(f - mu)^T P (f - mu) = -2 W^T P (f - mu) for f = W x + b
    gradient = -2 * ((test @ weight.T + bias - means[closest]) @ precision) @ weight
    expected, _ = confidence(test + epsilon * np.sign(gradient) / std)
    loader = [(torch.from_numpy(train[i : i + 25]), torch.from_numpy(labels[i : i + 25])) for i in range(0, 90, 25)]
    detector = MultiLayerMahalanobis(model, [model[0]], epsilon=epsilon, std=std.tolist()).fit_loader(loader)
    np.testing.assert_allclose(detector.means_[0].numpy(), means, rtol=1e-10)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test)).numpy(), expected, rtol=1e-8)
    assert all(p.grad is None for p in model.parameters())


def test_multilayer_mahalanobis_without_perturbation_sums_layer_mahalanobis_scores() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU())
    images, labels = torch.randn(40, 1, 5, 5), torch.arange(4).repeat(10)
    detector = MultiLayerMahalanobis(model, [model[1], model[3]], weights=[1.0, 0.5]).fit(images, labels)
    test = torch.randn(7, 1, 5, 5)
    with torch.no_grad():
        first, second = model[:2](images).mean(dim=(2, 3)), model(images).mean(dim=(2, 3))
        test_first, test_second = model[:2](test).mean(dim=(2, 3)), model(test).mean(dim=(2, 3))
    expected = Mahalanobis().fit(first, labels).score(test_first.double()) + 0.5 * Mahalanobis().fit(
        second, labels
    ).score(test_second.double())
    torch.testing.assert_close(detector.score(test).double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(NotFittedError):
        MultiLayerMahalanobis(model, [model[1]]).score(test)
    with pytest.raises(ValueError, match=r"layers\[0\] must be a submodule of model"):
        MultiLayerMahalanobis(model, [nn.ReLU()])
    with pytest.raises(ValueError, match="weights must have one entry per layer"):
        MultiLayerMahalanobis(model, [model[1]], weights=[1.0, 2.0])


def test_multilayer_mahalanobis_separates_gaussians() -> None:
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 40)
    as_t = torch.from_numpy
    train = 5 * np.eye(6)[labels] + 0.3 * rng.normal(size=(120, 6))
    test = 5 * np.eye(6)[labels] + 0.3 * rng.normal(size=(120, 6))
    ood = 5 * np.eye(6)[4] + 0.3 * rng.normal(size=(120, 6))
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    detector = MultiLayerMahalanobis(model, [model[0], model[1]], epsilon=0.001).fit(as_t(train), as_t(labels))
    assert _auroc(detector.score(as_t(test)), detector.score(as_t(ood))) > 0.95


# ---------------------------------------------------------------- Gram matrices


def test_gram_features_and_deviations_match_float64_formulas() -> None:
    rng = np.random.default_rng(8)
    maps = rng.normal(size=(3, 2, 4))
    expected = []
    for p in (1, 2, 3):
        fp = maps**p
        rows = np.einsum("ncl,ndl->ncd", fp, fp).sum(axis=2)
        expected.append(np.sign(rows) * np.abs(rows) ** (1 / p))
    np.testing.assert_allclose(gram_features(torch.from_numpy(maps), 3).numpy(), np.stack(expected, axis=1), rtol=1e-12)

    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), _MeanPool(), nn.Linear(2, 2)).double()
    train, test = torch.randn(30, 1, 4, 4, dtype=torch.float64), 1.5 * torch.randn(8, 1, 4, 4, dtype=torch.float64)
    detector = Gram(model, [model[0], model[1]], powers=3).fit_loader([train[:13], (train[13:], None)])
    with torch.no_grad():
        predicted_train, predicted_test = model(train).argmax(1).numpy(), model(test).argmax(1).numpy()
        layers_train = [model[0](train).numpy(), model[:2](train).numpy()]
        layers_test = [model[0](test).numpy(), model[:2](test).numpy()]
    total = np.zeros(8)
    for fit_maps, test_maps in zip(layers_train, layers_test):
        g_fit = gram_features(torch.from_numpy(fit_maps), 3).numpy()
        g_test = gram_features(torch.from_numpy(test_maps), 3).numpy()
        for i, k in enumerate(predicted_test):
            lo, hi = g_fit[predicted_train == k].min(axis=0), g_fit[predicted_train == k].max(axis=0)
            v = g_test[i]
            total[i] += (np.maximum(lo - v, 0) / np.abs(lo + 1e-6) + np.maximum(v - hi, 0) / np.abs(hi + 1e-6)).sum()
    np.testing.assert_allclose(detector.score(test).numpy(), -total, rtol=1e-10)
    detector.fit_normalizer([test])
    np.testing.assert_allclose(detector.normalizer_.numpy(), detector.layer_deviations(test).mean(dim=0).numpy())


def test_gram_separates_shifted_images() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), _MeanPool(), nn.Linear(3, 2))
    train, test = torch.randn(200, 1, 6, 6), torch.randn(60, 1, 6, 6)
    ood = 3 * torch.randn(60, 1, 6, 6) + 1
    detector = Gram(model, [model[0], model[1]], powers=4).fit_loader(train.split(50))
    assert _auroc(detector.score(test), detector.score(ood)) > 0.95


def test_multilayer_mahalanobis_weights_from_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(3), 30)
    as_t = torch.from_numpy
    train = 5 * np.eye(6)[labels] + 0.3 * rng.normal(size=(90, 6))
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    detector = MultiLayerMahalanobis(model, [model[0], model[1]]).fit(as_t(train), as_t(labels))
    id_val = as_t(5 * np.eye(6)[labels[:40]] + 0.3 * rng.normal(size=(40, 6)))
    ood_val = as_t(5 * np.eye(6)[4] + 0.3 * rng.normal(size=(40, 6)))
    detector.fit_weights(id_val, ood_val)
    columns = torch.cat([detector.layer_scores(id_val), detector.layer_scores(ood_val)]).numpy()
    expected = LogisticRegression(max_iter=1000).fit(columns, [1] * 40 + [0] * 40).coef_[0]
    np.testing.assert_allclose(detector.weights, expected)
    np.testing.assert_allclose(detector.score(id_val).numpy(), columns[:40] @ expected, rtol=1e-12)
