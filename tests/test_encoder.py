"""Tests for Phase 1 (dreamood.encoder): Eq. 2, training, resumable checkpoints, errors, and the feature bank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dreamood.anchors import TokenEmbeddings
from dreamood.encoder import CHECKPOINT_NAME, TextConditionedEncoder, fit_encoder
from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.feature_bank import FeatureBank
from dreamood.io import load_checkpoint, save_checkpoint
from dreamood.models import SmallConvNet
from dreamood.protocols import Embedder

NUM_CLASSES, INPUT_DIM, FEATURE_DIM, EMBED_DIM = 4, 8, 32, 16


def make_blobs(per_class: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Well-separated Gaussian blobs: class c is centred on 3 * e_c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    inputs = 0.5 * torch.randn(len(labels), INPUT_DIM, generator=generator)
    inputs[torch.arange(len(labels)), labels] += 3.0
    return inputs, labels


def make_anchors(seed: int = 0) -> TokenEmbeddings:
    vectors = 0.4 * torch.randn(NUM_CLASSES, EMBED_DIM, generator=torch.Generator().manual_seed(seed))
    return TokenEmbeddings([f"class {c}" for c in range(NUM_CLASSES)], vectors)


def make_encoder(seed: int = 0, anchors: TokenEmbeddings | None = None) -> TextConditionedEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Linear(INPUT_DIM, FEATURE_DIM), nn.ReLU(), nn.Linear(FEATURE_DIM, FEATURE_DIM))
        return TextConditionedEncoder(backbone, FEATURE_DIM, anchors or make_anchors())


def make_loader(inputs: Tensor, labels: Tensor, *, generator_seed: int | None = 3, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True, generator=generator)


@pytest.fixture(scope="module")
def trained() -> tuple[TextConditionedEncoder, Tensor, Tensor, list[float]]:
    inputs, labels = make_blobs()
    encoder = make_encoder()
    history = fit_encoder(encoder, make_loader(inputs, labels), 6, device="cpu", show_progress=False, seed=0)
    return encoder, inputs, labels, history.accuracy


# --- Eq. 2 ---------------------------------------------------------------------------------------------------


def eq2_float64(encoder: TextConditionedEncoder, inputs: Tensor, labels: Tensor) -> tuple[list[list[float]], float]:
    """Logits cos(z, T(y_j)) / t and the mean cross-entropy, from scratch in float64 Python arithmetic."""
    weight = encoder.projection.weight.detach().double().tolist()
    bias = encoder.projection.bias.detach().double().tolist()
    anchors = encoder.anchors.double().tolist()
    t = encoder.temperature
    all_logits, total = [], 0.0
    for x, y in zip(inputs.double().tolist(), labels.tolist()):
        h = [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]
        h_norm = math.sqrt(sum(v * v for v in h))
        logits = []
        for anchor in anchors:
            a_norm = math.sqrt(sum(v * v for v in anchor))
            logits.append(sum(u * v for u, v in zip(h, anchor)) / (h_norm * a_norm) / t)
        peak = max(logits)
        log_sum = peak + math.log(sum(math.exp(v - peak) for v in logits))
        total += log_sum - logits[y]
        all_logits.append(logits)
    return all_logits, total / len(labels)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.05, 2.0),
    num_classes=st.integers(2, 6),
    batch=st.integers(1, 9),
)
def test_loss_is_eq2(seed: int, temperature: float, num_classes: int, batch: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(num_classes, 7, generator=generator)
    torch.manual_seed(seed)
    encoder = TextConditionedEncoder(nn.Identity(), 5, anchors, temperature=temperature)
    inputs = torch.randn(batch, 5, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    expected_logits, expected_loss = eq2_float64(encoder, inputs, labels)
    assert torch.allclose(encoder(inputs).double(), torch.tensor(expected_logits, dtype=torch.float64), atol=1e-4)
    assert math.isclose(encoder.loss(inputs, labels).item(), expected_loss, rel_tol=1e-5, abs_tol=1e-5)
    z = encoder.embed(inputs)
    assert torch.allclose(z.norm(dim=1), torch.ones(batch), atol=1e-6)


def test_anchors_are_a_frozen_buffer(trained: tuple[TextConditionedEncoder, Tensor, Tensor, list[float]]) -> None:
    encoder = trained[0]
    assert torch.equal(encoder.anchors, make_anchors().vectors)  # unchanged by training
    assert "anchors" in encoder.state_dict()
    assert all(parameter is not encoder.anchors for parameter in encoder.parameters())
    assert not encoder.anchors.requires_grad
    copy = make_encoder(seed=9, anchors=make_anchors(seed=5))
    copy.load_state_dict(encoder.state_dict())
    assert torch.equal(copy.anchors, encoder.anchors)
    assert isinstance(encoder, Embedder)
    assert encoder.class_names == make_anchors().class_names


# --- training ------------------------------------------------------------------------------------------------


def test_training_aligns_embeddings_with_their_anchors(
    trained: tuple[TextConditionedEncoder, Tensor, Tensor, list[float]],
) -> None:
    encoder, inputs, labels, accuracy = trained
    assert accuracy[-1] > 0.95
    with torch.no_grad():
        z = encoder.embed(inputs)
    cosines = z @ nn.functional.normalize(encoder.anchors, dim=1).T
    assert float((cosines.argmax(1) == labels).float().mean()) > 0.95
    mean_cosine = torch.stack([cosines[labels == c].mean(0) for c in range(NUM_CLASSES)])  # (class, anchor)
    for c in range(NUM_CLASSES):
        others = torch.cat([mean_cosine[c, :c], mean_cosine[c, c + 1 :]])
        assert float(mean_cosine[c, c]) > float(others.max())
    assert not encoder.training


def test_learning_rate_follows_the_per_step_cosine() -> None:
    inputs, labels = make_blobs(per_class=8)
    loader = make_loader(inputs, labels, batch_size=8)  # 4 steps per epoch
    history = fit_encoder(make_encoder(), loader, 3, lr=0.05, device="cpu", show_progress=False)
    total = 3 * len(loader)
    for epoch, lr in enumerate(history.lr, start=1):
        step = epoch * len(loader)
        expected = 1e-6 + (0.05 - 1e-6) * 0.5 * (1 + math.cos(math.pi * step / total))
        assert math.isclose(lr, expected, rel_tol=1e-9)
    assert len(history) == 3 and all(0.0 <= a <= 1.0 for a in history.accuracy)


class InterruptAfter(Dataset[tuple[Tensor, Tensor]]):
    """A dataset that fails once ``limit`` items have been read, like a run killed mid-epoch."""

    def __init__(self, inputs: Tensor, labels: Tensor, limit: int) -> None:
        self.inputs, self.labels, self.limit, self.reads = inputs, labels, limit, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.reads += 1
        if self.reads > self.limit:
            raise RuntimeError("interrupted")
        return self.inputs[index], self.labels[index]


@pytest.mark.parametrize("generator_seed", [3, None], ids=["loader-generator", "global-rng"])
def test_resume_gives_bit_identical_weights(tmp_path: Path, generator_seed: int | None) -> None:
    inputs, labels = make_blobs(per_class=12)
    options = {"lr": 0.1, "device": "cpu", "show_progress": False, "seed": 11}

    uninterrupted = make_encoder(seed=1)
    expected = fit_encoder(uninterrupted, make_loader(inputs, labels, generator_seed=generator_seed), 3, **options)

    crashing = InterruptAfter(inputs, labels, limit=len(labels) + 20)  # dies during epoch 2
    generator = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    loader = DataLoader(crashing, batch_size=16, shuffle=True, generator=generator)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_encoder(make_encoder(seed=1), loader, 3, checkpoint_dir=tmp_path, **options)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1

    resumed = make_encoder(seed=99)  # different initial weights: everything must come from the checkpoint
    history = fit_encoder(
        resumed,
        make_loader(inputs, labels, generator_seed=generator_seed),
        3,
        checkpoint_dir=tmp_path,
        resume=True,
        **options,
    )
    for (name, want), got in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name
    assert history.loss == expected.loss and history.accuracy == expected.accuracy and history.lr == expected.lr
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 3


def test_resume_checks(tmp_path: Path) -> None:
    inputs, labels = make_blobs(per_class=8)
    options = {"device": "cpu", "show_progress": False}
    fresh = fit_encoder(make_encoder(), make_loader(inputs, labels), 1, checkpoint_dir=tmp_path, resume=True, **options)
    assert len(fresh) == 1  # no checkpoint yet: starts afresh
    with pytest.raises(ValueError, match="written with steps_per_epoch=2, this run has steps_per_epoch=4"):
        fit_encoder(make_encoder(), make_loader(inputs, labels, batch_size=8), 2, checkpoint_dir=tmp_path, resume=True)
    done = fit_encoder(make_encoder(), make_loader(inputs, labels), 1, checkpoint_dir=tmp_path, resume=True, **options)
    assert done.loss == fresh.loss  # already complete: nothing more to train
    other = TextConditionedEncoder(nn.Linear(INPUT_DIM, 3), 3, make_anchors())
    with pytest.raises(ArtifactError, match="does not match"):
        fit_encoder(other, make_loader(inputs, labels), 2, checkpoint_dir=tmp_path, resume=True, **options)


def test_a_checkpoint_of_the_former_layout_is_refused_not_misread(tmp_path: Path) -> None:
    inputs, labels = make_blobs(per_class=8)
    encoder = make_encoder()
    fit_encoder(encoder, make_loader(inputs, labels), 1, device="cpu", show_progress=False, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert (state["format"], state["kind"], state["steps_per_epoch"]) == ("dreamood.training", "fit_encoder", 2)
    # The entries fit_encoder wrote before its checkpoint joined the shared layout.
    former = {k: state[k] for k in ("epoch", "steps_per_epoch", "model", "optimizer", "scheduler", "scaler", "history")}
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {**former, "rng": {"torch": torch.get_rng_state()}})
    with pytest.raises(ArtifactError, match=r"is not a checkpoint of fit_encoder \(format None.*resume=False"):
        fit_encoder(make_encoder(), make_loader(inputs, labels), 2, device="cpu", checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("amp_dtype", ["bf16", torch.float16])
def test_mixed_precision_and_channels_last(amp_dtype: str | torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % NUM_CLASSES
    images = torch.randn(24, 1, 8, 8, generator=generator)
    backbone = SmallConvNet(1, 16, width=4, seed=0)
    encoder = TextConditionedEncoder(backbone, 16, make_anchors())
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    history = fit_encoder(
        encoder, loader, 2, amp_dtype=amp_dtype, channels_last=True, device="cpu", show_progress=False
    )
    assert len(history) == 2 and all(math.isfinite(v) for v in history.loss)
    assert encoder.anchors.dtype == torch.float32
    assert backbone.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)


# --- errors --------------------------------------------------------------------------------------------------


def test_non_finite_features_stop_training_naming_the_step() -> None:
    inputs, labels = make_blobs(per_class=8)
    inputs[20, 0] = float("nan")  # batch 3 of 8-sample batches, unshuffled
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=8)
    with pytest.raises(NonFiniteError, match=rf"epoch 1, step 3: backbone features contains {FEATURE_DIM} NaN"):
        fit_encoder(make_encoder(), loader, 1, device="cpu", show_progress=False)


def test_non_finite_loss_stops_training_naming_the_step() -> None:
    inputs, labels = make_blobs(per_class=8)
    encoder = make_encoder()
    with torch.no_grad():
        encoder.projection.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"loss became nan at epoch 1, step 1"):
        fit_encoder(encoder, make_loader(inputs, labels), 1, device="cpu", show_progress=False)


def test_bad_encoder_inputs() -> None:
    anchors = make_anchors()
    with pytest.raises(ValueError, match="anchors have dimension 16 but embedding_dim .* is 8"):
        TextConditionedEncoder(nn.Identity(), 4, anchors, embedding_dim=8)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        TextConditionedEncoder(nn.Identity(), 4, anchors, temperature=0)
    with pytest.raises(ValueError, match=r"anchors rows \[1\] are zero vectors"):
        TextConditionedEncoder(nn.Identity(), 4, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="anchors must be a 2-D tensor"):
        TextConditionedEncoder(nn.Identity(), 4, torch.ones(3))
    with pytest.raises(NonFiniteError, match="anchors contains 1 NaN"):
        TextConditionedEncoder(nn.Identity(), 4, torch.tensor([[1.0, float("nan")]]))

    encoder = TextConditionedEncoder(nn.Identity(), 4, anchors)
    inputs = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values \[4\]"):
        encoder.loss(inputs, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values \[-1\]"):
        encoder.loss(inputs, torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        encoder.loss(inputs, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="labels has 2 entries but there are 3 samples"):
        encoder.loss(inputs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features of shape \(N, 4\), got \(3, 5\)"):
        encoder.embed(torch.randn(3, 5))
    with pytest.raises(NonFiniteError, match="backbone features contains 0 NaN and 1 infinite"):
        encoder.embed(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    assert issubclass(NonFiniteError, ValueError)


def test_bad_training_arguments(tmp_path: Path) -> None:
    inputs, labels = make_blobs(per_class=4)
    loader = make_loader(inputs, labels)
    encoder = make_encoder()
    with pytest.raises(ValueError, match="epochs must be > 0, got 0"):
        fit_encoder(encoder, loader, 0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit_encoder(encoder, loader, 1, resume=True)
    with pytest.raises(ValueError, match="amp_dtype must be .* got 'int8'"):
        fit_encoder(encoder, loader, 1, amp_dtype="int8")
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -0.1"):
        fit_encoder(encoder, loader, 1, lr=-0.1)
    with pytest.raises(ValueError, match="train_loader must have a length"):
        fit_encoder(encoder, (batch for batch in loader), 1)
    with pytest.raises(ValueError, match="train_loader is empty"):
        fit_encoder(encoder, [], 1)


# --- feature bank --------------------------------------------------------------------------------------------


def test_feature_bank_from_trained_encoder(trained: tuple[TextConditionedEncoder, Tensor, Tensor, list[float]]) -> None:
    encoder, inputs, labels, _ = trained
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=32)
    bank = FeatureBank.from_encoder(encoder, loader, device="cpu", show_progress=False)
    assert len(bank) == len(labels) and bank.dim == EMBED_DIM and bank.num_classes == NUM_CLASSES
    assert bank.is_normalized()
    with torch.no_grad():
        expected = encoder.embed(inputs)
    assert torch.allclose(bank.embeddings, expected, atol=1e-6)
    assert torch.equal(bank.labels, labels)
    small = FeatureBank.from_encoder(encoder, loader, max_per_class=5, device="cpu", show_progress=False)
    assert small.class_counts.tolist() == [5] * NUM_CLASSES
    for c in range(NUM_CLASSES):
        assert torch.allclose(small.per_class(c), expected[labels == c][:5], atol=1e-6)
