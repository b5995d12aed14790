"""GAN-based outlier synthesis (Lee et al., ICLR 2018): KL-to-uniform against float64, DCGAN shapes, the exact
losses and first Adam updates of a joint step, gradients kept off the classifier, and the shared training loop."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dreamood.baselines import (
    ConfidenceGAN,
    DCGANDiscriminator,
    DCGANGenerator,
    GANOutlierLoader,
    UniformKLRegularizer,
    kl_to_uniform,
)
from dreamood.io import load_checkpoint, save_checkpoint
from dreamood.models import Classifier, SmallConvNet
from dreamood.training import TrainingConfig, train_classifier


def _classifier(seed: int = 0, classes: int = 3) -> Classifier:
    return Classifier(SmallConvNet(1, 8, width=4, seed=seed), classes)


def _gan(seed: int = 0, **options: object) -> ConfidenceGAN:
    settings_: dict[str, object] = {"latent_dim": 8, "generator_width": 4, "discriminator_width": 4, "device": "cpu"}
    settings_.update(options)
    return ConfidenceGAN(8, 1, seed=seed, **settings_)  # type: ignore[arg-type]


@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(-30, 30)))
@settings(max_examples=50, deadline=None)
def test_kl_to_uniform_matches_float64_definition(logits: np.ndarray) -> None:
    shifted = logits - logits.max(axis=1, keepdims=True)
    c = logits.shape[1]
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = (np.log(1.0 / c) - log_p).mean(axis=1)  # sum_c (1/C) (log(1/C) - log p_c)
    got = kl_to_uniform(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    assert (got >= -1e-12).all()


def test_kl_is_zero_for_uniform_predictions_and_regularizer_averages() -> None:
    torch.testing.assert_close(kl_to_uniform(torch.full((3, 4), 2.5)), torch.zeros(3))
    logits_ood = torch.randn(5, 4)
    loss = UniformKLRegularizer()(torch.randn(2, 4), logits_ood)
    torch.testing.assert_close(loss, kl_to_uniform(logits_ood).mean())
    assert list(UniformKLRegularizer().parameters()) == []
    with pytest.raises(ValueError, match="logits_id"):
        UniformKLRegularizer()(torch.randn(2, 3), logits_ood)
    with pytest.raises(ValueError, match="empty"):
        UniformKLRegularizer()(torch.randn(2, 4), torch.randn(0, 4))
    with pytest.raises(TypeError, match="floating"):
        kl_to_uniform(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_dcgan_shapes_follow_the_public_architecture(size: int) -> None:
    generator = DCGANGenerator(size, 3, latent_dim=10, width=4)
    discriminator = DCGANDiscriminator(size, 3, width=4)
    images = generator(torch.randn(5, 10))
    assert images.shape == (5, 3, size, size)
    assert bool(((images >= 0) & (images <= 1)).all())
    assert discriminator(images).shape == (5,)
    steps = {8: 1, 16: 2, 32: 3}[size]
    g_channels = [m.out_channels for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    d_channels = [m.out_channels for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert g_channels == [4 * 2 ** (steps - i) for i in range(steps)] + [3]  # 32x32: 8w, 4w, 2w, C
    assert d_channels == [4 * 2 ** (i + 1) for i in range(steps)] + [1]  # 32x32: 2w, 4w, 8w, 1


def test_dcgan_init_normalisation_and_errors() -> None:
    generator = DCGANGenerator(32, 3, latent_dim=100, width=64, seed=3)
    first = next(m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d))
    assert float(first.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(first.weight.detach().mean()) == pytest.approx(0.0, abs=1e-3)
    plain = DCGANGenerator(8, 2, latent_dim=6, width=4, seed=1).eval()
    normalised = DCGANGenerator(8, 2, latent_dim=6, width=4, mean=(0.5, 0.2), std=(0.25, 2.0), seed=1).eval()
    z = torch.randn(4, 6)
    expected = (plain(z) - torch.tensor([0.5, 0.2]).view(2, 1, 1)) / torch.tensor([0.25, 2.0]).view(2, 1, 1)
    torch.testing.assert_close(normalised(z), expected)
    for size in (4, 12, 0):
        with pytest.raises(ValueError, match="image_size"):
            DCGANGenerator(size, 1)
    with pytest.raises(ValueError, match="mean and std"):
        DCGANGenerator(8, 1, mean=(0.5,))
    with pytest.raises(ValueError, match="one value per channel"):
        DCGANGenerator(8, 3, mean=(0.5,), std=(0.2,))


def _bce_numpy(logits: Tensor, target: float) -> float:
    x = logits.detach().double().numpy()
    p = 1.0 / (1.0 + np.exp(-x))
    return float(-(target * np.log(p) + (1 - target) * np.log(1 - p)).mean())


def test_train_step_losses_and_first_adam_updates_are_exact() -> None:
    torch.manual_seed(0)
    gan = _gan(seed=7, beta=0.7, lr=1e-3)
    classifier = _classifier(1).train()
    real = torch.rand(6, 1, 8, 8)
    g_before = copy.deepcopy(gan.generator)
    d_before = copy.deepcopy(gan.discriminator)
    classifier_before = copy.deepcopy(classifier)
    noise_state = gan.noise_generator.get_state()  # type: ignore[union-attr]

    losses = gan.train_step(real, classifier)

    z = torch.randn(6, 8, generator=torch.Generator().set_state(noise_state))
    fake = g_before(z)
    # Discriminator: -log D(x) - log(1 - D(G(z))), then Adam's first step is lr * g / (|g| + eps).
    d_real, d_fake = d_before(real), d_before(fake.detach())
    assert losses.discriminator == pytest.approx(_bce_numpy(d_real, 1.0) + _bce_numpy(d_fake, 0.0), rel=1e-5)
    d_loss = F.binary_cross_entropy_with_logits(d_real, torch.ones(6)) + F.binary_cross_entropy_with_logits(
        d_fake, torch.zeros(6)
    )
    d_grads = torch.autograd.grad(d_loss, list(d_before.parameters()))
    for after, before, grad in zip(gan.discriminator.parameters(), d_before.parameters(), d_grads):
        torch.testing.assert_close(after.detach(), before.detach() - 1e-3 * grad / (grad.abs() + 1e-8))
    # Generator: -log D'(G(z)) + beta * KL(U || p(y | G(z))) with the updated D' and the same z.
    d_updated = copy.deepcopy(gan.discriminator)
    fooled = d_updated(fake)
    logits = classifier_before(fake)
    assert losses.generator_gan == pytest.approx(_bce_numpy(fooled, 1.0), rel=1e-5)
    log_p = torch.log_softmax(logits.detach().double(), dim=1).numpy()
    assert losses.generator_kl == pytest.approx(float((np.log(1 / 3) - log_p).mean()), rel=1e-5)
    g_loss = F.binary_cross_entropy_with_logits(fooled, torch.ones(6)) + 0.7 * kl_to_uniform(logits).mean()
    g_grads = torch.autograd.grad(g_loss, list(g_before.parameters()))
    for after, before, grad in zip(gan.generator.parameters(), g_before.parameters(), g_grads):
        torch.testing.assert_close(after.detach(), before.detach() - 1e-3 * grad / (grad.abs() + 1e-8))
    # The classifier is used, not trained: no gradient and unchanged weights.
    assert all(p.grad is None for p in classifier.parameters())
    for after, before in zip(classifier.parameters(), classifier_before.parameters()):
        assert torch.equal(after, before)
    assert gan.last_losses_ == losses


def _same_state(a: Any, b: Any) -> bool:
    """Whether two (nested) states are equal: tensors element for element, dicts key for key, lists in order."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_same_seed_same_gan_and_samples() -> None:
    first, second, other = _gan(seed=2), _gan(seed=2), _gan(seed=3)
    assert _same_state(first.state_dict(), second.state_dict())
    assert torch.equal(first.sample(4), second.sample(4))
    assert not torch.equal(_gan(seed=2).sample(4), other.sample(4))


def test_train_step_validates_inputs() -> None:
    gan = _gan()
    with pytest.raises(ValueError, match="real_images"):
        gan.train_step(torch.rand(4, 3, 8, 8), _classifier())
    with pytest.raises(ValueError, match="classifier"):
        gan.train_step(torch.rand(4, 1, 8, 8), lambda x: x.flatten(1)[:2])
    with pytest.raises(ValueError, match="betas"):
        _gan(betas=(0.5, 1.0))


def test_outlier_loader_trains_the_gan_before_each_batch() -> None:
    gan = _gan(seed=4)
    real = DataLoader(TensorDataset(torch.rand(10, 1, 8, 8, dtype=torch.float64)), batch_size=4)
    loader = GANOutlierLoader(gan, real, _classifier(4))
    before = copy.deepcopy(gan.generator.state_dict())
    batches = list(loader)
    assert len(loader) == 3 and [b.shape[0] for b in batches] == [4, 4, 2]
    assert all(b.dtype == torch.float64 and b.shape[1:] == (1, 8, 8) and not b.requires_grad for b in batches)
    assert any(not torch.equal(before[k], v) for k, v in gan.generator.state_dict().items())
    with pytest.raises(TypeError, match="ConfidenceGAN"):
        GANOutlierLoader(object(), real, _classifier())  # type: ignore[arg-type]


def _joint_run(seed: int) -> tuple[Classifier, ConfidenceGAN, float | None]:
    torch.manual_seed(100)
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    id_loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    real_loader = DataLoader(TensorDataset(images), batch_size=8)
    model = _classifier(5)
    gan = _gan(seed=seed, beta=0.5)
    result = train_classifier(
        model,
        id_loader,
        TrainingConfig(epochs=2, beta=0.5, lr=0.05),
        outlier_loader=gan.outlier_loader(real_loader, model),
        regularizer=UniformKLRegularizer(),
        device="cpu",
        progress=False,
    )
    assert result.final.ood_steps == result.final.steps == 2
    return model, gan, result.final.ood_loss


def test_joint_training_in_the_shared_loop_is_reproducible() -> None:
    model_a, gan_a, ood_a = _joint_run(seed=9)
    model_b, gan_b, ood_b = _joint_run(seed=9)
    assert ood_a is not None and ood_a == ood_b and np.isfinite(ood_a)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    assert _same_state(gan_a.state_dict(), gan_b.state_dict())


# ---- complete state: a saved GAN continues exactly ---------------------------------------------------------


def test_state_dict_holds_the_optimisers_and_the_latent_generator() -> None:
    real, classifier = torch.rand(4, 1, 8, 8), _classifier(1)
    gan = _gan(seed=2)
    for _ in range(2):
        gan.train_step(real, classifier)
    saved = copy.deepcopy(gan.state_dict())
    assert saved["_extra_state"]["generator_optimizer"]["state"]  # Adam moments after two steps

    other = _gan(seed=7)  # other weights, fresh optimisers, another latent stream
    other.load_state_dict(copy.deepcopy(saved))
    assert _same_state(other.state_dict(), saved)
    assert other.train_step(real, classifier) == gan.train_step(real, classifier)
    assert _same_state(other.state_dict(), gan.state_dict())
    assert torch.equal(other.sample(3), gan.sample(3))

    # The weights alone are not enough: fresh Adam moments and latent codes give another step.
    weights_only = _gan(seed=7)
    weights_only.load_state_dict({k: v for k, v in saved.items() if k != "_extra_state"}, strict=False)
    weights_only.train_step(real, classifier)
    assert not _same_state(weights_only.generator.state_dict(), other.generator.state_dict())

    with pytest.raises(ValueError, match="extra state must hold"):
        _gan().load_state_dict({**saved, "_extra_state": {"noise_generator": saved["_extra_state"]["noise_generator"]}})


def test_outlier_loader_state_holds_the_gan_and_the_real_loader_shuffling() -> None:
    images, classifier = torch.rand(12, 1, 8, 8), _classifier(1)

    def loader(seed: int, classifier: Classifier) -> GANOutlierLoader:
        real = DataLoader(
            TensorDataset(images), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        return _gan(seed=seed).outlier_loader(real, classifier)

    first = loader(0, classifier)
    list(first)  # one pass: the GAN trained three steps, the shuffling moved on
    state = copy.deepcopy(first.state_dict())
    second = loader(5, copy.deepcopy(classifier))  # the classifier's BatchNorm statistics saw the same batches
    second.load_state_dict(state)
    following, resumed = list(first), list(second)
    assert len(following) == len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(following, resumed))  # the same next pass, step for step
    assert _same_state(first.state_dict(), second.state_dict())
    unshuffled = _gan().outlier_loader(DataLoader(TensorDataset(images), batch_size=4), classifier)
    with pytest.raises(ValueError, match="1 real_loader generator state"):
        unshuffled.load_state_dict(state)


class _Interrupted(Exception):
    pass


class _FailingImages(Dataset[tuple[Tensor, Tensor]]):
    """Labelled images that raise once ``fail_after`` of them were read (a run killed mid-epoch)."""

    def __init__(self, images: Tensor, labels: Tensor, fail_after: int | None) -> None:
        self.images, self.labels, self.fail_after, self.reads = images, labels, fail_after, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise _Interrupted
        return self.images[index], self.labels[index]


def _resumable_joint_run(out_dir: Path, *, fail_after: int | None, seed: int) -> tuple[Classifier, ConfidenceGAN]:
    """Three epochs of the joint confidence loss with checkpoints; ``seed`` sets everything a checkpoint restores."""
    generator = torch.Generator().manual_seed(100)
    images, labels = torch.rand(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    torch.manual_seed(seed)  # the classifier's head
    shuffle = torch.Generator().manual_seed(seed)
    real_loader = DataLoader(TensorDataset(images), batch_size=8, shuffle=True, generator=shuffle)
    model, gan = _classifier(seed), _gan(seed=seed, beta=0.5)
    outliers = gan.outlier_loader(real_loader, model)
    train_classifier(
        model,
        DataLoader(_FailingImages(images, labels, fail_after), batch_size=8),
        TrainingConfig(epochs=3, beta=0.5, lr=0.05),
        outlier_loader=outliers,
        regularizer=UniformKLRegularizer(),
        extra_state={"gan": outliers},
        device="cpu",
        progress=False,
        output_dir=out_dir,
        resume=True,
    )
    return model, gan


def test_an_interrupted_joint_training_resumes_the_gan_exactly(tmp_path: Path) -> None:
    model, gan = _resumable_joint_run(tmp_path / "whole", fail_after=None, seed=1)
    with pytest.raises(_Interrupted):
        _resumable_joint_run(tmp_path / "killed", fail_after=16 + 4, seed=1)  # dies in epoch 2
    state = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["epoch"] == 1 and set(state["extra_state"]) == {"gan"}

    # A new process: other initial weights, GAN and shuffling, all replaced by the checkpoint's.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed_model, resumed_gan = _resumable_joint_run(tmp_path / "killed", fail_after=None, seed=2)
    assert _same_state(resumed_model.state_dict(), model.state_dict())
    assert _same_state(resumed_gan.state_dict(), gan.state_dict())

    # The same checkpoint without the GAN's state: a warning, and the GAN (so the classifier) goes another way.
    (tmp_path / "stateless").mkdir()
    save_checkpoint(tmp_path / "stateless" / "checkpoint.pt", {**state, "extra_state": {}})
    with pytest.warns(UserWarning, match=r"holds no state of extra_state\['gan'\]"):
        other_model, _ = _resumable_joint_run(tmp_path / "stateless", fail_after=None, seed=2)
    assert not _same_state(other_model.state_dict(), model.state_dict())


def test_extra_state_needs_state_dict_and_load_state_dict() -> None:
    loader = DataLoader(TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(TypeError, match=r"extra_state\['gan'\] must have state_dict\(\) and load_state_dict"):
        train_classifier(
            _classifier(), loader, TrainingConfig(epochs=1), extra_state={"gan": object()}, device="cpu", progress=False
        )
    with pytest.raises(TypeError, match="extra_state must map names"):
        train_classifier(
            _classifier(),
            loader,
            TrainingConfig(epochs=1),
            extra_state=[_gan()],  # type: ignore[arg-type]
            device="cpu",
            progress=False,
        )
