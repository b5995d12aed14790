"""Few-step generation settings: scheduler choices, LoRA loading (LCM-LoRA's path), Turbo-style decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dreamood.decoding.backends import load_anchors, load_decoder
from dreamood.decoding.few_step import SCHEDULERS, apply_lora, make_scheduler
from dreamood.errors import ModelNotFoundError
from dreamood.testing import tiny_sdxl_pipeline, tiny_stable_diffusion_pipeline, write_tiny_lora

CLASSES = ["cat", "dog"]
TEMPLATE = "A high-quality photo of a {}"
SIZE = 32
SETTINGS: dict[str, Any] = {"height": SIZE, "width": SIZE, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("few-step")
    sd = tiny_stable_diffusion_pipeline(root / "tok")
    sd.save_pretrained(root / "sd")
    write_tiny_lora(sd, root / "sd-lora", seed=1)
    xl = tiny_sdxl_pipeline(root / "tok-xl")
    xl.save_pretrained(root / "sdxl")
    write_tiny_lora(xl, root / "sdxl-lora", seed=2)
    return {name: root / name for name in ("sd", "sd-lora", "sdxl", "sdxl-lora")}


def test_make_scheduler_classes() -> None:
    from diffusers import PNDMScheduler

    base = PNDMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    expected = {
        "pndm": "PNDMScheduler",
        "ddim": "DDIMScheduler",
        "dpm++": "DPMSolverMultistepScheduler",
        "lcm": "LCMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler-a": "EulerAncestralDiscreteScheduler",
    }
    assert set(expected) | {"model"} == set(SCHEDULERS)
    for name, cls in expected.items():
        made = make_scheduler(name, base)
        assert type(made).__name__ == cls
        assert made.config.prediction_type == "v_prediction" and made.config.beta_schedule == "scaled_linear"
    assert make_scheduler("model", base) is base
    assert make_scheduler("pndm", base).config.skip_prk_steps
    with pytest.raises(ValueError, match="scheduler must be one of"):
        make_scheduler("heun", base)


def _merged_weights(pipeline: Any, lora: Path, scale: float) -> dict[str, torch.Tensor]:
    """Independent merge: W + scale * alpha / r * up @ down for every adapted UNet layer."""
    state = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    merged = {}
    for key, down in state.items():
        if not key.endswith(".lora.down.weight"):
            continue
        name = key.removeprefix("unet.").removesuffix(".lora.down.weight")
        up = state[key.replace(".lora.down.", ".lora.up.")]
        weight = pipeline.unet.get_submodule(name).weight.detach().double()
        merged[name] = weight + scale * (2.0 / 2) * (up.double() @ down.double())  # alpha 2, rank 2
    return merged


@pytest.mark.parametrize(("family", "scale"), [("sd", 1.0), ("sd", 0.5), ("sdxl", 1.0)])
def test_lora_is_loaded_and_fused(models: dict[str, Path], family: str, scale: float) -> None:
    plain = load_decoder(models[family], CLASSES, num_inference_steps=2, **SETTINGS)
    expected = _merged_weights(plain.pipeline, models[f"{family}-lora"], scale)
    assert len(expected) >= 8
    decoder = load_decoder(
        models[family], CLASSES, num_inference_steps=2, lora=models[f"{family}-lora"], lora_scale=scale, **SETTINGS
    )
    for name, weight in expected.items():
        layer = decoder.pipeline.unet.get_submodule(name)
        assert type(layer) is torch.nn.Linear  # fused, no LoRA layers left behind
        torch.testing.assert_close(layer.weight.double(), weight, rtol=0, atol=1e-6)
    assert not decoder.pipeline.get_list_adapters()
    anchors = load_anchors(models[family], CLASSES)
    # A LoRA on the UNet leaves the token tables, hence the anchors, unchanged; the images change.
    assert torch.equal(anchors.vectors, load_anchors(models[family], CLASSES).vectors)
    with_lora = decoder.decode(anchors.vectors[:1], torch.tensor([0]), [3])
    without = plain.decode(anchors.vectors[:1], torch.tensor([0]), [3])
    assert float((with_lora - without).abs().max()) > 1e-3


def test_lora_with_fused_projections(models: dict[str, Path]) -> None:
    # LoRA first, then fused QKV: the fused projections must carry the LoRA update.
    kwargs = {"num_inference_steps": 2, "lora": models["sd-lora"], **SETTINGS}
    reference = load_decoder(models["sd"], CLASSES, **kwargs)
    fused = load_decoder(models["sd"], CLASSES, fuse_qkv_projections=True, **kwargs)
    vectors = load_anchors(models["sd"], CLASSES).vectors
    torch.testing.assert_close(
        fused.decode(vectors, torch.tensor([0, 1]), [1, 2]),
        reference.decode(vectors, torch.tensor([0, 1]), [1, 2]),
        rtol=0,
        atol=1e-4,
    )


def test_lora_errors(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_decoder(models["sd"], CLASSES, lora=tmp_path / "missing", **SETTINGS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="could not load LoRA weights"):
        load_decoder(models["sd"], CLASSES, lora=tmp_path / "empty", **SETTINGS)
    pipeline = load_decoder(models["sd"], CLASSES, **SETTINGS).pipeline
    with pytest.raises(ValueError, match="lora_scale must be a finite number"):
        apply_lora(pipeline, models["sd-lora"], scale=float("nan"))
    # A file path works as well as its folder.
    apply_lora(pipeline, models["sd-lora"] / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize(("scheduler", "steps", "guidance"), [("lcm", 2, 1.0), ("model", 1, 0.0), ("euler-a", 2, 3.0)])
def test_few_step_settings_keep_anchor_decoding_exact(
    models: dict[str, Path], family: str, scheduler: str, steps: int, guidance: float
) -> None:
    # Turbo-style (the folder's scheduler, 1 step, no guidance), LCM and the stochastic Euler-a: decoding a class's
    # anchor is still the plain pipeline's image with the same scheduler, and images do not depend on the batch.
    decoder = load_decoder(
        models[family], CLASSES, scheduler=scheduler, num_inference_steps=steps, guidance_scale=guidance, **SETTINGS
    )
    anchors = load_anchors(models[family], CLASSES)
    images = decoder.decode(anchors.vectors, torch.tensor([0, 1]), [5, 6])
    reference = decoder.pipeline(
        TEMPLATE.format("dog"),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(6),
        output_type="pt",
    ).images
    torch.testing.assert_close(images[1:], reference, rtol=0, atol=1e-5)
    single = decoder.decode(anchors.vectors[1:], torch.tensor([1]), [6])
    assert torch.equal(single, reference)


def test_lora_is_part_of_the_decoder_config(models: dict[str, Path], tmp_path: Path) -> None:
    from dreamood.decoding.generation import decoder_config_hash

    plain = load_decoder(models["sd"], CLASSES, **SETTINGS)
    with_lora = load_decoder(models["sd"], CLASSES, lora=models["sd-lora"], **SETTINGS)
    assert "lora" not in plain.config and plain.lora is None
    assert with_lora.config["lora"]["scale"] == 1.0 and len(with_lora.config["lora"]["sha256"]) == 64
    assert decoder_config_hash(with_lora) != decoder_config_hash(plain)
    # The same weights elsewhere: the same configuration; another scale or another LoRA: another one.
    import shutil

    shutil.copytree(models["sd-lora"], tmp_path / "moved")
    moved = load_decoder(models["sd"], CLASSES, lora=tmp_path / "moved", **SETTINGS)
    assert decoder_config_hash(moved) == decoder_config_hash(with_lora)
    half = load_decoder(models["sd"], CLASSES, lora=models["sd-lora"], lora_scale=0.5, **SETTINGS)
    assert decoder_config_hash(half) != decoder_config_hash(with_lora)
    xl = load_decoder(models["sdxl"], CLASSES, lora=models["sdxl-lora"], **SETTINGS)
    assert xl.config["lora"]["sha256"] != with_lora.config["lora"]["sha256"]
