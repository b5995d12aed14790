"""The detectors of recent OOD papers: float64 formulas written out here, separation of ID from OOD, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score

from dreamood.detectors import (
    ASH,
    FDBD,
    GEN,
    RMDS,
    SCALE,
    SHE,
    Detector,
    Entropy,
    GradNorm,
    Gram,
    KLMatching,
    MCDropout,
    MultiLayerMahalanobis,
    NNGuide,
    NotFittedError,
    OpenMax,
    RankFeat,
    TemperatureScaling,
)

N_CLASSES, DIM = 4, 8
IMAGE_DETECTORS = [MCDropout, Gram, MultiLayerMahalanobis, OpenMax, RankFeat]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def _separated_data(seed: int, n_per_class: int = 60):
    """ID: class c near 5 e_c (non-negative, like post-ReLU features); OOD: near 5 e_4, ignored by W ~ e_c."""
    rng = _rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    means = 5.0 * np.eye(DIM)[:N_CLASSES]
    id_train = np.abs(means[labels] + 0.3 * rng.normal(size=(labels.size, DIM)))
    id_test = np.abs(means[labels] + 0.3 * rng.normal(size=(labels.size, DIM)))
    ood = np.abs(5.0 * np.eye(DIM)[N_CLASSES] + 0.3 * rng.normal(size=(labels.size, DIM)))
    weight = np.eye(DIM)[:N_CLASSES] + 0.05 * rng.normal(size=(N_CLASSES, DIM))
    bias = 0.05 * rng.normal(size=N_CLASSES)
    as_f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return as_f(id_train), torch.from_numpy(labels), as_f(id_test), as_f(ood), as_f(weight), as_f(bias)


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores.double().numpy(), ood_scores.double().numpy()]))


def _head(seed: int, n_classes: int = N_CLASSES, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    return rng.normal(size=(n_classes, dim)), rng.normal(size=n_classes)


# ---------------------------------------------------------------- logits: Entropy, GEN, temperature, KL-Matching


def test_entropy_and_gen_match_float64_formulas() -> None:
    logits = _rng(0).normal(scale=3.0, size=(40, 7))
    p = softmax(logits, axis=1)
    np.testing.assert_allclose(Entropy().score(_t(logits)).numpy(), (p * np.log(p)).sum(axis=1), rtol=1e-12)
    for gamma, m in ((0.1, 100), (0.5, 3)):
        top = -np.sort(-p, axis=1)[:, :m]
        expected = -(top**gamma * (1 - top) ** gamma).sum(axis=1)
        np.testing.assert_allclose(GEN(gamma=gamma, m=m).score(_t(logits)).numpy(), expected, rtol=1e-12)
    assert Entropy().score(_t(logits).float()).dtype == torch.float32


def test_temperature_scaling_fits_the_likelihood_optimum() -> None:
    rng = _rng(1)
    labels = rng.integers(0, 5, size=300)
    logits = 4.0 * np.eye(5)[labels] + 2.5 * rng.normal(size=(300, 5))  # overconfident: T > 1 expected

    def nll(temperature: float) -> float:
        scaled = logits / temperature
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(300), labels]))

    expected = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-10}).x
    detector = TemperatureScaling().fit(_t(logits), _t(labels))
    assert detector.temperature_ == pytest.approx(expected, rel=1e-6)
    test = rng.normal(scale=3.0, size=(20, 5))
    expected_scores = softmax(test / detector.temperature_, axis=1).max(axis=1)
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected_scores, rtol=1e-12)
    fixed = TemperatureScaling(temperature=2.0)
    np.testing.assert_allclose(fixed.score(_t(test)).numpy(), softmax(test / 2.0, axis=1).max(axis=1), rtol=1e-12)
    with pytest.raises(NotFittedError):
        TemperatureScaling().score(_t(test))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        TemperatureScaling().fit(_t(logits), _t(labels + 1))
    with pytest.raises(ValueError, match="labels are required"):
        TemperatureScaling().fit(_t(logits))


def test_kl_matching_matches_float64_formula() -> None:
    rng = _rng(2)
    fit_logits = rng.normal(scale=3.0, size=(200, 5))
    fit_logits[:, 4] -= 20.0  # class 4 is never predicted: it gets no template
    test = rng.normal(scale=3.0, size=(30, 5))
    p_fit, p_test = softmax(fit_logits, axis=1), softmax(test, axis=1)
    predicted = p_fit.argmax(axis=1)
    templates = {k: p_fit[predicted == k].mean(axis=0) for k in np.unique(predicted)}
    assert sorted(templates) == [0, 1, 2, 3]
    kl = {k: (p_test * np.log(p_test / d)).sum(axis=1) for k, d in templates.items()}
    detector = KLMatching().fit(_t(fit_logits))
    expected = -np.min(np.stack(list(kl.values())), axis=0)
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected, rtol=1e-10)
    assert detector.has_template_.tolist() == [True, True, True, True, False]
    own = KLMatching(template="predicted").fit(_t(fit_logits))
    test_predicted = p_test.argmax(axis=1)
    keep = test_predicted < 4
    expected_own = -np.array([kl[k][i] for i, k in enumerate(test_predicted) if k < 4])
    np.testing.assert_allclose(own.score(_t(test[keep])).numpy(), expected_own, rtol=1e-10)
    forced = test.copy()
    forced[0, 4] = 50.0
    with pytest.raises(ValueError, match=r"predicted as classes \[4\], which had no fit sample"):
        own.score(_t(forced))


@pytest.mark.parametrize("make", [Entropy, GEN, lambda: TemperatureScaling(), KLMatching])
def test_logit_detectors_separate_id_from_ood(make) -> None:
    id_train, labels, id_test, ood, weight, bias = _separated_data(3)
    # A held-out set with some wrong labels, so that the fitted temperature is finite.
    noisy = labels.clone()
    noisy[::4] = torch.randint(0, N_CLASSES, (len(noisy[::4]),), generator=torch.Generator().manual_seed(0))
    detector = make().fit(id_train @ weight.T + bias, noisy)
    assert _auroc(detector.score(id_test @ weight.T + bias), detector.score(ood @ weight.T + bias)) > 0.95


# ---------------------------------------------------------------- activation shaping: ASH, SCALE


def _ash_reference(x: np.ndarray, variant: str, percentile: float) -> np.ndarray:
    n = x.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    out = np.zeros_like(x)
    for row, values in enumerate(x):
        top = np.argsort(-values)[:k]
        if variant == "p":
            out[row, top] = values[top]
        elif variant == "b":
            out[row, top] = values.sum() / k
        else:
            out[row, top] = values[top] * np.exp(values.sum() / values[top].sum())
    return out


@pytest.mark.parametrize(("variant", "percentile"), [("p", 60.0), ("b", 65.0), ("s", 90.0), ("s", 0.0)])
def test_ash_matches_float64_formula(variant: str, percentile: float) -> None:
    weight, bias = _head(4, dim=20)
    x = np.abs(_rng(5).normal(size=(30, 20)))
    detector = ASH(_t(weight), _t(bias), variant=variant, percentile=percentile)  # type: ignore[arg-type]
    shaped = _ash_reference(x, variant, percentile)
    np.testing.assert_allclose(detector.shape(_t(x)).numpy(), shaped, rtol=1e-12)
    expected = logsumexp(shaped @ weight.T + bias, axis=1)
    np.testing.assert_allclose(detector.score(_t(x)).numpy(), expected, rtol=1e-12)


def test_scale_matches_float64_formula() -> None:
    weight, bias = _head(6, dim=20)
    x = np.abs(_rng(7).normal(size=(30, 20)))
    k = 20 - int(np.round(20 * 0.85))
    top_sum = -np.sort(-x, axis=1)[:, :k].sum(axis=1)
    scaled = x * np.exp(x.sum(axis=1) / top_sum)[:, None]
    expected = logsumexp(scaled @ weight.T + bias, axis=1)
    np.testing.assert_allclose(SCALE(_t(weight), _t(bias)).score(_t(x)).numpy(), expected, rtol=1e-12)


def test_shaping_validation() -> None:
    weight = torch.randn(N_CLASSES, DIM)
    with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\), got 100"):
        ASH(weight, percentile=100)
    with pytest.raises(ValueError, match="variant must be one of"):
        ASH(weight, variant="q")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prunes all 8 activations"):
        SCALE(weight, percentile=99.0).score(torch.rand(3, DIM))


# ---------------------------------------------------------------- RMDS


def test_rmds_matches_sklearn_covariances() -> None:
    rng = _rng(8)
    train = rng.normal(size=(120, 5)) + rng.normal(scale=3.0, size=(3, 5)).repeat(40, axis=0)
    labels = np.arange(3).repeat(40)
    test = rng.normal(scale=2.0, size=(25, 5))
    means = np.stack([train[labels == c].mean(axis=0) for c in range(3)])
    within = EmpiricalCovariance(assume_centered=True).fit(train - means[labels])
    background = EmpiricalCovariance().fit(train)
    class_distances = np.stack([within.mahalanobis(test - mean) for mean in means], axis=1)
    expected = -np.min(class_distances - background.mahalanobis(test)[:, None], axis=1)
    detector = RMDS().fit(_t(train), _t(labels))
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- SHE, NNGuide, fDBD, GradNorm


def test_she_matches_float64_formula() -> None:
    weight, bias = _head(9)
    rng = _rng(10)
    train = rng.normal(size=(200, DIM))
    labels = (train @ weight.T + bias).argmax(axis=1)
    labels[:50] = rng.integers(0, N_CLASSES, size=50)  # some wrong labels: left out of the patterns
    test = rng.normal(size=(30, DIM))
    predicted = (train @ weight.T + bias).argmax(axis=1)
    correct = predicted == labels
    patterns = np.stack([train[correct & (labels == c)].mean(axis=0) for c in range(N_CLASSES)])
    expected = (test * patterns[(test @ weight.T + bias).argmax(axis=1)]).sum(axis=1)
    detector = SHE(_t(weight), _t(bias)).fit(_t(train), _t(labels))
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        SHE(_t(weight), _t(bias)).fit(_t(train), _t(labels + 4))


def test_nnguide_matches_float64_formula() -> None:
    weight, bias = _head(11)
    rng = _rng(12)
    train, test = rng.normal(size=(150, DIM)), rng.normal(size=(20, DIM))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    bank = unit(train) * logsumexp(train @ weight.T + bias, axis=1)[:, None]
    similarities = unit(test) @ bank.T
    guidance = -np.sort(-similarities, axis=1)[:, :10].mean(axis=1)
    expected = logsumexp(test @ weight.T + bias, axis=1) * guidance
    detector = NNGuide(_t(weight), _t(bias), k=10, memory_budget_mb=0.001).fit(_t(train))  # several chunks
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="at least k=10 rows"):
        NNGuide(_t(weight), _t(bias), k=10).fit(_t(train[:5]))


@pytest.mark.parametrize("normalizer", ["mean", "norm"])
def test_fdbd_matches_float64_formula(normalizer: str) -> None:
    weight, bias = _head(13)
    rng = _rng(14)
    train, test = rng.normal(size=(100, DIM)), rng.normal(size=(25, DIM))
    logits = test @ weight.T + bias
    expected = np.empty(25)
    for i, row in enumerate(logits):
        y = row.argmax()
        others = [c for c in range(N_CLASSES) if c != y]
        distances = [abs(row[y] - row[c]) / np.linalg.norm(weight[y] - weight[c]) for c in others]
        centre = test[i] - train.mean(axis=0) if normalizer == "mean" else test[i]
        expected[i] = sum(distances) / np.linalg.norm(centre)
    detector = FDBD(_t(weight), _t(bias), normalizer=normalizer).fit(_t(train))  # type: ignore[arg-type]
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="two classes with distinct weight rows"):
        FDBD(torch.ones(3, DIM))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradnorm_equals_the_autograd_gradient_of_the_papers_loss(temperature: float) -> None:
    weight, bias = _head(15)
    x = np.abs(_rng(16).normal(size=(12, DIM)))
    expected = []
    for row in x:  # one backward pass per sample, as in the paper's code
        layer = torch.nn.Linear(DIM, N_CLASSES).double()
        with torch.no_grad():
            layer.weight.copy_(_t(weight))
            layer.bias.copy_(_t(bias))
        log_p = torch.log_softmax(layer(_t(row).unsqueeze(0)) / temperature, dim=1)
        loss = -(log_p / N_CLASSES).sum()
        loss.backward()
        assert layer.weight.grad is not None
        expected.append(float(layer.weight.grad.abs().sum()))
    detector = GradNorm(_t(weight), _t(bias), temperature=temperature)
    np.testing.assert_allclose(detector.score(_t(x)).numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------- all new feature detectors


def _feature_detectors(weight: torch.Tensor, bias: torch.Tensor) -> list[Detector]:
    return [
        ASH(weight, bias, variant="p", percentile=60),
        ASH(weight, bias, variant="b", percentile=90),  # keeps 1 of 8: its binarised value lands on the top class
        ASH(weight, bias, variant="s", percentile=50),
        SCALE(weight, bias, percentile=50),
        RMDS(),
        SHE(weight, bias),
        NNGuide(weight, bias, k=10),
        FDBD(weight, bias),
        GradNorm(weight, bias),
    ]


@pytest.mark.parametrize("index", range(9))
def test_feature_detectors_separate_id_from_ood(index: int) -> None:
    id_train, labels, id_test, ood, weight, bias = _separated_data(17)
    detector = _feature_detectors(weight, bias)[index]
    assert detector.fit(id_train, labels) is detector
    assert _auroc(detector.score(id_test), detector.score(ood)) > 0.95


@pytest.mark.parametrize("index", range(9))
def test_feature_detectors_check_their_inputs(index: int) -> None:
    id_train, labels, *_, weight, bias = _separated_data(18, n_per_class=5)
    detector = _feature_detectors(weight, bias)[index].fit(id_train, labels)
    scores = detector.score(id_train.double())
    assert scores.shape == (len(id_train),) and scores.dtype == torch.float64
    assert detector.score(id_train).dtype == torch.float32
    with pytest.raises(ValueError, match=f"features must have {DIM} columns"):
        detector.score(id_train[:, :3])
    bad = id_train.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="features contains 1 NaN"):
        detector.score(bad)


@pytest.mark.parametrize(
    "cls",
    [Entropy, GEN, TemperatureScaling, KLMatching, ASH, SCALE, RMDS, SHE, NNGuide, FDBD, GradNorm, *IMAGE_DETECTORS],
)
def test_every_new_detector_declares_inputs_and_reference(cls: type[Detector]) -> None:
    assert cls.inputs in ("logits", "features", "images")
    assert any(venue in cls.reference for venue in ("ICLR", "ICML", "NeurIPS", "CVPR", "ICCV"))
    assert cls.reference.split(".")[0].split(",")[0] in (cls.__doc__ or "")


# ---------------------------------------------------------------- OpenMax


def test_weibull_fit_matches_scipy() -> None:
    from scipy.stats import weibull_min

    from dreamood.detectors.openmax import fit_weibull

    sample = weibull_min.rvs(1.7, scale=2.5, size=40, random_state=np.random.default_rng(20))
    shape, _, scale = weibull_min.fit(sample, floc=0)  # a numerical optimiser, accurate to about 1e-5
    ours = fit_weibull(_t(sample))
    assert ours == pytest.approx((shape, scale), rel=1e-4)
    log_likelihood = lambda k, lam: weibull_min.logpdf(sample, k, scale=lam).sum()  # noqa: E731
    assert log_likelihood(*ours) >= log_likelihood(shape, scale) - 1e-12  # ours is the exact maximum
    with pytest.raises(ValueError, match="at least two distinct values"):
        fit_weibull(torch.ones(5))


def test_openmax_matches_float64_recalibration() -> None:
    from scipy.stats import weibull_min

    from dreamood.detectors import OpenMax

    rng = _rng(21)
    labels = np.repeat(np.arange(3), 30)
    fit_logits = 4 * np.eye(3)[labels] + rng.normal(size=(90, 3))
    test = rng.normal(scale=2.0, size=(15, 3))
    correct = fit_logits.argmax(axis=1) == labels

    def eucos(v: np.ndarray, mean: np.ndarray) -> np.ndarray:
        cosine = 1 - v @ mean / (np.linalg.norm(v, axis=-1) * np.linalg.norm(mean))
        return np.linalg.norm(v - mean, axis=-1) / 200 + cosine

    means, models = [], []
    for c in range(3):
        rows = fit_logits[correct & (labels == c)]
        means.append(rows.mean(axis=0))
        tail = np.sort(eucos(rows, means[c]))[-8:]
        shape, _, scale = weibull_min.fit(tail, floc=0)
        models.append((shape, scale))
    expected = []
    for v in test:
        weights = np.zeros(3)
        weights[np.argsort(-v)[:2]] = [1.0, 0.5]  # alpha = 2: (alpha + 1 - r) / alpha
        cdf = np.array([weibull_min.cdf(eucos(v, means[c]), models[c][0], scale=models[c][1]) for c in range(3)])
        kept = v * (1 - weights * cdf)
        expected.append(1 - softmax(np.r_[(v - kept).sum(), kept])[0])
    detector = OpenMax(tailsize=8, alpha=2).fit(_t(fit_logits), _t(labels))
    np.testing.assert_allclose(detector.score(_t(test)).numpy(), expected, rtol=1e-4)  # scipy's fit: ~1e-5
    with pytest.raises(ValueError, match="class 0 has .* fewer than tailsize=50"):
        OpenMax(tailsize=50).fit(_t(fit_logits), _t(labels))


def test_openmax_separates_id_from_ood() -> None:
    from dreamood.detectors import OpenMax

    # OOD activation vectors are confident but atypical: high on two classes at once, far from every mean.
    rng = _rng(22)
    labels = np.repeat(np.arange(4), 60)
    fit_logits, test_logits = (6 * np.eye(4)[labels] + 0.5 * rng.normal(size=(240, 4)) for _ in range(2))
    pairs = rng.permutation(np.repeat(np.arange(4), 30)).reshape(-1, 2)
    ood_logits = 6 * (np.eye(4)[pairs[:, 0]] + np.eye(4)[(pairs[:, 0] + 1) % 4]) + 0.5 * rng.normal(size=(60, 4))
    detector = OpenMax(tailsize=20, alpha=2).fit(_t(fit_logits), _t(labels))
    assert _auroc(detector.score(_t(test_logits)), detector.score(_t(ood_logits))) > 0.95
