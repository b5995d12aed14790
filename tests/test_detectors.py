"""Post-hoc detectors: float64 from-scratch formulas, separation of Gaussians, state and model hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from torch import nn

from dreamood.detectors import DICE, KNN, MSP, ODIN, Detector, Energy, Mahalanobis, MaxLogit, NotFittedError, ReAct, ViM
from dreamood.detectors.base import linear_parameters, percentile_of
from dreamood.detectors.distance import symmetric_pinv
from dreamood.detectors.vim import default_principal_dim
from dreamood.errors import NonFiniteError
from dreamood.evaluation import SupportsScore
from dreamood.protocols import Scorer

N_CLASSES, DIM = 4, 8


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_head(seed: int, n_classes: int = N_CLASSES, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    return rng.normal(size=(n_classes, dim)), rng.normal(size=n_classes)


def _separated_data(seed: int, n_per_class: int = 60):
    """ID: class c near 5 e_c; OOD: near 5 e_4, a direction the classifier (W ~ e_c) ignores."""
    rng = _rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    means = 5.0 * np.eye(DIM)[:N_CLASSES]
    id_train = means[labels] + 0.3 * rng.normal(size=(labels.size, DIM))
    id_test = means[labels] + 0.3 * rng.normal(size=(labels.size, DIM))
    ood = 5.0 * np.eye(DIM)[N_CLASSES] + 0.3 * rng.normal(size=(labels.size, DIM))
    weight = np.eye(DIM)[:N_CLASSES] + 0.05 * rng.normal(size=(N_CLASSES, DIM))
    bias = 0.05 * rng.normal(size=N_CLASSES)
    as_t = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return as_t(id_train), torch.from_numpy(labels), as_t(id_test), as_t(ood), as_t(weight), as_t(bias)


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores.double().numpy(), ood_scores.double().numpy()]))


# ---------------------------------------------------------------- logit detectors


def test_logit_detectors_match_float64_formulas() -> None:
    logits = _rng(0).normal(scale=4.0, size=(50, 7))
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected_msp = 1.0 / np.exp(shifted).sum(axis=1)
    expected_energy = 2.5 * logsumexp(logits / 2.5, axis=1)
    x = torch.from_numpy(logits)
    np.testing.assert_allclose(MSP().score(x).numpy(), expected_msp, rtol=1e-12)
    np.testing.assert_allclose(MaxLogit().score(x).numpy(), logits.max(axis=1), rtol=0, atol=0)
    np.testing.assert_allclose(Energy(temperature=2.5).score(x).numpy(), expected_energy, rtol=1e-12)
    assert Energy().score(x.float()).dtype == torch.float32


@pytest.mark.parametrize("detector", [MSP(), MaxLogit(), Energy()])
def test_logit_detectors_separate_gaussians(detector: Detector) -> None:
    id_train, labels, id_test, ood, weight, bias = _separated_data(1)
    detector.fit(id_train @ weight.T + bias, labels)
    assert _auroc(detector.score(id_test @ weight.T + bias), detector.score(ood @ weight.T + bias)) > 0.95


# ---------------------------------------------------------------- ODIN


def _odin_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, temperature: float, epsilon: float):
    """ODIN on a linear model, with the input gradient written out analytically."""
    logits = x @ weight.T + bias
    probabilities = np.exp(logits / temperature - logsumexp(logits / temperature, axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    # d/dx CE(f(x)/T, y) = (sum_j p_j W_j - W_y) / T
    gradient = (probabilities @ weight - weight[predicted]) / temperature
    perturbed = x - epsilon * np.sign(gradient)
    scaled = (perturbed @ weight.T + bias) / temperature
    return np.exp(scaled.max(axis=1) - logsumexp(scaled, axis=1))


@pytest.mark.parametrize(("temperature", "epsilon"), [(1000.0, 0.0014), (2.0, 0.05), (1.0, 0.0)])
def test_odin_matches_analytic_linear_model(temperature: float, epsilon: float) -> None:
    weight, bias = _random_head(2)
    model = nn.Linear(DIM, N_CLASSES).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.copy_(torch.from_numpy(bias))
    x = _rng(3).normal(size=(40, DIM))
    scores = ODIN(model, temperature=temperature, epsilon=epsilon).score_inputs(torch.from_numpy(x))
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), _odin_reference(x, weight, bias, temperature, epsilon), rtol=1e-10)


def test_odin_leaves_the_model_and_inputs_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, N_CLASSES))
    model.train()
    model[1].eval()  # a mixed train/eval state must come back exactly
    state = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(30, DIM)
    x_before = x.clone()
    odin = ODIN(model, temperature=10.0, epsilon=0.01)
    with torch.no_grad():  # ODIN needs gradients even when called under no_grad
        first = odin.score_inputs(x)
    second = odin(x)
    assert torch.equal(first, second)  # dropout was off during scoring
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert torch.equal(x, x_before) and not x.requires_grad


def test_odin_with_zero_epsilon_is_temperature_scaled_msp() -> None:
    model = nn.Linear(DIM, N_CLASSES)
    x = torch.randn(20, DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = torch.softmax(model(x) / 7.0, dim=1).amax(dim=1)
    torch.testing.assert_close(ODIN(model, temperature=7.0, epsilon=0.0).score(x), expected)


def test_odin_separates_gaussians() -> None:
    _, _, id_test, ood, weight, bias = _separated_data(5)
    model = nn.Linear(DIM, N_CLASSES)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    odin = ODIN(model, temperature=1000.0, epsilon=0.0014)
    assert _auroc(odin.score_inputs(id_test), odin.score_inputs(ood)) > 0.95


def test_odin_validation() -> None:
    model = nn.Linear(DIM, N_CLASSES)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        ODIN(model, temperature=0)
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0, got -0.1"):
        ODIN(model, epsilon=-0.1)
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        ODIN(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model must return logits of shape \(N, C\)"):
        ODIN(lambda x: x.sum(dim=1)).score_inputs(torch.randn(4, DIM))
    with pytest.raises(NonFiniteError, match="x contains 1 NaN"):
        ODIN(model).score_inputs(torch.tensor([[float("nan")] + [0.0] * (DIM - 1)]))


# ---------------------------------------------------------------- Mahalanobis


def _mahalanobis_reference(train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(axis=0) for c in classes])
    estimator = EmpiricalCovariance(assume_centered=True).fit(train - means[np.searchsorted(classes, labels)])
    return -np.min(np.stack([estimator.mahalanobis(test - mean) for mean in means]), axis=0)


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_mahalanobis_matches_sklearn(rank_deficient: bool) -> None:
    rng = _rng(6)
    train = rng.normal(size=(90, 6)) + rng.normal(scale=3.0, size=(3, 6)).repeat(30, axis=0)
    if rank_deficient:  # a column that is a combination of others: the covariance is singular
        train[:, 5] = train[:, 0] - 2.0 * train[:, 1]
    labels = np.array([10, 3, 7]).repeat(30)
    test = rng.normal(scale=2.0, size=(25, 6))
    if rank_deficient:
        test[:, 5] = test[:, 0] - 2.0 * test[:, 1]
    detector = Mahalanobis().fit(torch.from_numpy(train), torch.from_numpy(labels))
    assert detector.classes_.tolist() == [3, 7, 10]
    expected = _mahalanobis_reference(train, labels, test)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test)).numpy(), expected, rtol=1e-8, atol=1e-8)


def test_symmetric_pinv_matches_numpy_on_singular_matrices() -> None:
    rng = _rng(7)
    factor = rng.normal(size=(10, 4))
    matrix = factor @ factor.T  # rank 4
    expected = np.linalg.pinv(matrix, hermitian=True, rcond=10 * np.finfo(np.float64).eps)
    np.testing.assert_allclose(symmetric_pinv(torch.from_numpy(matrix)).numpy(), expected, atol=1e-10)
    with pytest.raises(ValueError, match="covariance matrix is zero"):
        symmetric_pinv(torch.zeros(3, 3, dtype=torch.float64))


def test_mahalanobis_needs_labels_and_variation() -> None:
    with pytest.raises(ValueError, match="labels are required"):
        Mahalanobis().fit(torch.randn(5, 3))
    with pytest.raises(ValueError, match="labels has 4 entries but the data has 5 rows"):
        Mahalanobis().fit(torch.randn(5, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        Mahalanobis().fit(torch.randn(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="covariance matrix is zero"):
        Mahalanobis().fit(torch.ones(4, 3), torch.tensor([0, 0, 1, 1]))


# ---------------------------------------------------------------- KNN


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_float64_formula(backend: str) -> None:
    rng = _rng(8)
    train, test = rng.normal(size=(200, DIM)), rng.normal(size=(30, DIM))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    distances = np.linalg.norm(unit(test)[:, None, :] - unit(train)[None, :, :], axis=2)
    expected = -np.sort(distances, axis=1)[:, 9]
    detector = KNN(k=10, backend=backend).fit(torch.from_numpy(train).float())
    scores = detector.score(torch.from_numpy(test).float())
    assert scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-6)


def test_knn_validation() -> None:
    with pytest.raises(ValueError, match="features must have at least k=50 rows, got 10"):
        KNN().fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        KNN(backend="hnsw")  # type: ignore[arg-type]
    detector = KNN(k=3).fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match="features must have 3 columns"):
        detector.score(torch.randn(2, 4))
    detector.k = 11
    with pytest.raises(ValueError, match="k must be <= len"):
        detector.score(torch.randn(2, 3))


# ---------------------------------------------------------------- ReAct, DICE, ViM


def test_react_matches_float64_formula() -> None:
    weight, bias = _random_head(9)
    rng = _rng(10)
    train, test = np.abs(rng.normal(size=(100, DIM))), np.abs(rng.normal(scale=1.5, size=(30, DIM)))
    detector = ReAct(torch.from_numpy(weight), torch.from_numpy(bias)).fit(torch.from_numpy(train))
    threshold = np.percentile(train, 90)
    assert detector.threshold_ == pytest.approx(threshold, rel=1e-14)
    expected = logsumexp(np.minimum(test, threshold) @ weight.T + bias, axis=1)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test)).numpy(), expected, rtol=1e-12)


def test_dice_matches_float64_formula() -> None:
    weight, bias = _random_head(11)
    rng = _rng(12)
    train, test = np.abs(rng.normal(size=(100, DIM))), np.abs(rng.normal(size=(30, DIM)))
    detector = DICE(torch.from_numpy(weight), torch.from_numpy(bias), sparsity=0.7).fit(torch.from_numpy(train))
    contributions = weight * train.mean(axis=0)
    threshold = np.percentile(contributions, 70)
    mask = contributions > threshold
    assert int(mask.sum()) == int(detector.mask_.sum()) == 10  # 30% of 32 contributions, rounded by percentile
    np.testing.assert_array_equal(detector.mask_.numpy(), mask)
    expected = logsumexp(test @ (weight * mask).T + bias, axis=1)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test)).numpy(), expected, rtol=1e-12)


def _vim_reference(train: np.ndarray, test: np.ndarray, weight: np.ndarray, bias: np.ndarray, dim: int) -> np.ndarray:
    """The ViM authors' procedure: sklearn covariance and an unsymmetric eigensolver."""
    origin = -np.linalg.pinv(weight) @ bias
    covariance = EmpiricalCovariance(assume_centered=True).fit(train - origin).covariance_
    eigenvalues, eigenvectors = np.linalg.eig(covariance)
    residual_space = np.ascontiguousarray(eigenvectors.real[:, np.argsort(-eigenvalues.real)[dim:]])
    alpha = (train @ weight.T + bias).max(axis=1).mean() / np.linalg.norm(
        (train - origin) @ residual_space, axis=1
    ).mean()
    virtual_logit = alpha * np.linalg.norm((test - origin) @ residual_space, axis=1)
    return logsumexp(test @ weight.T + bias, axis=1) - virtual_logit


@pytest.mark.parametrize("dim", [None, 2, 7])
def test_vim_matches_reference_procedure(dim: int | None) -> None:
    weight, bias = _random_head(13)
    rng = _rng(14)
    mixing = rng.normal(size=(DIM, DIM))
    train, test = rng.normal(size=(200, DIM)) @ mixing, rng.normal(size=(30, DIM)) @ mixing
    detector = ViM(torch.from_numpy(weight), torch.from_numpy(bias), dim=dim).fit(torch.from_numpy(train))
    used = DIM // 2 if dim is None else dim
    assert detector.dim_ == used and detector.residual_space_.shape == (DIM, DIM - used)
    expected = _vim_reference(train, test, weight, bias, used)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test)).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_vim_principal_dimension_errors() -> None:
    weight, bias = _random_head(15)
    features = torch.randn(50, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="dim must satisfy 1 <= dim < the feature dimension D=8.*got dim=8"):
        ViM(torch.from_numpy(weight), torch.from_numpy(bias), dim=8).fit(features)
    with pytest.raises(ValueError, match="dim must be > 0, got 0"):
        ViM(torch.from_numpy(weight), dim=0)
    flat = torch.zeros(50, DIM, dtype=torch.float64)
    flat[:, :2] = torch.randn(50, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="no component outside their top 2 principal directions"):
        ViM(torch.eye(DIM, dtype=torch.float64)[:N_CLASSES], dim=2).fit(flat)
    assert [default_principal_dim(d) for d in (4096, 2048, 1024, 768, 512, 3)] == [1000, 1000, 512, 512, 256, 1]


# ---------------------------------------------------------------- all feature detectors


def _feature_detectors(weight: torch.Tensor, bias: torch.Tensor) -> list[Detector]:
    return [Mahalanobis(), KNN(k=10), ReAct(weight, bias), DICE(weight, bias), ViM(weight, bias)]


@pytest.mark.parametrize("index", range(5))
def test_feature_detectors_separate_gaussians(index: int) -> None:
    id_train, labels, id_test, ood, weight, bias = _separated_data(16)
    detector = _feature_detectors(weight, bias)[index].fit(id_train, labels)
    assert _auroc(detector.score(id_test), detector.score(ood)) > 0.95


@pytest.mark.parametrize("index", range(5))
def test_feature_detectors_validate_inputs(index: int) -> None:
    id_train, labels, *_, weight, bias = _separated_data(17, n_per_class=5)
    detector = _feature_detectors(weight, bias)[index]
    with pytest.raises(NotFittedError, match="is not fitted"):
        detector.score(id_train)
    assert detector.fit(id_train, labels) is detector
    scores = detector.score(id_train.double())
    assert scores.shape == (len(id_train),) and scores.dtype == torch.float64
    assert detector.score(id_train).dtype == torch.float32
    with pytest.raises(ValueError, match=f"features must have {DIM} columns"):
        detector.score(id_train[:, :3])
    bad = id_train.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="features contains 0 NaN and 1 infinite"):
        detector.score(bad)
    with pytest.raises(TypeError, match="features must have a floating-point dtype"):
        detector.score(id_train.long())
    with pytest.raises(ValueError, match="features must be a 2-D tensor"):
        detector.score(id_train[0])


@pytest.mark.parametrize(
    ("make", "attribute", "value"),
    [
        (lambda w, b: ReAct(w, b), "percentile", 50.0),
        (lambda w, b: DICE(w, b), "sparsity", 0.5),
        (lambda w, b: ViM(w, b), "dim", 2),
    ],
)
def test_changing_a_hyperparameter_discards_the_fit(make, attribute: str, value: float) -> None:
    id_train, _, id_test, _, weight, bias = _separated_data(18, n_per_class=10)
    detector = make(weight, bias).fit(id_train)
    before = detector.score(id_test)
    setattr(detector, attribute, value)
    with pytest.raises(NotFittedError, match="call fit\\(\\) first, and again after changing a hyperparameter"):
        detector.score(id_test)
    after = detector.fit(id_train).score(id_test)
    assert not torch.equal(before, after)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda w, b: ReAct(w, b, percentile=101), r"percentile must be a number in \[0, 100\], got 101"),
        (lambda w, b: DICE(w, b, sparsity=1.0), r"sparsity must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_hyperparameter_ranges(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(torch.randn(N_CLASSES, DIM), None)


def test_detectors_copy_the_last_layer() -> None:
    layer = nn.Linear(DIM, N_CLASSES)
    features = torch.randn(40, DIM, generator=torch.Generator().manual_seed(19))
    detector = ReAct(layer).fit(features)
    before = detector.score(features)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(detector.score(features), before)
    with pytest.raises(AttributeError):
        detector.weight = torch.zeros(N_CLASSES, DIM)  # type: ignore[misc]
    assert detector.weight.dtype == torch.float64 and detector.bias.shape == (N_CLASSES,)


def test_linear_parameters() -> None:
    layer = nn.Linear(DIM, N_CLASSES, bias=False)
    weight, bias = linear_parameters(layer, None)
    assert torch.equal(weight, layer.weight.double()) and torch.equal(bias, torch.zeros(N_CLASSES, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must be None when linear is an nn.Linear"):
        linear_parameters(layer, torch.zeros(N_CLASSES))
    with pytest.raises(ValueError, match="bias has 3 entries but the weight has 4 rows"):
        linear_parameters(torch.randn(N_CLASSES, DIM), torch.zeros(3))
    with pytest.raises(TypeError, match="linear must be an nn.Linear or a weight tensor"):
        linear_parameters("fc", None)  # type: ignore[arg-type]


ALL_DETECTORS = [MSP, MaxLogit, Energy, ODIN, Mahalanobis, KNN, ReAct, DICE, ViM]


@pytest.mark.parametrize("cls", ALL_DETECTORS)
def test_every_detector_declares_inputs_and_reference(cls: type[Detector]) -> None:
    assert cls.inputs in ("logits", "features", "images")
    assert len(cls.reference) > 20 and any(
        venue in cls.reference for venue in ("ICLR", "ICML", "NeurIPS", "CVPR", "ECCV")
    )
    assert cls.reference.split(".")[0].split(",")[0] in (cls.__doc__ or "")


def test_detectors_satisfy_the_protocols() -> None:
    weight = torch.randn(N_CLASSES, DIM)
    for detector in [MSP(), Energy(), *_feature_detectors(weight, torch.zeros(N_CLASSES))]:
        assert isinstance(detector, Detector) and isinstance(detector, SupportsScore) and isinstance(detector, Scorer)
    assert repr(ReAct(weight, percentile=80)) == "ReAct(percentile=80.0, device=None)"


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(np.float64, st.integers(1, 40), elements=st.floats(-1e6, 1e6, allow_nan=False)),
    q=st.floats(0.0, 100.0),
)
def test_percentile_matches_numpy(values: np.ndarray, q: float) -> None:
    expected = np.percentile(values, q)
    assert percentile_of(torch.from_numpy(values), q) == pytest.approx(expected, rel=1e-12, abs=1e-9)


# ---------------------------------------------------------------- DICE at sparsity 0, ODIN with a per-channel std


def test_dice_with_zero_sparsity_keeps_every_weight() -> None:
    weight, bias = _random_head(30)
    train = np.abs(_rng(31).normal(size=(50, DIM)))
    test = _rng(32).normal(size=(20, DIM))
    detector = DICE(torch.from_numpy(weight), torch.from_numpy(bias), sparsity=0.0).fit(torch.from_numpy(train))
    assert bool(detector.mask_.all())
    expected = logsumexp(test @ weight.T + bias, axis=1)
    np.testing.assert_allclose(detector.score(torch.from_numpy(test)).numpy(), expected, rtol=1e-12)


def test_odin_divides_the_gradient_sign_by_the_channel_std() -> None:
    # A linear model on 2-channel 1x2 "images": x' = x - epsilon * sign(g) / std_c, then MSP at temperature T.
    weight, bias = _random_head(33, dim=4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, N_CLASSES)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(weight))
        model[1].bias.copy_(torch.from_numpy(bias))
    x = _rng(34).normal(size=(10, 2, 1, 2))
    std = np.array([0.25, 0.5])
    temperature, epsilon = 2.0, 0.05
    flat = x.reshape(10, 4)
    logits = flat @ weight.T + bias
    probabilities = np.exp(logits / temperature - logsumexp(logits / temperature, axis=1, keepdims=True))
    gradient = (probabilities @ weight - weight[logits.argmax(axis=1)]) / temperature
    perturbed = flat - epsilon * np.sign(gradient) / np.repeat(std, 2)
    scaled = (perturbed @ weight.T + bias) / temperature
    expected = np.exp(scaled.max(axis=1) - logsumexp(scaled, axis=1))
    odin = ODIN(model, temperature=temperature, epsilon=epsilon, std=[0.25, 0.5])
    np.testing.assert_allclose(odin.score(torch.from_numpy(x)).numpy(), expected, rtol=1e-10)
    without = ODIN(model, temperature=temperature, epsilon=epsilon).score(torch.from_numpy(x)).numpy()
    assert not np.allclose(without, expected)
    with pytest.raises(ValueError, match="std has 3 channels but the inputs have shape"):
        ODIN(model, std=[0.2, 0.2, 0.2]).score(torch.from_numpy(x))
    with pytest.raises(ValueError, match="std must hold finite numbers > 0"):
        ODIN(model, std=[0.2, 0.0])
