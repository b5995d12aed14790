"""EnergyOODRegularizer against hand-written float64 formulas, gradients, and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dreamood.training import EnergyOODRegularizer


def _reference_loss(
    logits_id: np.ndarray,
    logits_ood: np.ndarray,
    temperature: float,
    head: list[tuple[np.ndarray, np.ndarray]],
    class_weights: np.ndarray | None = None,
) -> float:
    """Eq. 7 from scratch: negative energy per row, head layers with ReLU between them, binary cross-entropy."""
    total = 0.0
    rows = [(row, 1) for row in logits_id] + [(row, 0) for row in logits_ood]
    for row, label in rows:
        weights = np.ones_like(row) if class_weights is None else np.maximum(class_weights, 0.0)
        peak = max(row) / temperature
        score = temperature * (peak + math.log(sum(w * math.exp(v / temperature - peak) for w, v in zip(weights, row))))
        hidden = np.array([score])
        for index, (weight, bias) in enumerate(head):
            hidden = weight @ hidden + bias
            if index < len(head) - 1:
                hidden = np.maximum(hidden, 0.0)
        top = max(hidden)
        log_normaliser = top + math.log(sum(math.exp(h - top) for h in hidden))
        total += log_normaliser - hidden[label]
    return total / len(rows)


def _head_layers(regularizer: EnergyOODRegularizer) -> list[tuple[np.ndarray, np.ndarray]]:
    linears = [m for m in regularizer.head.modules() if isinstance(m, torch.nn.Linear)]
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears]


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_matches_float64_reference(head: str, temperature: float) -> None:
    regularizer = EnergyOODRegularizer(head=head, hidden_dim=7, temperature=temperature).double()
    logits_id = torch.randn(5, 4, dtype=torch.float64) * 3
    logits_ood = torch.randn(3, 4, dtype=torch.float64)
    loss = regularizer(logits_id, logits_ood)
    expected = _reference_loss(logits_id.numpy(), logits_ood.numpy(), temperature, _head_layers(regularizer))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_linear_head_hand_computed_case() -> None:
    # Scores: ID row [0, 0] -> log 2; outlier row [ln 3, ln 3] -> log 6. Head: logits (0, s).
    regularizer = EnergyOODRegularizer(head="linear").double()
    with torch.no_grad():
        regularizer.head.weight.copy_(torch.tensor([[0.0], [1.0]]))
        regularizer.head.bias.zero_()
    loss = regularizer(torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), math.log(3), dtype=torch.float64))
    # ID label 1: -log sigmoid(log 2) = log(1 + 1/2); outlier label 0: -log(1 - sigmoid(log 6)) = log 7.
    assert loss.item() == pytest.approx((math.log(1.5) + math.log(7)) / 2, rel=1e-12)


def test_weighted_matches_reference_and_starts_equal_to_unweighted() -> None:
    torch.manual_seed(3)
    weighted = EnergyOODRegularizer(head="mlp", hidden_dim=5, temperature=2.0, weighted=True, num_classes=4).double()
    plain = EnergyOODRegularizer(head="mlp", hidden_dim=5, temperature=2.0).double()
    plain.head.load_state_dict(weighted.head.state_dict())
    logits_id = torch.randn(4, 4, dtype=torch.float64)
    logits_ood = torch.randn(6, 4, dtype=torch.float64)
    assert torch.equal(weighted.class_weights.detach(), torch.ones(4, dtype=torch.float64))
    assert weighted(logits_id, logits_ood).item() == pytest.approx(plain(logits_id, logits_ood).item(), rel=1e-12)

    with torch.no_grad():
        weighted.class_weights.copy_(torch.tensor([0.5, 2.0, -1.0, 1.5]))  # the negative weight acts as 0
    expected = _reference_loss(
        logits_id.numpy(), logits_ood.numpy(), 2.0, _head_layers(weighted), weighted.class_weights.detach().numpy()
    )
    assert weighted(logits_id, logits_ood).item() == pytest.approx(expected, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    logits_id=arrays(np.float64, st.tuples(st.integers(1, 6), st.just(3)), elements=st.floats(-30, 30)),
    logits_ood=arrays(np.float64, st.tuples(st.integers(1, 6), st.just(3)), elements=st.floats(-30, 30)),
    temperature=st.floats(0.1, 10.0),
)
def test_property_matches_reference(logits_id: np.ndarray, logits_ood: np.ndarray, temperature: float) -> None:
    torch.manual_seed(0)
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=4, temperature=temperature).double()
    loss = regularizer(torch.from_numpy(logits_id), torch.from_numpy(logits_ood))
    expected = _reference_loss(logits_id, logits_ood, temperature, _head_layers(regularizer))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_negative_energy_is_temperature_logsumexp() -> None:
    regularizer = EnergyOODRegularizer(temperature=2.0)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = [2.0 * math.log(sum(math.exp(v / 2.0) for v in row)) for row in logits.tolist()]
    assert regularizer.negative_energy(logits).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_reach_logits_head_and_weights(weighted: bool) -> None:
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=6, weighted=weighted, num_classes=3).double()
    logits_id = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logits_ood = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    regularizer(logits_id, logits_ood).backward()
    assert logits_id.grad is not None and logits_id.grad.abs().sum() > 0
    assert logits_ood.grad is not None and logits_ood.grad.abs().sum() > 0
    for name, parameter in regularizer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Autograd agrees with finite differences in the logits.
    assert torch.autograd.gradcheck(lambda a, b: regularizer(a, b), (logits_id.detach().requires_grad_(), logits_ood))


def test_training_the_head_separates_id_from_outliers() -> None:
    # With the logits fixed, minimising L_ood must teach the head that high scores mean ID.
    regularizer = EnergyOODRegularizer(head="linear")
    optimizer = torch.optim.SGD(regularizer.parameters(), lr=0.5)
    logits_id = torch.full((8, 3), 2.0)
    logits_ood = torch.zeros(8, 3)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = regularizer(logits_id, logits_ood)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 < losses[0]


@pytest.mark.parametrize(
    ("logits_id", "logits_ood", "message"),
    [
        (torch.zeros(0, 3), torch.zeros(2, 3), "logits_id is an empty batch"),
        (torch.zeros(2, 3), torch.zeros(0, 3), "logits_ood is an empty batch"),
        (torch.zeros(2, 3), torch.zeros(2, 4), r"same number of columns.*\(2, 3\).*\(2, 4\)"),
        (torch.zeros(3), torch.zeros(2, 3), r"logits_id must be a 2-D tensor.*\(3,\)"),
        (torch.zeros(2, 0), torch.zeros(2, 0), "logits_id has no class columns"),
    ],
)
def test_rejects_bad_batches(logits_id: torch.Tensor, logits_ood: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnergyOODRegularizer()(logits_id, logits_ood)


def test_rejects_integer_logits_and_width_other_than_num_classes() -> None:
    with pytest.raises(TypeError, match="logits_ood must have a floating-point dtype"):
        EnergyOODRegularizer()(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="5 columns.*num_classes=3"):
        EnergyOODRegularizer(num_classes=3)(torch.zeros(2, 5), torch.zeros(2, 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"head": "conv"}, ValueError, "head must be one of 'mlp', 'linear', got 'conv'"),
        ({"hidden_dim": 0}, ValueError, "hidden_dim must be > 0, got 0"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0, got 0.0"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"weighted": True}, ValueError, "num_classes must be given when weighted=True"),
        ({"num_classes": 2.5}, TypeError, "num_classes must be an int"),
    ],
)
def test_rejects_bad_configuration(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        EnergyOODRegularizer(**kwargs)  # type: ignore[arg-type]


def test_head_shapes_follow_the_paper() -> None:
    mlp = EnergyOODRegularizer(head="mlp", hidden_dim=512)
    shapes = [tuple(p.shape) for p in mlp.head.parameters()]
    assert shapes == [(512, 1), (512,), (2, 512), (2,)]
    linear = EnergyOODRegularizer(head="linear")
    assert [tuple(p.shape) for p in linear.parameters()] == [(2, 1), (2,)]
    assert linear.class_weights is None
