"""The backend factory: model families from model_index.json, Stable Diffusion 2.x, anchors that fit the decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dreamood.anchors import TokenEmbeddings
from dreamood.decoding.backends import (
    AnchorMismatchError,
    ModelInfo,
    UnsupportedModelError,
    check_anchors,
    inspect_model,
    load_anchors,
    load_decoder,
)
from dreamood.decoding.sdxl import StableDiffusionXLDecoder
from dreamood.decoding.stable_diffusion import StableDiffusionDecoder
from dreamood.errors import ModelNotFoundError
from dreamood.testing import tiny_sd2_pipeline, tiny_sdxl_pipeline, tiny_stable_diffusion_pipeline

TEMPLATE = "A high-quality photo of a {}"
CLASSES = ["cat", "dog", "zebra"]
SIZE = 32
STEPS = 2
SETTINGS: dict[str, Any] = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "progress": False}


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tiny_sd2_pipeline(tmp_path_factory.mktemp("sd2-tokenizer"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, sd2: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    sd2.save_pretrained(root / "sd2")
    tiny_stable_diffusion_pipeline(root / "tok1").save_pretrained(root / "sd1")
    tiny_sdxl_pipeline(root / "tok-xl").save_pretrained(root / "sdxl")
    return {name: root / name for name in ("sd1", "sd2", "sdxl")}


def _row(pipeline: Any, word: str) -> torch.Tensor:
    ids = pipeline.tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1
    return pipeline.text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()


# --------------------------------------------------------------------------- Stable Diffusion 2.x


def test_sd2_like_pipeline_has_what_differs_from_v1(sd2: Any) -> None:
    assert sd2.text_encoder.get_input_embeddings().embedding_dim == 48
    assert sd2.tokenizer.pad_token == "!" and sd2.tokenizer.pad_token_id != sd2.tokenizer.eos_token_id
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.text_encoder.config.eos_token_id == 2  # OpenCLIP's legacy ids: pooling at the largest id


def test_sd2_prompt_ids_pad_with_its_pad_token(sd2: Any) -> None:
    decoder = StableDiffusionDecoder(sd2, CLASSES, **SETTINGS)
    expected = sd2.tokenizer(
        TEMPLATE.format("cat"), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids[0]
    assert torch.equal(decoder.prompt_tokens.input_ids[0], expected)
    assert int(expected[-1]) == sd2.tokenizer.pad_token_id
    # The multi-token name's row is padded with "!" as well, one slot replacing its span.
    assert int(decoder.prompt_tokens.input_ids[2, -1]) == sd2.tokenizer.pad_token_id


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_sd2_anchor_decoding_is_bit_identical_to_the_plain_pipeline(sd2: Any, guidance_scale: float) -> None:
    decoder = StableDiffusionDecoder(sd2, CLASSES, guidance_scale=guidance_scale, **SETTINGS)
    assert decoder.embedding_dim == 48
    images = decoder.decode(_row(sd2, "dog")[None], torch.tensor([1]), [3])
    reference = sd2(
        TEMPLATE.format("dog"),
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    assert torch.equal(images, reference)


def test_v_prediction_is_kept_by_every_scheduler_choice(folders: dict[str, Path]) -> None:
    for name in ("pndm", "ddim", "dpm++", "lcm", "euler", "euler-a", "model"):
        decoder = load_decoder(folders["sd2"], CLASSES, scheduler=name, device="cpu", **SETTINGS)
        assert decoder.pipeline.scheduler.config.prediction_type == "v_prediction", name


# --------------------------------------------------------------------------- the factory


def test_inspect_model_reads_family_and_widths(folders: dict[str, Path]) -> None:
    sd1 = inspect_model(folders["sd1"])
    assert (sd1.family, sd1.pipeline_class, sd1.token_widths) == ("stable-diffusion", "StableDiffusionPipeline", (32,))
    assert inspect_model(folders["sd2"]).embedding_dim == 48
    xl = inspect_model(folders["sdxl"])
    assert (xl.family, xl.token_widths, xl.embedding_dim) == ("stable-diffusion-xl", (32, 48), 80)


def test_load_decoder_picks_the_family(folders: dict[str, Path]) -> None:
    sd1 = load_decoder(folders["sd1"], CLASSES, device="cpu", **SETTINGS)
    assert type(sd1) is StableDiffusionDecoder and type(sd1.pipeline.scheduler).__name__ == "PNDMScheduler"
    xl = load_decoder(folders["sdxl"], CLASSES, device="cpu", **SETTINGS)
    assert type(xl) is StableDiffusionXLDecoder and xl.embedding_dim == 80


def test_load_anchors_fit_their_decoders(folders: dict[str, Path]) -> None:
    for name, width in (("sd1", 32), ("sd2", 48), ("sdxl", 80)):
        anchors = load_anchors(folders[name], CLASSES)
        decoder = load_decoder(folders[name], CLASSES, device="cpu", **SETTINGS)
        assert anchors.dim == width == decoder.embedding_dim
        check_anchors(anchors, decoder)
        check_anchors(anchors, folders[name])
        # Decoding a class's own anchor is the plain prompt's image, whatever the family.
        images = decoder.decode(anchors.vectors[:1], torch.tensor([0]), [4])
        assert torch.equal(images, decoder.decode_prompts([TEMPLATE.format("cat")], [4]))


def test_load_anchors_of_a_clip_text_model_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    from dreamood.testing import write_tiny_clip_tokenizer

    CLIPTextModel.from_pretrained(folders["sd1"] / "text_encoder").save_pretrained(tmp_path)
    write_tiny_clip_tokenizer(tmp_path)
    anchors = load_anchors(tmp_path, CLASSES)
    assert torch.equal(anchors.vectors, load_anchors(folders["sd1"], CLASSES).vectors)


def test_check_anchors_errors(folders: dict[str, Path]) -> None:
    sd1 = load_anchors(folders["sd1"], CLASSES)
    xl = load_decoder(folders["sdxl"], CLASSES, device="cpu", **SETTINGS)
    with pytest.raises(AnchorMismatchError, match=r"32-d but .* takes 80-d vectors \(32 \+ 48"):
        check_anchors(sd1, folders["sdxl"])
    with pytest.raises(AnchorMismatchError, match="32-d but the decoder StableDiffusionXLDecoder takes 80-d"):
        check_anchors(sd1, xl)
    sd1_decoder = load_decoder(folders["sd1"], CLASSES, device="cpu", **SETTINGS)
    with pytest.raises(AnchorMismatchError, match="differ from the decoder's"):
        check_anchors(load_anchors(folders["sd1"], ["dog", "cat", "zebra"]), sd1_decoder)
    # Same width, another model's table: the rows give it away.
    other = TokenEmbeddings(CLASSES, sd1.vectors.flip(1), token_ids=sd1.token_ids, policy="mean")
    with pytest.raises(AnchorMismatchError, match="not that class's row"):
        check_anchors(other, sd1_decoder)
    # Half-precision rows pass.
    check_anchors(TokenEmbeddings(CLASSES, sd1.vectors.half().float(), token_ids=sd1.token_ids), sd1_decoder)
    check_anchors(TokenEmbeddings(CLASSES, sd1.vectors.flip(1)), sd1_decoder)  # given vectors: width only
    info = ModelInfo("m", "StableDiffusionPipeline", "stable-diffusion", (32,), (10,))
    with pytest.raises(AnchorMismatchError, match="outside the 10-row token table"):
        check_anchors(sd1, info)


def _model_index(folder: Path, index: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    ("pipeline_class", "match"),
    [
        ("FluxPipeline", "FLUX.1 conditions on T5-XXL"),
        ("StableDiffusion3Pipeline", "T5-XXL"),
        ("PixArtSigmaPipeline", "T5 encoder"),
        ("LatentConsistencyModelPipeline", "LCM-LoRA"),
        ("StableDiffusionXLImg2ImgPipeline", "image-to-image"),
    ],
)
def test_unsupported_families_say_what_is_needed(tmp_path: Path, pipeline_class: str, match: str) -> None:
    folder = _model_index(tmp_path / "m", {"_class_name": pipeline_class})
    for call in (inspect_model, lambda m: load_decoder(m, CLASSES), lambda m: load_anchors(m, CLASSES)):
        with pytest.raises(UnsupportedModelError, match=match) as error:
            call(folder)
        assert pipeline_class in str(error.value) and "StableDiffusionXLPipeline" in str(error.value)


def test_unknown_t5_family_is_recognised(tmp_path: Path) -> None:
    index = {"_class_name": "SomeNewPipeline", "text_encoder": ["transformers", "T5EncoderModel"]}
    with pytest.raises(UnsupportedModelError, match=r"T5 encoder.*text_encoder: T5EncoderModel"):
        inspect_model(_model_index(tmp_path / "m", index))


def test_missing_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_decoder(tmp_path / "missing", CLASSES)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_decoder(tmp_path / "bare", CLASSES)
    with pytest.raises(ModelNotFoundError, match=r"text_encoder/config.json is missing"):
        inspect_model(_model_index(tmp_path / "partial", {"_class_name": "StableDiffusionXLPipeline"}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="not valid JSON"):
        inspect_model(tmp_path / "bad")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_generation_stage_runs_on_every_backend(tmp_path: Path, family: str) -> None:
    # The pipeline's anchors -> sampled embeddings -> images path, on a model folder of each family.
    from PIL import Image

    from dreamood.decoding.generation import generate_images
    from dreamood.sampling.samples import EmbeddingSamples
    from dreamood.testing import write_tiny_model

    model = write_tiny_model(tmp_path / family, family)
    anchors = load_anchors(model, CLASSES)
    decoder = load_decoder(model, CLASSES, device="cpu", output_size=16, **SETTINGS)
    check_anchors(anchors, decoder)
    noise = torch.randn(4, anchors.dim, generator=torch.Generator().manual_seed(0))
    vectors = torch.nn.functional.normalize(anchors.vectors[[0, 0, 2, 2]] + 0.1 * noise, dim=1)
    vectors = vectors * anchors.norms[[0, 0, 2, 2], None]
    samples = EmbeddingSamples(vectors, torch.tensor([0, 0, 2, 2]))
    result = generate_images(decoder, samples, tmp_path / "images", batch_size=2, show_progress=False)
    assert result.generated == 4
    files = sorted((tmp_path / "images").glob("*/*.png"))
    assert [path.parent.name for path in files] == ["000", "000", "002", "002"]
    with Image.open(files[0]) as image:
        assert image.size == (16, 16)
