"""StableDiffusionDecoder and token-embedding injection, on a tiny random Stable Diffusion pipeline (CPU)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dreamood.decoding.injection import build_injection_prompts, inject_token_embeddings, split_template
from dreamood.decoding.stable_diffusion import StableDiffusionDecoder
from dreamood.errors import ModelNotFoundError, NonFiniteError
from dreamood.protocols import EmbeddingDecoder
from dreamood.testing import TINY_WORDS, tiny_stable_diffusion_pipeline, write_tiny_clip_tokenizer

TEMPLATE = "A high-quality photo of a {}"
CLASSES = ["cat", "dog", "zebra"]  # "zebra" is several tokens for the tiny tokenizer
SIZE = 32
STEPS = 2


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_stable_diffusion_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def decoder(pipeline: Any) -> StableDiffusionDecoder:
    return StableDiffusionDecoder(pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False)


def _token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{word!r} is not a single token"
    return int(ids[0])


def _anchor(pipeline: Any, word: str) -> torch.Tensor:
    """T(y): the word's row of the text encoder's input token-embedding table."""
    table = pipeline.text_encoder.get_input_embeddings().weight
    return table[_token_id(pipeline.tokenizer, word)].detach().clone()


def _plain_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """Token ids exactly as diffusers' StableDiffusionPipeline.encode_prompt builds them."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids[0]


def _reference_images(pipeline: Any, prompt: str, seed: int, guidance_scale: float = 7.5) -> torch.Tensor:
    """The plain diffusers pipeline on the prompt text with a seeded generator."""
    return pipeline(
        prompt,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


# --------------------------------------------------------------------------- prompt building


def test_single_token_prompt_ids_equal_the_pipelines(decoder: StableDiffusionDecoder, pipeline: Any) -> None:
    tokens = decoder.prompt_tokens
    for label in (0, 1):
        expected = _plain_ids(pipeline.tokenizer, TEMPLATE.format(CLASSES[label]))
        assert torch.equal(tokens.input_ids[label], expected)
        slot = int(tokens.slots[label])
        assert int(expected[slot]) == _token_id(pipeline.tokenizer, CLASSES[label])
    assert decoder.prompts == [TEMPLATE.format(name) for name in CLASSES]


def test_multi_token_name_span_is_replaced_by_one_slot(decoder: StableDiffusionDecoder, pipeline: Any) -> None:
    tokenizer = pipeline.tokenizer
    name_ids = tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(name_ids) > 1
    tokens = decoder.prompt_tokens
    zebra, cat = tokens.input_ids[2].clone(), tokens.input_ids[0]
    slot = int(tokens.slots[2])
    assert tokens.span_lengths == [1, 1, len(name_ids)]
    assert int(zebra[slot]) == name_ids[0]
    # With the slot's id swapped, the row is the single-token prompt: the rest of the span is gone.
    zebra[slot] = cat[slot]
    assert torch.equal(zebra, cat)
    assert torch.equal(tokens.attention_mask[2], tokens.attention_mask[0])
    plain_length = len(tokenizer(TEMPLATE.format("zebra")).input_ids)
    assert int(tokens.attention_mask[2].sum()) == plain_length - (len(name_ids) - 1)


@settings(max_examples=25, deadline=None)
@given(
    prefix=st.lists(st.sampled_from(TINY_WORDS), max_size=5),
    suffix=st.lists(st.sampled_from(TINY_WORDS), max_size=3),
    name=st.text(alphabet="bcdefghijklmnopqrstuvwxyz", min_size=1, max_size=9),
)
def test_slot_sits_where_the_name_starts(pipeline: Any, prefix: list[str], suffix: list[str], name: str) -> None:
    tokenizer = pipeline.tokenizer
    template = " ".join([*prefix, "{}", *suffix])
    tokens = build_injection_prompts(tokenizer, template, [name, "cat"])
    slot = int(tokens.slots[0])
    assert slot == 1 + len(tokenizer(" ".join(prefix), add_special_tokens=False).input_ids)
    assert int(tokens.input_ids[0, slot]) == tokenizer(name, add_special_tokens=False).input_ids[0]
    row = tokens.input_ids[0].clone()
    row[slot] = _token_id(tokenizer, "cat")
    assert torch.equal(row, _plain_ids(tokenizer, template.format("cat")))


def test_split_template() -> None:
    assert split_template("a {} b") == ("a ", " b")
    assert split_template("{}") == ("", "")
    for bad in ("no placeholder", "{} and {}", "a {0}"):
        with pytest.raises(ValueError, match="exactly one"):
            split_template(bad)
    with pytest.raises(TypeError, match="prompt_template"):
        split_template(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the embedding hook


def test_inject_token_embeddings_swaps_rows_and_removes_the_hook() -> None:
    embedding = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    vectors = torch.tensor([[9.0, 9.0, 9.0, 9.0], [-1.0, -2.0, -3.0, -4.0]])
    slots = torch.tensor([2, 0])
    plain = embedding(ids).detach()
    with torch.no_grad(), inject_token_embeddings(embedding, vectors, slots):
        injected = embedding(ids)
    expected = plain.clone()
    expected[0, 2] = vectors[0]
    expected[1, 0] = vectors[1]
    assert torch.equal(injected, expected)
    assert not embedding._forward_hooks
    assert torch.equal(embedding(ids).detach(), plain)

    with pytest.raises(KeyError), inject_token_embeddings(embedding, vectors, slots):
        raise KeyError("boom")
    assert not embedding._forward_hooks
    with pytest.raises(RuntimeError, match="does not match"), inject_token_embeddings(embedding, vectors, slots):
        embedding(ids[:1])
    assert not embedding._forward_hooks


def test_injection_equals_a_text_encoder_with_the_vector_in_its_table(
    decoder: StableDiffusionDecoder, pipeline: Any
) -> None:
    # Independent computation: no hook, the vector written into a copy of the embedding table at "cat"'s
    # row, and the plain tokenisation of the "cat" prompt. The multi-token "zebra" prompt must match it.
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3)) * 0.4
    encoder = copy.deepcopy(pipeline.text_encoder)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[_token_id(pipeline.tokenizer, "cat")] = vector
        expected = encoder(_plain_ids(pipeline.tokenizer, TEMPLATE.format("cat"))[None])[0]
    got = decoder.encode(torch.stack([vector, vector]), torch.tensor([2, 0]))
    assert got.shape == (2, 77, 32)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], expected[0], rtol=0, atol=1e-6)


def test_anchor_encoding_equals_the_plain_prompt(decoder: StableDiffusionDecoder, pipeline: Any) -> None:
    got = decoder.encode(torch.stack([_anchor(pipeline, "cat"), _anchor(pipeline, "dog")]), torch.tensor([0, 1]))
    plain = decoder.encode_prompts([TEMPLATE.format("cat"), TEMPLATE.format("dog")])
    assert torch.equal(got, plain)
    with torch.no_grad():
        direct = pipeline.text_encoder(_plain_ids(pipeline.tokenizer, TEMPLATE.format("dog"))[None])[0]
    assert torch.equal(plain[1], direct[0])


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_decoding_the_anchor_is_bit_identical_to_the_plain_pipeline(pipeline: Any, guidance_scale: float) -> None:
    decoder = StableDiffusionDecoder(
        pipeline,
        CLASSES,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=SIZE,
        width=SIZE,
        progress=False,
    )
    images = decoder.decode(_anchor(pipeline, "dog")[None], torch.tensor([1]), [7])
    reference = _reference_images(pipeline, TEMPLATE.format("dog"), 7, guidance_scale)
    assert images.shape == (1, 3, SIZE, SIZE)
    assert images.dtype == torch.float32
    assert torch.equal(images, reference)
    assert torch.equal(decoder.decode_prompts([TEMPLATE.format("dog")], [7]), reference)


def test_batch_invariance_and_seed_dependence(decoder: StableDiffusionDecoder, pipeline: Any) -> None:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 32, generator=generator) * 0.4
    labels = torch.tensor([0, 2, 1])
    seeds = [11, 12, 13]
    batch = decoder.decode(vectors, labels, seeds)
    assert batch.shape == (3, 3, SIZE, SIZE)
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    # batch_size=1 decodes every image alone.
    alone = StableDiffusionDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=1, progress=False
    )
    torch.testing.assert_close(alone.decode(vectors, labels, seeds), batch, rtol=0, atol=1e-5)
    # Another seed gives another image, and the vector reaches the image.
    other = decoder.decode(vectors[:2], labels[:1].repeat(2), [99, 11])
    assert float((other[0] - batch[0]).abs().max()) > 1e-3
    assert float((other[1] - batch[0]).abs().max()) > 1e-3


def test_empty_batch(decoder: StableDiffusionDecoder) -> None:
    images = decoder.decode(torch.zeros(0, 32), torch.zeros(0, dtype=torch.long), [])
    assert images.shape == (0, 3, SIZE, SIZE)


def test_output_size_is_an_antialiased_resize(pipeline: Any) -> None:
    vector = _anchor(pipeline, "cat")[None]
    full = StableDiffusionDecoder(pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False)
    small = StableDiffusionDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_size=(16, 8), progress=False
    )
    image = full.decode(vector, torch.tensor([0]), [4])[0].numpy()
    resized = small.decode(vector, torch.tensor([0]), [4])
    assert resized.shape == (1, 3, 16, 8)
    # Independent reference: PIL's (antialiased) bilinear resize of each channel.
    expected = np.stack(
        [np.asarray(Image.fromarray(channel, mode="F").resize((8, 16), Image.BILINEAR)) for channel in image]
    )
    np.testing.assert_allclose(resized[0].numpy(), np.clip(expected, 0, 1), atol=1e-5)


# --------------------------------------------------------------------------- hook hygiene


def test_hook_is_removed_after_decode(decoder: StableDiffusionDecoder, pipeline: Any) -> None:
    table = pipeline.text_encoder.get_input_embeddings()
    hooks_before = dict(table._forward_hooks)
    before = decoder.encode_prompts([TEMPLATE.format("cat")])
    decoder.decode(torch.randn(1, 32), torch.tensor([0]), [1])
    assert dict(table._forward_hooks) == hooks_before
    assert torch.equal(decoder.encode_prompts([TEMPLATE.format("cat")]), before)


def test_hook_is_removed_when_decoding_fails(decoder: StableDiffusionDecoder, pipeline: Any) -> None:
    table = pipeline.text_encoder.get_input_embeddings()
    before = decoder.encode_prompts([TEMPLATE.format("cat")])

    def fail(module: Any, inputs: Any, output: Any) -> None:
        raise RuntimeError("text encoder failed")

    failing = pipeline.text_encoder.register_forward_hook(fail)  # fires after the injection hook did
    try:
        with pytest.raises(RuntimeError, match="text encoder failed"):
            decoder.decode(torch.randn(2, 32), torch.tensor([0, 1]), [1, 2])
    finally:
        failing.remove()
    assert not table._forward_hooks
    assert torch.equal(decoder.encode_prompts([TEMPLATE.format("cat")]), before)


# --------------------------------------------------------------------------- errors


def test_constructor_errors(pipeline: Any) -> None:
    def make(**kwargs: Any) -> StableDiffusionDecoder:
        options: dict[str, Any] = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "progress": False}
        options.update(kwargs)
        classes = options.pop("class_names", CLASSES)
        return StableDiffusionDecoder(pipeline, classes, **options)

    with pytest.raises(ValueError, match="exactly one"):
        make(prompt_template="A photo of a cat")
    with pytest.raises(ValueError, match="exactly one"):
        make(prompt_template="A {} next to a {}")
    with pytest.raises(ValueError, match="longer than the text encoder's window"):
        make(prompt_template="a photo " * 40 + "of a {}")
    with pytest.raises(ValueError, match="negative_prompt"):
        make(negative_prompt="dog " * 80)
    with pytest.raises(ValueError, match="does not appear as its own tokens"):
        make(prompt_template="A photo of x{}")
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        make(height=30)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make(num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        make(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="output_size"):
        make(output_size=(16, 0))
    with pytest.raises(ValueError, match="resize_mode"):
        make(resize_mode="nearest")
    with pytest.raises(ValueError, match="duplicate"):
        make(class_names=["cat", "cat"])


def test_decode_errors(decoder: StableDiffusionDecoder) -> None:
    vectors = torch.randn(2, 32)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dimension 31"):
        decoder.decode(torch.randn(2, 31), labels, [1, 2])
    with pytest.raises(ValueError, match="vectors must be a 2-D"):
        decoder.decode(torch.randn(32), labels[:1], [1])
    with pytest.raises(NonFiniteError, match="vectors"):
        decoder.decode(torch.full((2, 32), float("nan")), labels, [1, 2])
    with pytest.raises(TypeError, match="floating-point"):
        decoder.decode(torch.ones(2, 32, dtype=torch.long), labels, [1, 2])
    with pytest.raises(ValueError, match="labels must lie in"):
        decoder.decode(vectors, torch.tensor([0, 3]), [1, 2])
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        decoder.decode(vectors, torch.tensor([0.0, 1.0]), [1, 2])
    with pytest.raises(ValueError, match="one seed per image"):
        decoder.decode(vectors, labels, [1])
    with pytest.raises(ValueError, match=r"seeds\[1\]"):
        decoder.decode(vectors, labels, [1, -2])
    with pytest.raises(TypeError, match=r"seeds\[0\]"):
        decoder.decode(vectors, labels, [1.5, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="window"):
        decoder.decode_prompts(["cat " * 80], [1])
    with pytest.raises(TypeError, match="single string"):
        decoder.decode_prompts("a cat", [1])


def test_protocol_and_properties(decoder: StableDiffusionDecoder) -> None:
    assert isinstance(decoder, EmbeddingDecoder)
    assert decoder.embedding_dim == 32
    assert decoder.class_names == CLASSES
    assert "num_classes=3" in repr(decoder)


# --------------------------------------------------------------------------- loading


def test_missing_weights_give_the_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        StableDiffusionDecoder.from_pretrained(tmp_path / "missing", CLASSES)
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        StableDiffusionDecoder.from_pretrained(tmp_path / "partial", CLASSES)
    with pytest.raises(ValueError, match="scheduler"):
        StableDiffusionDecoder.from_pretrained(tmp_path / "missing", CLASSES, scheduler="heun")


@pytest.fixture(scope="module")
def saved_pipeline(pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipeline.save_pretrained(folder)
    # The original CLIP file layout (vocab.json, merges.txt) next to whatever the tokenizer saved.
    write_tiny_clip_tokenizer(folder / "tokenizer")
    return folder


LOAD_VECTORS = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 0.4
LOAD_LABELS = torch.tensor([2, 0])
LOAD_SEEDS = [3, 4]


@pytest.fixture(scope="module")
def load_reference(decoder: StableDiffusionDecoder) -> torch.Tensor:
    return decoder.decode(LOAD_VECTORS, LOAD_LABELS, LOAD_SEEDS)


def test_from_pretrained_loads_the_same_model(saved_pipeline: Path, load_reference: torch.Tensor) -> None:
    loaded = StableDiffusionDecoder.from_pretrained(
        saved_pipeline, CLASSES, device="cpu", num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False
    )
    assert type(loaded.pipeline.scheduler).__name__ == "PNDMScheduler"
    assert loaded.pipeline.safety_checker is None
    assert loaded.pipeline.unet.dtype == torch.float32
    assert torch.equal(loaded.decode(LOAD_VECTORS, LOAD_LABELS, LOAD_SEEDS), load_reference)


@pytest.mark.parametrize(("name", "cls"), [("ddim", "DDIMScheduler"), ("dpm++", "DPMSolverMultistepScheduler")])
def test_from_pretrained_scheduler_choice(saved_pipeline: Path, name: str, cls: str) -> None:
    loaded = StableDiffusionDecoder.from_pretrained(saved_pipeline, CLASSES, device="cpu", scheduler=name)
    assert type(loaded.pipeline.scheduler).__name__ == cls
    if name == "dpm++":
        assert loaded.pipeline.scheduler.config.algorithm_type == "dpmsolver++"


def test_speedups_change_images_only_within_numerics(saved_pipeline: Path, load_reference: torch.Tensor) -> None:
    fast = StableDiffusionDecoder.from_pretrained(
        saved_pipeline,
        CLASSES,
        device="cpu",
        channels_last=True,
        fuse_qkv_projections=True,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        progress=False,
    )
    assert fast.pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for model in (fast.pipeline.unet, fast.pipeline.vae):
        processors = {type(p).__name__ for p in model.attn_processors.values()}
        assert processors == {"FusedAttnProcessor2_0"}
    images = fast.decode(LOAD_VECTORS, LOAD_LABELS, LOAD_SEEDS)
    torch.testing.assert_close(images, load_reference, atol=1e-4, rtol=0)


def test_compiled_unet_and_vae_give_the_eager_images(saved_pipeline: Path, load_reference: torch.Tensor) -> None:
    # The eager backend captures the graphs without generating code: it checks the wiring in seconds.
    compiled = StableDiffusionDecoder.from_pretrained(
        saved_pipeline,
        CLASSES,
        device="cpu",
        compile=True,
        compile_vae=True,
        compile_backend="eager",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        progress=False,
    )
    for module in (compiled.pipeline.unet, compiled.pipeline.vae.decoder):
        assert module._compiled_call_impl is not None
    assert compiled.pipeline.vae.encoder._compiled_call_impl is None
    images = compiled.decode(LOAD_VECTORS, LOAD_LABELS, LOAD_SEEDS)
    torch.testing.assert_close(images, load_reference, atol=1e-5, rtol=0)


def test_speedup_arguments_are_checked(decoder: StableDiffusionDecoder) -> None:
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        decoder.enable_speedups(compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="compile_backend"):
        decoder.enable_speedups(compile=True, compile_backend="")


def test_half_precision_decodes(saved_pipeline: Path, pipeline: Any) -> None:
    loaded = StableDiffusionDecoder.from_pretrained(
        saved_pipeline,
        CLASSES,
        device="cpu",
        torch_dtype="bf16",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        output_size=16,
        progress=False,
    )
    assert loaded.pipeline.unet.dtype == torch.bfloat16
    anchor = _anchor(pipeline, "cat")[None]
    embeds = loaded.encode(anchor, torch.tensor([0]))
    assert embeds.dtype == torch.bfloat16
    images = loaded.decode(anchor, torch.tensor([0]), [1])
    assert images.shape == (1, 3, 16, 16)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision_matches_the_plain_pipeline(tmp_path: Path) -> None:
    pipeline = tiny_stable_diffusion_pipeline(tmp_path).to("cuda", torch.float16)
    decoder = StableDiffusionDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False
    ).enable_speedups(channels_last=True)
    images = decoder.decode(_anchor(pipeline, "cat")[None], torch.tensor([0]), [2])
    reference = _reference_images(pipeline, TEMPLATE.format("cat"), 2)
    assert images.device.type == "cuda"
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, reference.float(), atol=2e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_generation_matches_the_plain_pipeline(tmp_path: Path) -> None:
    from PIL import Image

    from dreamood.decoding.generation import generate_images, image_seed
    from dreamood.sampling.samples import EmbeddingSamples

    pipeline = tiny_stable_diffusion_pipeline(tmp_path / "tokenizer").to("cuda", torch.float16)
    # generate_images seeds image 0 of a generation seeded with 0 by image_seed(0, 0).
    reference = _reference_images(pipeline, TEMPLATE.format("cat"), image_seed(0, 0)).float().cpu()[0]
    decoder = StableDiffusionDecoder(
        pipeline, CLASSES, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False
    ).enable_speedups(channels_last=True, fuse_qkv_projections=True, compile=True, compile_vae=True)
    samples = EmbeddingSamples(_anchor(pipeline, "cat")[None].float(), torch.tensor([0]))
    generate_images(decoder, samples, tmp_path / "out", seed=0, show_progress=False)
    with Image.open(tmp_path / "out" / "000" / "000000.png") as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(pixels, reference, atol=3 / 255, rtol=0)


def test_config_identifies_the_output_settings(tmp_path: Path) -> None:
    import json

    from dreamood.decoding.generation import decoder_config_hash
    from dreamood.testing import tiny_stable_diffusion_pipeline

    pipeline = tiny_stable_diffusion_pipeline(tmp_path)
    decoder = StableDiffusionDecoder(pipeline, ["cat", "dog"], num_inference_steps=2, height=32, width=32)
    config = decoder.config
    assert json.loads(json.dumps(config)) == config
    assert config["scheduler"] == type(pipeline.scheduler).__name__ and config["num_inference_steps"] == 2
    before = decoder_config_hash(decoder)
    decoder.guidance_scale = 3.0
    assert decoder_config_hash(decoder) != before
