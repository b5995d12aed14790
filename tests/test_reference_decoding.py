"""Per-class prompts, "token" injection, conditioning noise and a fixed starting latent (tiny pipeline, CPU)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from dreamood.decoding.injection import build_token_prompts, tokenize_prompts
from dreamood.decoding.stable_diffusion import StableDiffusionDecoder
from dreamood.testing import TINY_WORDS, tiny_stable_diffusion_pipeline

SIZE = 32
STEPS = 2
WORDS = (*TINY_WORDS, "chimp", "bite")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_stable_diffusion_pipeline(tmp_path_factory.mktemp("tokenizer"), words=WORDS)


def _decoder(pipeline: Any, classes: list[str], **options: Any) -> StableDiffusionDecoder:
    return StableDiffusionDecoder(
        pipeline, classes, num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False, **options
    )


def _token(pipeline: Any, word: str) -> int:
    ids = pipeline.tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1
    return int(ids[0])


def _plain_images(pipeline: Any, prompt: str, seed: int) -> torch.Tensor:
    return pipeline(
        prompt,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_token_mode_equals_overwriting_the_vocabulary_row_bit_for_bit(pipeline: Any) -> None:
    # The token "cat" occurs twice in the first prompt; the second class keeps its other sub-tokens ("zebra").
    classes = ["kitten", "zebra"]
    templates = ["An image of the {} bird", "A photo of a {}"]
    decoder = _decoder(
        pipeline,
        classes,
        prompt_template=templates,
        prompt_words=["cat and cat", "zebra dog"],
        injection="token",
        injection_words=["cat", "dog"],
    )
    assert decoder.prompts == ["An image of the cat and cat bird", "A photo of a zebra dog"]
    tokens = decoder.prompt_tokens
    assert tokens.slot_mask is not None and tokens.slot_mask.sum(dim=1).tolist() == [2, 1]
    plain_ids, _ = tokenize_prompts(pipeline.tokenizer, decoder.prompts)
    assert torch.equal(tokens.input_ids, plain_ids)

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 0.4
    for label, word in enumerate(["cat", "dog"]):
        images = decoder.decode(vectors[label : label + 1], torch.tensor([label]), [3 + label])
        # The authors' way: the token's row of the embedding table holds the vector, the prompt is plain text.
        overwritten = copy.deepcopy(pipeline)
        with torch.no_grad():
            overwritten.text_encoder.get_input_embeddings().weight[_token(pipeline, word)] = vectors[label]
        expected = _plain_images(overwritten, decoder.prompts[label], 3 + label)
        assert torch.equal(images, expected)
        conditioning = decoder.encode(vectors[label : label + 1], torch.tensor([label]))
        assert torch.equal(
            conditioning, StableDiffusionDecoder.encode_prompts(_decoder(overwritten, ["x"]), [decoder.prompts[label]])
        )


def test_token_mode_refuses_a_prompt_without_the_token(pipeline: Any) -> None:
    # CIFAR-100's chimpanzee: the injection word "chimp" is one token that "chimpanzee" does not contain.
    with pytest.raises(ValueError, match=r"class 1 \('chimpanzee'\).*does not occur in its prompt"):
        _decoder(pipeline, ["cat", "chimpanzee"], injection="token", injection_words=["cat", "chimp"])
    with pytest.raises(ValueError, match="does not occur"):
        build_token_prompts(pipeline.tokenizer, "A photo of a {}", ["dog"], [_token(pipeline, "cat")])
    with pytest.raises(ValueError, match="injection_words are used by the 'token' injection mode only"):
        _decoder(pipeline, ["cat"], injection_words=["cat"])
    with pytest.raises(ValueError, match="injection must be one of"):
        _decoder(pipeline, ["cat"], injection="row")
    with pytest.raises(ValueError, match="prompt_words has 1 entries but there are 2 classes"):
        _decoder(pipeline, ["cat", "dog"], prompt_words=["cat"])
    with pytest.raises(ValueError, match="2 per-class templates but there are 1 classes"):
        _decoder(pipeline, ["cat"], prompt_template=["a {}", "the {}"])


def test_token_mode_default_injects_the_prompt_words_first_token(pipeline: Any) -> None:
    decoder = _decoder(pipeline, ["cat", "dog"], injection="token", prompt_template="A photo of a {}")
    anchor = pipeline.text_encoder.get_input_embeddings().weight[[_token(pipeline, "cat"), _token(pipeline, "dog")]]
    assert torch.equal(decoder.encode(anchor.detach(), torch.tensor([0, 1])), decoder.encode_prompts(decoder.prompts))
    assert decoder.config["injection"] == "token"


def test_per_class_templates_and_words_in_span_mode(pipeline: Any) -> None:
    decoder = _decoder(
        pipeline,
        ["tick", "dog"],
        prompt_template=["An image of the {} bite", "A photo of a {}"],
        prompt_words=["cat", "dog"],
    )
    assert decoder.prompts == ["An image of the cat bite", "A photo of a dog"]
    single = _decoder(pipeline, ["cat"], prompt_template="An image of the {} bite")
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decoder.encode(vector, torch.tensor([0])), single.encode(vector, torch.tensor([0])))
    assert decoder.config["prompt_template"] == ["An image of the {} bite", "A photo of a {}"]
    assert decoder.config["prompt_words"] == ["cat", "dog"]
    # Defaults add no keys: folders generated before these options keep their identity.
    plain = _decoder(pipeline, ["cat"]).config
    assert not {"prompt_words", "injection", "conditioning_noise", "fixed_latent_seed"} & set(plain)


def test_conditioning_noise_is_seeded_gaussian_noise_on_the_prompt_embeddings(pipeline: Any) -> None:
    from diffusers.utils.torch_utils import randn_tensor

    scale = 0.3
    decoder = _decoder(pipeline, ["cat", "dog"], conditioning_noise=scale, guidance_scale=1.0)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(2)) * 0.4
    labels = torch.tensor([0, 1])
    images = decoder.decode(vectors, labels, [10, 11])
    assert torch.equal(images, decoder.decode(vectors, labels, [10, 11]))
    assert not torch.equal(images, decoder.decode(vectors, labels, [10, 12]))
    # By hand: each image's generator draws its latent, then the noise added to its conditioning.
    conditioning = decoder.encode(vectors, labels)
    generators = [torch.Generator().manual_seed(seed) for seed in (10, 11)]
    latents = randn_tensor((2, 4, SIZE // 8, SIZE // 8), generator=generators, dtype=conditioning.dtype)
    noise = torch.stack([torch.randn(conditioning.shape[1:], generator=g) for g in generators])
    expected = pipeline(
        prompt_embeds=conditioning + scale * noise,
        latents=latents,
        generator=generators,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        output_type="pt",
    ).images
    assert torch.equal(images, expected.clamp(0, 1))
    assert torch.equal(
        _decoder(pipeline, ["cat"], conditioning_noise=0.0).decode(vectors[:1], labels[:1], [10]),
        _decoder(pipeline, ["cat"]).decode(vectors[:1], labels[:1], [10]),
    )
    with pytest.raises(ValueError, match="conditioning_noise"):
        _decoder(pipeline, ["cat"], conditioning_noise=-1.0)


def test_fixed_latent_starts_every_image_from_one_latent(pipeline: Any) -> None:
    decoder = _decoder(pipeline, ["cat", "dog"], fixed_latent_seed=7)
    free = _decoder(pipeline, ["cat", "dog"])
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(4)).expand(3, -1)
    labels = torch.tensor([0, 0, 0])
    images = decoder.decode(vector, labels, [1, 2, 3])
    # PNDM is deterministic: the same latent and conditioning give the same image whatever the seed.
    assert torch.equal(images[0], images[1]) and torch.equal(images[1], images[2])
    one = decoder.decode(vector[:1], labels[:1], [5])
    assert torch.equal(one, free.decode(vector[:1], labels[:1], [7]))
    assert decoder.config["fixed_latent_seed"] == 7
    with pytest.raises(ValueError, match="must lie in"):
        _decoder(pipeline, ["cat"], fixed_latent_seed=-1)
