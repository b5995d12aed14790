"""Tests for the class anchors T(y) (dreamood.anchors) and the bundled class-name lists (dreamood.data)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.anchors import TokenEmbeddings
from dreamood.data import (
    CIFAR100_CLASSES,
    IMAGENET1K_CLASSES,
    IMAGENET1K_WNIDS,
    IMAGENET100_CLASSES,
    IMAGENET100_WNIDS,
)
from dreamood.errors import ArtifactError, ModelNotFoundError
from dreamood.testing import tiny_clip_text_encoder, tiny_clip_tokenizer, write_tiny_clip_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return tiny_clip_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def text_encoder(tokenizer: Any) -> Any:
    return tiny_clip_text_encoder(len(tokenizer), hidden_size=16)


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: Path) -> dict[str, int]:
    vocab: dict[str, int] = json.loads((tokenizer_dir / "vocab.json").read_text())
    return vocab


def table_of(text_encoder: Any) -> torch.Tensor:
    table: torch.Tensor = text_encoder.get_input_embeddings().weight.detach()
    return table


# --- from_text_encoder ---------------------------------------------------------------------------------------


def test_single_token_names_give_their_rows_exactly(tokenizer: Any, text_encoder: Any, vocab: dict[str, int]) -> None:
    names = ["cat", "dog", "horse"]
    anchors = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, names)
    table = table_of(text_encoder)
    assert anchors.class_names == names
    assert anchors.vectors.shape == (3, table.shape[1])
    assert anchors.vectors.dtype == torch.float32
    for row, name in enumerate(names):
        token = vocab[name + "</w>"]
        assert anchors.token_ids[row] == [token]
        assert torch.equal(anchors.vectors[row], table[token])
    assert torch.allclose(anchors.norms, table[[vocab[n + "</w>"] for n in names]].norm(dim=1))


def test_multi_token_policies(tokenizer: Any, text_encoder: Any, vocab: dict[str, int]) -> None:
    # No merge of the tiny vocabulary touches x, y or z, so "xyz" is three byte tokens; "cat dog" is two words.
    names = ["xyz", "cat dog"]
    expected_ids = [[vocab["x"], vocab["y"], vocab["z</w>"]], [vocab["cat</w>"], vocab["dog</w>"]]]
    table = table_of(text_encoder).double()
    mean = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, names, subword="mean")
    first = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, names, subword="first")
    assert mean.policy == "mean" and first.policy == "first"
    assert mean.token_ids == expected_ids and first.token_ids == expected_ids
    for row, ids in enumerate(expected_ids):
        by_hand = sum(table[i] for i in ids) / len(ids)
        assert torch.allclose(mean.vectors[row].double(), by_hand, atol=1e-7, rtol=0)
        assert torch.equal(first.vectors[row].double(), table[ids[0]])
        assert not torch.allclose(mean.vectors[row], first.vectors[row])


@settings(max_examples=30, deadline=None)
@given(word=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12))
def test_any_lowercase_word_is_fully_covered(tokenizer: Any, text_encoder: Any, word: str) -> None:
    mean = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, [word], subword="mean")
    first = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, [word], subword="first")
    ids = mean.token_ids[0]
    assert first.token_ids[0] == ids
    assert tokenizer.decode(ids).strip() == word
    table = table_of(text_encoder).double()
    assert torch.allclose(mean.vectors[0].double(), table[ids].mean(dim=0), atol=1e-7, rtol=0)
    assert torch.equal(first.vectors[0].double(), table[ids[0]])


def test_unknown_subword_policy_is_rejected(tokenizer: Any, text_encoder: Any) -> None:
    with pytest.raises(ValueError, match="subword must be one of .*'last'"):
        TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["cat"], subword="last")


def test_vocabulary_size_guard(tokenizer: Any) -> None:
    bigger = tiny_clip_text_encoder(len(tokenizer) + 50, hidden_size=8)
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} tokens .* {len(tokenizer) + 50} rows"):
        TokenEmbeddings.from_text_encoder(tokenizer, bigger, ["cat"])
    anchors = TokenEmbeddings.from_text_encoder(tokenizer, bigger, ["cat"], check_vocab=False)
    assert torch.equal(anchors.vectors[0], table_of(bigger)[anchors.token_ids[0][0]])


def test_token_outside_the_table_is_rejected(tokenizer: Any, vocab: dict[str, int]) -> None:
    rows = vocab["cat</w>"]  # "cat" has exactly this id, one past the last row
    smaller = tiny_clip_text_encoder(rows, hidden_size=8)
    with pytest.raises(ValueError, match=rf"'cat' has token id {rows} outside the {rows}-row"):
        TokenEmbeddings.from_text_encoder(tokenizer, smaller, ["cat"], check_vocab=False)


def test_name_mapping_to_the_unknown_token_is_rejected(tmp_path: Path) -> None:
    folder = write_tiny_clip_tokenizer(tmp_path / "tok")
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["QQQ"] = vocab.pop("q</w>")  # same size, but a word ending in "q" can no longer be spelled
    (folder / "vocab.json").write_text(json.dumps(vocab))
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    encoder = tiny_clip_text_encoder(len(tokenizer), hidden_size=8)
    assert TokenEmbeddings.from_text_encoder(tokenizer, encoder, ["cat"]).num_classes == 1
    with pytest.raises(ValueError, match="'iraq' maps to the unknown token"):
        TokenEmbeddings.from_text_encoder(tokenizer, encoder, ["cat", "iraq"])


def test_bad_class_names_are_rejected(tokenizer: Any, text_encoder: Any) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["cat", "cat"])
    with pytest.raises(TypeError, match="single string"):
        TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, "cat")


# --- from_pretrained -----------------------------------------------------------------------------------------


def _write_stable_diffusion_parts(root: Path, text_encoder: Any) -> Path:
    write_tiny_clip_tokenizer(root / "tokenizer")
    text_encoder.save_pretrained(root / "text_encoder")
    return root


def test_from_pretrained_stable_diffusion_layout(tmp_path: Path, tokenizer: Any, text_encoder: Any) -> None:
    root = _write_stable_diffusion_parts(tmp_path / "sd", text_encoder)
    names = ["cat", "xyz", "high-quality photo"]
    loaded = TokenEmbeddings.from_pretrained(root, names, subword="first")
    direct = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, names, subword="first")
    assert loaded.class_names == names and loaded.policy == "first"
    assert loaded.token_ids == direct.token_ids
    assert torch.equal(loaded.vectors, direct.vectors)


def test_from_pretrained_clip_text_model_layout(tmp_path: Path, tokenizer: Any, text_encoder: Any) -> None:
    root = write_tiny_clip_tokenizer(tmp_path / "clip")
    text_encoder.save_pretrained(root)
    loaded = TokenEmbeddings.from_pretrained(str(root), ["dog", "apple pie"])
    direct = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["dog", "apple pie"])
    assert loaded.policy == "mean-norm"
    assert torch.equal(loaded.vectors, direct.vectors)


def test_from_pretrained_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        TokenEmbeddings.from_pretrained(missing, ["cat"])
    message = str(info.value)
    assert str(missing) in message
    assert "tokenizer/" in message and "text_encoder/" in message
    assert "hf download" in message
    assert isinstance(info.value, FileNotFoundError)


def test_from_pretrained_missing_model_id_not_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match="'someone/not-a-model' was not found"):
        TokenEmbeddings.from_pretrained("someone/not-a-model", ["cat"])


def test_from_pretrained_incomplete_folder(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    write_tiny_clip_tokenizer(root / "tokenizer")
    with pytest.raises(ModelNotFoundError, match=r"incomplete: missing text_encoder/") as info:
        TokenEmbeddings.from_pretrained(root, ["cat"])
    assert str(root) in str(info.value)


def test_from_pretrained_text_encoder_without_weights(tmp_path: Path, text_encoder: Any) -> None:
    root = _write_stable_diffusion_parts(tmp_path / "sd", text_encoder)
    for weights in (root / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelNotFoundError, match="could not load the tokenizer and text encoder") as info:
        TokenEmbeddings.from_pretrained(root, ["cat"])
    assert str(root) in str(info.value)


def test_from_pretrained_guards_against_a_tiny_vocabulary(tmp_path: Path, text_encoder: Any) -> None:
    root = tmp_path / "sd"
    text_encoder.save_pretrained(root / "text_encoder")
    write_tiny_clip_tokenizer(root / "tokenizer", words=("cat",))  # far fewer tokens than the table has rows
    with pytest.raises(ValueError, match="tokenizer probably loaded with the wrong vocabulary"):
        TokenEmbeddings.from_pretrained(root, ["cat"])


# --- artefacts -----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path, tokenizer: Any, text_encoder: Any) -> None:
    anchors = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["cat", "xyz"], subword="first")
    path = anchors.save(tmp_path / "anchors")
    loaded = TokenEmbeddings.load(path)
    assert loaded.class_names == anchors.class_names
    assert loaded.token_ids == anchors.token_ids
    assert loaded.policy == "first"
    assert torch.equal(loaded.vectors, anchors.vectors)
    moved = loaded.to("cpu", torch.float64)
    assert moved.vectors.dtype == torch.float64 and moved.token_ids == anchors.token_ids and moved.policy == "first"


def test_load_rejects_an_inconsistent_artefact(tmp_path: Path) -> None:
    path = TokenEmbeddings(["a", "b"], torch.ones(2, 3)).save(tmp_path / "anchors")
    sidecar = path.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    info["metadata"]["class_names"] = ["a", "b", "c"]
    sidecar.write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="was changed after it was saved"):
        TokenEmbeddings.load(path)


@pytest.mark.parametrize(
    ("filename", "class_names"),
    [("token_embed_c100.npy", CIFAR100_CLASSES), ("token_embed_in100.npy", IMAGENET100_CLASSES)],
)
def test_reference_stable_diffusion_anchors(filename: str, class_names: tuple[str, ...]) -> None:
    path = SHARED_DATA / filename
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    anchors = TokenEmbeddings(class_names, torch.from_numpy(np.load(path)))
    assert anchors.num_classes == 100 and anchors.dim == 768
    norms = np.linalg.norm(np.load(path).astype(np.float64), axis=1)
    assert np.allclose(anchors.norms.double().numpy(), norms, atol=1e-6)
    assert float(norms.min()) >= 0.33 and float(norms.max()) <= 0.43


# --- bundled class-name lists --------------------------------------------------------------------------------


def test_cifar100_classes() -> None:
    assert len(CIFAR100_CLASSES) == 100 == len(set(CIFAR100_CLASSES))
    raw = [name.replace(" ", "_") for name in CIFAR100_CLASSES]
    assert raw == sorted(raw)  # CIFAR-100's fine label order is the alphabetical order of its raw names
    assert all("_" not in name and name == name.strip().lower() for name in CIFAR100_CLASSES)
    assert CIFAR100_CLASSES.index("aquarium fish") == 1
    assert CIFAR100_CLASSES.index("maple tree") == 47
    assert CIFAR100_CLASSES.index("worm") == 99


def test_imagenet1k_lists() -> None:
    assert len(IMAGENET1K_WNIDS) == 1000 == len(set(IMAGENET1K_WNIDS))
    assert list(IMAGENET1K_WNIDS) == sorted(IMAGENET1K_WNIDS)
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in IMAGENET1K_WNIDS)
    assert len(IMAGENET1K_CLASSES) == 1000 == len(set(IMAGENET1K_CLASSES))
    assert IMAGENET1K_WNIDS[0] == "n01440764" and IMAGENET1K_CLASSES[:2] == ("tench", "goldfish")
    assert IMAGENET1K_WNIDS[-1] == "n15075141"


def test_imagenet1k_names_match_torchvision() -> None:
    from torchvision.models import ResNet18_Weights

    assert list(IMAGENET1K_CLASSES) == ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def test_imagenet100_lists() -> None:
    assert len(IMAGENET100_WNIDS) == 100 == len(set(IMAGENET100_WNIDS))
    assert set(IMAGENET100_WNIDS) <= set(IMAGENET1K_WNIDS)
    for wnid, name in zip(IMAGENET100_WNIDS, IMAGENET100_CLASSES, strict=True):
        assert IMAGENET1K_CLASSES[IMAGENET1K_WNIDS.index(wnid)] == name
    assert IMAGENET100_WNIDS[0] == "n01498041" and IMAGENET100_WNIDS[-1] == "n07745940"
    assert IMAGENET100_CLASSES[0] == "stingray"
    assert len(set(IMAGENET100_CLASSES)) == 100


def test_class_lists_are_valid_anchor_names() -> None:
    for names in (CIFAR100_CLASSES, IMAGENET100_CLASSES, IMAGENET1K_CLASSES):
        assert TokenEmbeddings(names, torch.ones(len(names), 2)).class_names == list(names)


def test_importing_the_class_lists_stays_light() -> None:
    code = "import sys, dreamood.data; print(sorted(m for m in ('torchvision', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_mean_norm_policy_keeps_the_rows_mean_norm(tokenizer: Any, text_encoder: Any, vocab: dict[str, int]) -> None:
    names = ["xyz", "cat dog", "cat"]
    table = table_of(text_encoder).double()
    anchors = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, names, subword="mean-norm")
    default = TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, names)
    assert anchors.policy == default.policy == "mean-norm"
    assert torch.equal(anchors.vectors, default.vectors)
    for row, ids in enumerate(anchors.token_ids):
        rows = table[ids]
        mean = rows.mean(dim=0)
        expected = mean / mean.norm() * rows.norm(dim=1).mean()
        assert torch.allclose(anchors.vectors[row].double(), expected, atol=1e-6, rtol=0)
    # Single-token names keep their row bit for bit.
    assert torch.equal(anchors.vectors[2].double(), table[vocab["cat</w>"]])


def test_anchors_from_per_class_words(tokenizer: Any, text_encoder: Any, vocab: dict[str, int], tmp_path: Path) -> None:
    table = table_of(text_encoder)
    anchors = TokenEmbeddings.from_text_encoder(
        tokenizer, text_encoder, ["kitten", "puppy"], "first", words=["cat dog", "dog"]
    )
    assert anchors.class_names == ["kitten", "puppy"] and anchors.words == ["cat dog", "dog"]
    assert anchors.token_ids == [[vocab["cat</w>"], vocab["dog</w>"]], [vocab["dog</w>"]]]
    assert torch.equal(anchors.vectors[0], table[vocab["cat</w>"]])
    assert torch.equal(anchors.vectors[1], table[vocab["dog</w>"]])
    loaded = TokenEmbeddings.load(anchors.save(tmp_path / "anchors.safetensors"))
    assert loaded.words == ["cat dog", "dog"] and loaded.policy == "first"
    with pytest.raises(ValueError, match="words has 1 entries but there are 2 class names"):
        TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["kitten", "puppy"], words=["cat"])
    with pytest.raises(ValueError, match=r"words\[1\] is empty"):
        TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["kitten", "puppy"], words=["cat", " "])
    with pytest.raises(TypeError, match="words must be a sequence"):
        TokenEmbeddings.from_text_encoder(tokenizer, text_encoder, ["kitten"], words="cat")
