"""InDomainDiffusionDecoder: DDIM against a from-scratch float64 sampler, training, resuming, saving, digit quality."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from dreamood.anchors import TokenEmbeddings
from dreamood.decoding.in_domain import InDomainDiffusionDecoder
from dreamood.errors import ArtifactError, ModelNotFoundError, NonFiniteError
from dreamood.io import load_checkpoint, save_checkpoint
from dreamood.protocols import EmbeddingDecoder

CLASSES = ["zero", "one", "two"]
TINY = {
    "image_size": 8,
    "embedding_dim": 8,
    "block_out_channels": (8, 16),
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "num_inference_steps": 4,
    "device": "cpu",
}


def _tiny(**overrides: object) -> InDomainDiffusionDecoder:
    return InDomainDiffusionDecoder(CLASSES, **{**TINY, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def decoder() -> InDomainDiffusionDecoder:
    return _tiny()


def _toy_data(count: int = 12, channels: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.rand(count, channels, 8, 8, generator=generator), torch.arange(count) % 3


# ---------------------------------------------------------------- sampling


def _cosine_alphas_cumprod(steps: int) -> np.ndarray:
    """The 'squaredcos_cap_v2' schedule (Nichol & Dhariwal 2021) from its formula, in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    return np.cumprod(1.0 - np.array(betas, dtype=np.float64))


def _reference_ddim(
    model: InDomainDiffusionDecoder, vectors: Tensor, seeds: list[int], steps: int, scale: float
) -> Tensor:
    """Guided deterministic DDIM (Song et al. 2021, eta = 0) with 'leading' timesteps, written out in float64."""
    total = model.num_train_timesteps
    alphas = _cosine_alphas_cumprod(total)
    timesteps = [i * (total // steps) for i in reversed(range(steps))]
    shape = (1, model.in_channels, model.image_size, model.image_size)
    x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()
    null = model.network_.null_embedding.detach().expand(len(seeds), -1)
    with torch.no_grad():
        for t in timesteps:
            t_batch = torch.full((len(seeds),), t)
            unet = model.network_.unet
            eps_null = unet(x.float(), t_batch, encoder_hidden_states=null[:, None]).sample.double()
            eps_cond = unet(x.float(), t_batch, encoder_hidden_states=vectors[:, None]).sample.double()
            eps = eps_null + scale * (eps_cond - eps_null)
            a_t = alphas[t]
            previous = t - total // steps
            a_prev = alphas[previous] if previous >= 0 else 1.0
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return ((x + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)


def test_decode_matches_a_from_scratch_guided_ddim(decoder: InDomainDiffusionDecoder) -> None:
    vectors = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 2.5):
        images = decoder.decode(vectors, torch.tensor([0, 1, 2]), [11, 12, 13], guidance_scale=scale)
        reference = _reference_ddim(decoder, vectors, [11, 12, 13], steps=4, scale=scale)
        assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
        assert torch.allclose(images.double(), reference, atol=1e-4)


def test_decoder_satisfies_the_protocol(decoder: InDomainDiffusionDecoder) -> None:
    assert isinstance(decoder, EmbeddingDecoder)
    assert decoder.embedding_dim == 8 and decoder.class_names == CLASSES
    anchors = decoder.token_embeddings
    assert isinstance(anchors, TokenEmbeddings) and anchors.class_names == CLASSES and anchors.policy == "learned"
    assert torch.equal(anchors.vectors, decoder.network_.class_embeddings.detach())
    images = decoder.decode(anchors.vectors, torch.arange(3), [1, 2, 3])
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grayscale
    assert decoder.decode(anchors.vectors[:0], torch.arange(0), []).shape == (0, 3, 8, 8)


def test_image_depends_on_its_seed_and_vector_not_on_the_batch(decoder: InDomainDiffusionDecoder) -> None:
    vectors = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])
    batch = decoder.decode(vectors, labels, [5, 6, 7, 8])
    alone = decoder.decode(vectors[2:3], labels[2:3], [7])
    reordered = decoder.decode(vectors[[3, 2]], labels[[3, 2]], [8, 7])
    assert torch.allclose(batch[2], alone[0], atol=1e-4)
    assert torch.allclose(batch[[3, 2]], reordered, atol=1e-4)
    assert torch.equal(decoder.decode(vectors, labels, [5, 6, 7, 8]), batch)
    assert not torch.allclose(batch[2], decoder.decode(vectors[2:3], labels[2:3], [9])[0], atol=1e-2)


def test_rgb_decoder_returns_colour_channels() -> None:
    model = _tiny(in_channels=3)
    images = model.decode(model.token_embeddings.vectors, torch.arange(3), [1, 2, 3])
    assert images.shape == (3, 3, 8, 8)
    assert not torch.equal(images[:, 0], images[:, 1])


def test_weights_come_from_the_seed_without_touching_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _tiny(seed=7)
    assert torch.equal(torch.rand(3), expected)
    second, other = _tiny(seed=7), _tiny(seed=8)
    for name, tensor in first.network_.state_dict().items():
        assert torch.equal(tensor, second.network_.state_dict()[name])
    assert not torch.equal(first.network_.class_embeddings, other.network_.class_embeddings)


# ---------------------------------------------------------------- training


def _state(model: InDomainDiffusionDecoder) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.network_.state_dict().items()}


def _assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fit_is_deterministic_and_accepts_datasets() -> None:
    images, labels = _toy_data()
    first = _tiny().fit((images, labels), epochs=2, batch_size=5, show_progress=False, seed=3)
    dataset = list(zip(images, labels.tolist()))
    second = _tiny().fit(dataset, epochs=2, batch_size=5, show_progress=False, seed=3)
    _assert_same_state(_state(first), _state(second))
    assert first.loss_history_ == second.loss_history_ and len(first.loss_history_) == 2
    assert first.epochs_trained_ == 2
    third = _tiny().fit((images, labels), epochs=2, batch_size=5, show_progress=False, seed=4)
    assert not torch.equal(third.network_.class_embeddings, first.network_.class_embeddings)


def test_null_embedding_learns_only_when_the_condition_is_dropped() -> None:
    images, labels = _toy_data()
    never = _tiny(p_uncond=0.0).fit((images, labels), epochs=2, batch_size=4, show_progress=False)
    assert torch.equal(never.network_.null_embedding, torch.zeros(8))
    often = _tiny(p_uncond=0.5).fit((images, labels), epochs=2, batch_size=4, show_progress=False)
    assert not torch.equal(often.network_.null_embedding, torch.zeros(8))


def test_fit_resizes_uint8_images_and_rgb() -> None:
    images, labels = _toy_data(channels=3)
    model = _tiny(in_channels=3).fit(((images * 255).to(torch.uint8), labels), epochs=1, show_progress=False)
    assert model.epochs_trained_ == 1
    big = torch.nn.functional.interpolate(images[:, :1], size=16, mode="nearest")
    assert _tiny().fit((big, labels), epochs=1, show_progress=False).loss_history_[0] > 0


def test_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    images, labels = _toy_data()
    kwargs = {"batch_size": 5, "show_progress": False, "seed": 2}
    straight = _tiny().fit((images, labels), epochs=3, checkpoint_dir=tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    _tiny().fit((images, labels), epochs=1, checkpoint_dir=tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    resumed = _tiny().fit((images, labels), epochs=3, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)  # type: ignore[arg-type]
    _assert_same_state(_state(straight), _state(resumed))
    assert resumed.loss_history_ == straight.loss_history_ and resumed.epochs_trained_ == 3

    with pytest.raises(ValueError, match="fit_args"):
        _tiny().fit((images, labels), epochs=4, checkpoint_dir=tmp_path / "b", resume=True, lr=1e-3, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="config"):
        _tiny(p_uncond=0.2).fit((images, labels), epochs=4, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)  # type: ignore[arg-type]
    (tmp_path / "b" / "in_domain_decoder.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="weights_only"):
        _tiny().fit((images, labels), epochs=4, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)  # type: ignore[arg-type]
    fresh = _tiny().fit((images, labels), epochs=3, checkpoint_dir=tmp_path / "c", resume=True, **kwargs)  # type: ignore[arg-type]
    _assert_same_state(_state(straight), _state(fresh))


def test_a_checkpoint_of_the_former_layout_is_refused_not_misread(tmp_path: Path) -> None:
    images, labels = _toy_data()
    kwargs = {"batch_size": 5, "show_progress": False, "seed": 2}
    _tiny().fit((images, labels), epochs=1, checkpoint_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    state = load_checkpoint(tmp_path / "in_domain_decoder.pt")
    assert (state["format"], state["kind"], state["epoch"]) == ("dreamood.training", "InDomainDiffusionDecoder.fit", 1)
    assert set(state["rng"][0]) == {"generators"}  # only the fit's own generator: the global ones are left alone
    # The entries fit wrote before its checkpoint joined the shared layout.
    former = {
        "config": state["config"],
        "fit_args": state["fit_args"],
        "epoch": 1,
        "network": state["model"],
        "optimizer": state["optimizer"],
        "generator_state": state["rng"][0]["generators"]["fit"][0],
        "loss_history": state["history"],
    }
    save_checkpoint(tmp_path / "in_domain_decoder.pt", former)
    with pytest.raises(ArtifactError, match=r"is not a checkpoint of InDomainDiffusionDecoder.fit \(format None"):
        _tiny().fit((images, labels), epochs=2, checkpoint_dir=tmp_path, resume=True, **kwargs)  # type: ignore[arg-type]


def test_fit_rejects_bad_data() -> None:
    images, labels = _toy_data()
    model = _tiny()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.fit((images * 2, labels), epochs=1, show_progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        model.fit((images, labels + 1), epochs=1, show_progress=False)
    with pytest.raises(ValueError, match="in_channels=1"):
        model.fit((images.expand(-1, 3, -1, -1), labels), epochs=1, show_progress=False)
    with pytest.raises(ValueError, match="11 entries"):
        model.fit((images, labels[:11]), epochs=1, show_progress=False)
    with pytest.raises(NonFiniteError, match="images"):
        model.fit((images.masked_fill(images > 0.9, float("nan")), labels), epochs=1, show_progress=False)
    with pytest.raises(TypeError, match="integer"):
        model.fit((images, labels.float()), epochs=1, show_progress=False)
    with pytest.raises(TypeError, match="tuple or a dataset"):
        model.fit(42, epochs=1, show_progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        model.fit((images, labels), epochs=1, resume=True, show_progress=False)
    with pytest.raises(ValueError, match="epochs"):
        model.fit((images, labels), epochs=0, show_progress=False)


def test_bad_arguments_name_the_problem(decoder: InDomainDiffusionDecoder) -> None:
    vectors = torch.randn(2, 8)
    with pytest.raises(ValueError, match="dimension 5"):
        decoder.decode(torch.randn(2, 5), torch.tensor([0, 1]), [1, 2])
    with pytest.raises(ValueError, match="seeds has 1"):
        decoder.decode(vectors, torch.tensor([0, 1]), [1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        decoder.decode(vectors, torch.tensor([0, 3]), [1, 2])
    with pytest.raises(NonFiniteError, match="vectors"):
        decoder.decode(torch.full((2, 8), float("inf")), torch.tensor([0, 1]), [1, 2])
    with pytest.raises(ValueError, match="guidance_scale"):
        decoder.decode(vectors, torch.tensor([0, 1]), [1, 2], guidance_scale=0.0)
    with pytest.raises(ValueError, match="divisible by 2"):
        _tiny(image_size=7)
    with pytest.raises(ValueError, match="in_channels"):
        _tiny(in_channels=2)
    with pytest.raises(ValueError, match="norm_num_groups"):
        _tiny(block_out_channels=(6, 16))
    with pytest.raises(ValueError, match="p_uncond"):
        _tiny(p_uncond=1.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        _tiny(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="class_names"):
        InDomainDiffusionDecoder([], **TINY)  # type: ignore[arg-type]


# ---------------------------------------------------------------- saving


def test_save_and_load_round_trip_without_pickle(decoder: InDomainDiffusionDecoder, tmp_path: Path) -> None:
    path = decoder.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["decoder.json", "decoder.safetensors"]
    assert path == tmp_path / "model" / "decoder.safetensors"
    loaded = InDomainDiffusionDecoder.from_pretrained(tmp_path / "model", device="cpu")
    assert loaded.config == decoder.config
    _assert_same_state(_state(loaded), _state(decoder))
    vectors = decoder.token_embeddings.vectors
    assert torch.equal(
        loaded.decode(vectors, torch.arange(3), [4, 5, 6]), decoder.decode(vectors, torch.arange(3), [4, 5, 6])
    )

    with pytest.raises(ModelNotFoundError, match="save_pretrained"):
        InDomainDiffusionDecoder.from_pretrained(tmp_path / "missing")
    sidecar = tmp_path / "model" / "decoder.json"
    sidecar.write_text(
        sidecar.read_text().replace('"block_out_channels": [\n        8,', '"block_out_channels": [\n        4,')
    )
    with pytest.raises(ArtifactError, match="was changed after it was saved"):
        InDomainDiffusionDecoder.from_pretrained(tmp_path / "model")


# ---------------------------------------------------------------- quality on the demo digits


@pytest.mark.slow
def test_decoded_digits_are_recognised_by_a_classifier_of_real_digits() -> None:
    """Train on three digit classes (8x8 upsampled to 16x16); a logistic regression on real 8x8 digits must
    recognise the class of most images decoded from the learned anchors T(y)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    classes = [0, 1, 2]
    keep = np.isin(digits.target, classes)
    images = torch.tensor(digits.images[keep], dtype=torch.float32) / 16.0
    labels = torch.tensor([classes.index(int(t)) for t in digits.target[keep]])
    model = InDomainDiffusionDecoder(
        [str(c) for c in classes], image_size=16, block_out_channels=(16, 32), num_inference_steps=10, device="cpu"
    )
    started = time.perf_counter()
    model.fit((images, labels), epochs=15, batch_size=32, lr=4e-3, show_progress=False, seed=0)
    losses = model.loss_history_
    print(f"training: {time.perf_counter() - started:.1f} s, losses {losses[0]:.3f} -> {losses[-1]:.3f}")

    count = 60
    wanted = torch.arange(count) % len(classes)
    decoded = model.decode(model.token_embeddings.vectors[wanted], wanted, list(range(count)))
    assert decoded.shape == (count, 3, 16, 16)
    small = torch.nn.functional.avg_pool2d(decoded[:, :1], 2).reshape(count, 64).numpy() * 16.0
    classifier = LogisticRegression(max_iter=5000).fit(digits.data[keep], digits.target[keep])
    accuracy = float((classifier.predict(small) == np.array(classes)[wanted.numpy()]).mean())
    print(f"decoded-digit accuracy: {accuracy:.3f}")
    assert accuracy >= 0.7
