"""MEMO: marginal entropy against float64, one adaptation step against an independent implementation, exact
restoration of the model after every image (and after an error), BatchNorm prior statistics, and its use as a
model in the accuracy and OOD evaluations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.baselines import MEMO, classification_accuracy, marginal_entropy
from dreamood.evaluation import OODEvaluator, msp_score
from dreamood.models import Classifier, SmallConvNet


def _model(seed: int = 0) -> Classifier:
    model = Classifier(SmallConvNet(1, 8, width=4, seed=seed), 3)
    # Non-trivial running statistics, as after training.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 8, 8))
    return model


def _images(n: int = 3, seed: int = 0) -> Tensor:
    return torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed)).float() / 16


@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=st.floats(-20, 20)))
@settings(max_examples=50, deadline=None)
def test_marginal_entropy_matches_float64(logits: np.ndarray) -> None:
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    mean = p.mean(axis=0)
    expected = -(mean * np.log(np.where(mean > 0, mean, 1.0))).sum()
    assert float(marginal_entropy(torch.from_numpy(logits))) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _state(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def test_one_step_matches_an_independent_implementation() -> None:
    model = _model(1).eval()
    images = _images(3)
    memo = MEMO(model, num_augmentations=4, lr=0.5, prior_strength=None, seed=2, progress=False)
    outputs = memo(images)
    assert outputs.shape == (3, 3) and memo.num_adapted == 3
    memo.reset()
    for index, image in enumerate(images):
        reference = copy.deepcopy(model).eval()
        copies = memo.augmented_copies(image, index)
        assert copies.shape == (4, 1, 8, 8) and not torch.equal(copies[0], copies[1])
        probabilities = F.softmax(reference(copies), dim=1).mean(dim=0)
        loss = -(probabilities * probabilities.log()).sum()
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for parameter, grad in zip(reference.parameters(), grads):
                parameter -= 0.5 * grad
            expected = reference(image.unsqueeze(0))[0]
            unadapted = model(image.unsqueeze(0))[0]
        torch.testing.assert_close(outputs[index], expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(outputs[index], unadapted, atol=1e-4)


def test_every_image_starts_from_the_original_model() -> None:
    model = _model(2)
    images = _images(3, seed=1)
    batch = MEMO(model, num_augmentations=4, lr=0.3, seed=5, progress=False)(images)
    alone = MEMO(model, num_augmentations=4, lr=0.3, seed=5, progress=False)
    alone.num_adapted = 2
    torch.testing.assert_close(alone(images[2:]), batch[2:], rtol=0, atol=0)


def test_model_is_restored_exactly_even_after_an_error() -> None:
    model = _model(3).train()
    model.head.bias.requires_grad_(False)
    model.head.weight.grad = torch.full_like(model.head.weight, 0.25)
    before = _state(model)
    memo = MEMO(model, num_augmentations=4, lr=0.5, optimizer="adamw", weight_decay=0.1, steps=2, progress=False)
    memo(_images(2))
    calls = 0

    def failing(batch: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return batch

    failing_memo = MEMO(model, preprocess=failing, num_augmentations=4, lr=0.5, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        failing_memo(_images(2))
    for saved, current in zip(before, _state(model)):
        assert torch.equal(saved, current)
    assert all(m.training for m in model.modules())
    assert not model.head.bias.requires_grad and model.head.bias.grad is None
    assert model.head.weight.grad is not None and bool((model.head.weight.grad == 0.25).all())
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")


def test_batchnorm_prior_mixes_running_and_single_image_statistics() -> None:
    torch.manual_seed(4)
    conv, norm, linear = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(2 * 64, 3)
    norm.running_mean.copy_(torch.tensor([0.3, -0.2]))
    norm.running_var.copy_(torch.tensor([1.5, 0.5]))
    model = nn.Sequential(conv, norm, nn.Flatten(), linear)
    image = _images(1, seed=3)[0]
    # A negligible step, so the prediction shows the BatchNorm statistics of the single test image.
    got = MEMO(model, num_augmentations=2, lr=1e-12, prior_strength=16, progress=False)(image.unsqueeze(0))[0]
    with torch.no_grad():
        y = conv(image.unsqueeze(0)).double()
        batch_mean = y.mean(dim=(0, 2, 3))
        batch_var = y.var(dim=(0, 2, 3), unbiased=True)
        prior = 16 / 17
        mean = prior * norm.running_mean.double() + (1 - prior) * batch_mean
        var = prior * norm.running_var.double() + (1 - prior) * batch_var
        shape = (1, 2, 1, 1)
        normalised = (y - mean.view(shape)) / torch.sqrt(var.view(shape) + norm.eps)
        normalised = normalised * norm.weight.double().view(shape) + norm.bias.double().view(shape)
        expected = linear.double()(normalised.flatten(1))[0].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert norm.forward.__func__ is nn.BatchNorm2d.forward  # type: ignore[attr-defined]


def test_memo_as_the_model_of_the_evaluations() -> None:
    model = _model(5)
    images, labels = _images(4, seed=6), torch.tensor([0, 1, 2, 1])
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    logits = MEMO(model, num_augmentations=3, lr=0.2, seed=1, progress=False)(images)
    memo = MEMO(model, num_augmentations=3, lr=0.2, seed=1, progress=False)
    accuracy = classification_accuracy(memo, loader, progress_bar=False)
    assert accuracy == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    memo.reset()
    scores = OODEvaluator(msp_score, model=memo, progress=False).compute_scores(loader)
    torch.testing.assert_close(scores, torch.softmax(logits, dim=1).amax(1))


def test_memo_validates_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        MEMO(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer"):
        MEMO(_model(), optimizer="adam")
    with pytest.raises(ValueError, match="num_augmentations"):
        MEMO(_model(), num_augmentations=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        MEMO(_model(), progress=False)(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MEMO(_model(), num_augmentations=2, progress=False)(torch.rand(1, 1, 8, 8) + 2)
