"""resolve_pretrained: complete folders pass, missing or incomplete ones give one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamood.errors import ModelNotFoundError
from dreamood.pretrained import resolve_pretrained


def _make(root: Path, files: list[str]) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}")
    return root


def test_complete_folder_with_either_tokenizer_layout(tmp_path: Path) -> None:
    classic = _make(tmp_path / "a", ["tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/config.json"])
    fast = _make(tmp_path / "b", ["tokenizer/tokenizer.json", "text_encoder/config.json"])
    for folder in (classic, fast):
        assert resolve_pretrained(folder, ("tokenizer", "text_encoder")) == str(folder)


def test_incomplete_folder_names_every_missing_part(tmp_path: Path) -> None:
    folder = _make(tmp_path / "sd", ["tokenizer/vocab.json", "unet/config.json"])
    with pytest.raises(ModelNotFoundError, match="incomplete") as error:
        resolve_pretrained(folder, ("tokenizer", "text_encoder", "unet", "vae"))
    message = str(error.value)
    assert "tokenizer/ (vocab.json, merges.txt or tokenizer.json)" in message
    assert "text_encoder/" in message and "vae/" in message and "unet/" not in message.split("missing")[1].split(".")[0]
    assert "hf download" in message


def test_missing_model_id_is_not_downloaded_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_pretrained("CompVis/stable-diffusion-v1-4", ("unet",))
    assert resolve_pretrained("CompVis/stable-diffusion-v1-4", ("unet",), local_files_only=False) == (
        "CompVis/stable-diffusion-v1-4"
    )


def test_model_id_found_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = _make(tmp_path / "models--org--model" / "snapshots" / "abc", ["unet/config.json"])
    assert resolve_pretrained("org/model", ("unet",)) == str(snapshot)


def test_missing_path_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="was not found"):
        resolve_pretrained(tmp_path / "nowhere", ("unet",))
