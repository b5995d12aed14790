"""Missing-model advice tells a local folder from a Hub id; a tokenizer without tokenizer_config.json works."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dreamood.errors import ModelNotFoundError
from dreamood.pretrained import is_local_path, resolve_pretrained


@pytest.mark.parametrize(
    "name,local",
    [
        ("CompVis/stable-diffusion-v1-4", False),
        ("stable-diffusion-v1-4", False),
        ("./models/sd", True),
        ("/abs/sd", True),
        ("~/sd", True),
        ("a/b/c", True),
    ],
)
def test_local_paths_and_hub_ids(name: str, local: bool) -> None:
    assert is_local_path(name) is local


def test_a_missing_local_folder_gets_download_into_it_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError) as error:
        resolve_pretrained("models/stable-diffusion-v1-4", ("unet",), local_files_only=False)
    message = str(error.value)
    assert "no such folder" in message and "is a local folder" in message
    assert "hf download CompVis/stable-diffusion-v1-4 --local-dir models/stable-diffusion-v1-4" in message
    assert "hf download models/" not in message and "local_files_only" not in message


def test_a_missing_hub_id_gets_python_and_cli_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError) as error:
        resolve_pretrained("CompVis/stable-diffusion-v1-4", ("unet",))
    message = str(error.value)
    assert "hf download CompVis/stable-diffusion-v1-4 --local-dir <folder>" in message
    assert "local_files_only=False" in message and "--set generation.local_files_only=false" in message


def test_an_incomplete_local_folder_gets_local_advice(tmp_path: Path) -> None:
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="incomplete") as error:
        resolve_pretrained(tmp_path / "sd", ("unet",))
    assert "is a local folder" in str(error.value) and "--local-dir" in str(error.value)


def _decoder(pipeline: Any) -> Any:
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder

    return StableDiffusionDecoder(pipeline, ["cat", "dog"], num_inference_steps=1, height=32, width=32, progress=False)


def test_tokenizer_without_tokenizer_config_uses_the_encoder_positions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import CLIPTokenizer

    from dreamood.testing import tiny_stable_diffusion_pipeline, write_tiny_clip_tokenizer

    pipeline = tiny_stable_diffusion_pipeline(tmp_path / "tiny")
    folder = write_tiny_clip_tokenizer(tmp_path / "bare")
    assert not (Path(folder) / "tokenizer_config.json").exists()
    pipeline.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert pipeline.tokenizer.model_max_length > 10**29  # transformers' placeholder
    with caplog.at_level(logging.WARNING, logger="dreamood"):
        _decoder(pipeline)
    assert pipeline.tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings
    assert "no tokenizer_config.json" in caplog.text
    pipeline.tokenizer.model_max_length = 100
    with pytest.raises(ValueError, match=r"tokenizer_config.json should set model_max_length"):
        _decoder(pipeline)
