"""StableDiffusionXLDecoder and two-table anchors, on a tiny random Stable Diffusion XL pipeline (CPU)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from dreamood.anchors import TokenEmbeddings
from dreamood.decoding.sdxl import StableDiffusionXLDecoder
from dreamood.protocols import EmbeddingDecoder
from dreamood.testing import tiny_sdxl_pipeline

TEMPLATE = "A high-quality photo of a {}"
CLASSES = ["cat", "dog", "zebra"]  # "zebra" is several tokens for the tiny tokenizer
SIZE = 32
STEPS = 2
WIDTHS = (32, 48)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tokenizer"), hidden_sizes=WIDTHS)


@pytest.fixture(scope="module")
def decoder(pipeline: Any) -> StableDiffusionXLDecoder:
    return StableDiffusionXLDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False
    )


@pytest.fixture(scope="module")
def anchors(pipeline: Any) -> TokenEmbeddings:
    return TokenEmbeddings.from_text_encoders(
        [pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder, pipeline.text_encoder_2], CLASSES
    )


def _row(encoder: Any, tokenizer: Any, word: str) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1
    return encoder.get_input_embeddings().weight[ids[0]].detach().clone()


def _plain_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _reference(pipeline: Any, prompt: str, seed: int, guidance_scale: float, negative: str | None = None) -> Any:
    return pipeline(
        prompt,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_anchor_is_both_rows_concatenated(pipeline: Any, anchors: TokenEmbeddings) -> None:
    assert anchors.dim == sum(WIDTHS)
    for label in (0, 1):
        word = CLASSES[label]
        expected = torch.cat(
            [
                _row(pipeline.text_encoder, pipeline.tokenizer, word),
                _row(pipeline.text_encoder_2, pipeline.tokenizer_2, word),
            ]
        )
        assert torch.equal(anchors.vectors[label], expected)
    # A multi-token name: the mean of each table's sub-token rows, part by part.
    ids = pipeline.tokenizer("zebra", add_special_tokens=False).input_ids
    first = pipeline.text_encoder.get_input_embeddings().weight[ids].double().mean(0).float()
    second = pipeline.text_encoder_2.get_input_embeddings().weight[ids].double().mean(0).float()
    assert torch.equal(anchors.vectors[2], torch.cat([first, second]))
    assert anchors.token_ids[2] == ids


def test_from_text_encoders_errors(pipeline: Any) -> None:
    with pytest.raises(ValueError, match="one tokenizer per text encoder"):
        TokenEmbeddings.from_text_encoders(
            [pipeline.tokenizer], [pipeline.text_encoder, pipeline.text_encoder_2], CLASSES
        )

    class Shifted:
        """A tokenizer that maps every name one id further."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.unk_token_id = None

        def __len__(self) -> int:
            return len(self.inner)

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [i + 1 for i in self.inner(text, add_special_tokens=False).input_ids]}

    with pytest.raises(ValueError, match="must stand for the same tokens"):
        TokenEmbeddings.from_text_encoders(
            [pipeline.tokenizer, Shifted(pipeline.tokenizer_2)],
            [pipeline.text_encoder, pipeline.text_encoder_2],
            CLASSES,
        )


def test_properties_and_protocol(decoder: StableDiffusionXLDecoder) -> None:
    assert isinstance(decoder, EmbeddingDecoder)
    assert decoder.split == WIDTHS and decoder.embedding_dim == sum(WIDTHS)
    assert decoder.class_names == CLASSES and decoder.prompts[0] == TEMPLATE.format("cat")
    assert "split=(32, 48)" in repr(decoder)
    config = decoder.config
    assert config["split"] == list(WIDTHS) and config["force_zeros_for_empty_prompt"] is True


def test_injection_equals_encoders_with_the_parts_in_their_tables(
    decoder: StableDiffusionXLDecoder, pipeline: Any
) -> None:
    # Independent computation: each part written into a copy of its encoder's table at "cat"'s row, the plain
    # "cat" prompt, and the pipeline's own encode_prompt. The multi-token "zebra" slot must match it.
    generator = torch.Generator().manual_seed(3)
    vector = torch.randn(sum(WIDTHS), generator=generator) * 0.4
    patched = copy.copy(pipeline)
    for name, part in (("text_encoder", vector[: WIDTHS[0]]), ("text_encoder_2", vector[WIDTHS[0] :])):
        encoder = copy.deepcopy(getattr(pipeline, name))
        tokenizer = pipeline.tokenizer if name == "text_encoder" else pipeline.tokenizer_2
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer("cat", add_special_tokens=False).input_ids[0]] = part
        setattr(patched, name, encoder)
    expected, _, pooled, _ = type(pipeline).encode_prompt(
        patched, TEMPLATE.format("cat"), device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    embeds, got_pooled = decoder.encode(torch.stack([vector, vector]), torch.tensor([2, 0]))
    assert embeds.shape == (2, 77, sum(WIDTHS)) and got_pooled.shape == (2, 16)
    for row in range(2):
        torch.testing.assert_close(embeds[row], expected[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got_pooled[row], pooled[0], rtol=0, atol=1e-5)
    # The pooled embedding follows the injected vector (it is not the plain prompt's).
    plain_pooled = decoder.encode_prompts([TEMPLATE.format("cat")])[1]
    assert float((got_pooled[1] - plain_pooled[0]).abs().max()) > 1e-3


def test_anchor_encoding_equals_the_pipelines_encode_prompt(
    decoder: StableDiffusionXLDecoder, pipeline: Any, anchors: TokenEmbeddings
) -> None:
    embeds, pooled = decoder.encode(anchors.vectors[:2], torch.tensor([0, 1]))
    expected, _, expected_pooled, _ = pipeline.encode_prompt(
        [TEMPLATE.format("cat"), TEMPLATE.format("dog")], device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    assert torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)


@pytest.mark.parametrize(("guidance_scale", "negative"), [(5.0, None), (5.0, "a dog"), (1.0, None)])
def test_decoding_the_anchor_is_bit_identical_to_the_plain_pipeline(
    pipeline: Any, anchors: TokenEmbeddings, guidance_scale: float, negative: str | None
) -> None:
    decoder = StableDiffusionXLDecoder(
        pipeline,
        CLASSES,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        negative_prompt=negative,
        height=SIZE,
        width=SIZE,
        progress=False,
    )
    images = decoder.decode(anchors.vectors[1:2], torch.tensor([1]), [7])
    reference = _reference(pipeline, TEMPLATE.format("dog"), 7, guidance_scale, negative)
    assert images.shape == (1, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert torch.equal(images, reference)
    assert torch.equal(decoder.decode_prompts([TEMPLATE.format("dog")], [7]), reference)


def test_batch_invariance_and_dependence_on_each_part(decoder: StableDiffusionXLDecoder, pipeline: Any) -> None:
    vectors = torch.randn(3, sum(WIDTHS), generator=torch.Generator().manual_seed(0)) * 0.4
    labels = torch.tensor([0, 2, 1])
    seeds = [11, 12, 13]
    batch = decoder.decode(vectors, labels, seeds)
    assert batch.shape == (3, 3, SIZE, SIZE)
    alone = StableDiffusionXLDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=1, progress=False
    )
    torch.testing.assert_close(alone.decode(vectors, labels, seeds), batch, rtol=0, atol=1e-5)
    # Changing only the first part, or only the second, changes the image: both encoders receive the vector.
    for columns in (slice(0, WIDTHS[0]), slice(WIDTHS[0], None)):
        changed = vectors[:1].clone()
        changed[:, columns] *= -1
        other = decoder.decode(changed, labels[:1], seeds[:1])
        assert float((other[0] - batch[0]).abs().max()) > 1e-4


def test_hooks_are_removed(decoder: StableDiffusionXLDecoder, pipeline: Any) -> None:
    decoder.decode(torch.randn(1, sum(WIDTHS)), torch.tensor([0]), [1])
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        assert not encoder.get_input_embeddings()._forward_hooks


def test_errors(decoder: StableDiffusionXLDecoder, pipeline: Any) -> None:
    with pytest.raises(ValueError, match=r"takes 80 = 32 \+ 48"):
        decoder.decode(torch.randn(1, 32), torch.tensor([0]), [1])
    with pytest.raises(ValueError, match="labels must lie in"):
        decoder.decode(torch.randn(1, 80), torch.tensor([3]), [1])
    with pytest.raises(ValueError, match="one seed per image"):
        decoder.decode(torch.randn(2, 80), torch.tensor([0, 1]), [1])
    with pytest.raises(ValueError, match="does not appear as its own tokens"):
        StableDiffusionXLDecoder(pipeline, CLASSES, prompt_template="A photo of x{}")
    with pytest.raises(ValueError, match="negative_prompt"):
        StableDiffusionXLDecoder(pipeline, CLASSES, negative_prompt="dog " * 80)
    plain = copy.copy(pipeline)
    plain.text_encoder_2 = None
    with pytest.raises(ValueError, match="has no text_encoder_2"):
        StableDiffusionXLDecoder(plain, CLASSES)
    assert decoder.decode(torch.zeros(0, 80), torch.zeros(0, dtype=torch.long), []).shape == (0, 3, SIZE, SIZE)


def test_from_pretrained_roundtrip(pipeline: Any, anchors: TokenEmbeddings, tmp_path: Path) -> None:
    pipeline.save_pretrained(tmp_path / "sdxl")
    loaded = StableDiffusionXLDecoder.from_pretrained(
        tmp_path / "sdxl", CLASSES, device="cpu", num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False
    )
    assert type(loaded.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert loaded.pipeline.watermark is None
    images = loaded.decode(anchors.vectors[:1], torch.tensor([0]), [5])
    assert torch.equal(images, _reference(pipeline, TEMPLATE.format("cat"), 5, 5.0))


def test_speedups_change_images_only_within_numerics(pipeline: Any, anchors: TokenEmbeddings, tmp_path: Path) -> None:
    pipeline.save_pretrained(tmp_path / "sdxl")
    options: dict[str, Any] = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "progress": False}
    fast = StableDiffusionXLDecoder.from_pretrained(
        tmp_path / "sdxl", CLASSES, device="cpu", channels_last=True, fuse_qkv_projections=True, **options
    )
    assert {type(p).__name__ for p in fast.pipeline.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    images = fast.decode(anchors.vectors[:2], torch.tensor([0, 1]), [5, 6])
    reference = StableDiffusionXLDecoder(pipeline, CLASSES, **options).decode(
        anchors.vectors[:2], torch.tensor([0, 1]), [5, 6]
    )
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        fast.enable_speedups(compile=True, compile_mode="fastest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision_matches_the_plain_pipeline(tmp_path: Path) -> None:
    pipeline = tiny_sdxl_pipeline(tmp_path, hidden_sizes=WIDTHS).to("cuda", torch.float16)
    decoder = StableDiffusionXLDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False
    )
    anchors = TokenEmbeddings.from_text_encoders(
        [pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder, pipeline.text_encoder_2], CLASSES
    )
    images = decoder.decode(anchors.vectors[:1].cuda(), torch.tensor([0]), [2])
    reference = _reference(pipeline, TEMPLATE.format("cat"), 2, 5.0)
    assert images.device.type == "cuda" and images.dtype == torch.float32
    torch.testing.assert_close(images, reference.float(), atol=2e-3, rtol=0)
