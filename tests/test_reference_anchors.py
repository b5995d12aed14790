"""Anchors and prompts of the reference configurations, checked with OpenAI's real 49,408-token CLIP vocabulary.

The published anchors (``../shared/data/token_embed_*.npy``) are rows of Stable Diffusion v1.4's token-embedding
table, which the tests do not have; what can be compared is which token each class uses: the rows shared between
the two files must be exactly the classes whose injection words share a first token.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dreamood import TokenEmbeddings
from dreamood.data import CIFAR100_CLASSES, IMAGENET100_CLASSES, reference_words

# The authors' published data, beside the checkout (skipped where absent).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DATASETS = ("cifar100", "imagenet100")
NAMES = {"cifar100": CIFAR100_CLASSES, "imagenet100": IMAGENET100_CLASSES}
PUBLISHED = {"cifar100": "token_embed_c100.npy", "imagenet100": "token_embed_in100.npy"}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False).input_ids]


@pytest.fixture(scope="module")
def openai_encode(clip_tokenizer: Any) -> Any:
    """OpenAI's own tokenizer (``clip/simple_tokenizer.py`` of clip-anytorch), loaded without importing ``clip``."""
    pytest.importorskip("ftfy")
    spec = importlib.util.find_spec("clip")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", folder / "simple_tokenizer.py")
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(folder / "bpe_simple_vocab_16e6.txt.gz")).encode


class _TextEncoder:
    """Just what ``TokenEmbeddings.from_text_encoder`` reads: the input token-embedding table."""

    def __init__(self, table: torch.Tensor) -> None:
        self.embedding = nn.Embedding.from_pretrained(table)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding


def _first_tokens(tokenizer: Any, words: tuple[str, ...]) -> list[int]:
    return [_ids(tokenizer, word)[0] for word in words]


@pytest.mark.parametrize("dataset", DATASETS)
def test_injection_word_and_prompt_ids_agree_with_openai_tokenizer(
    clip_tokenizer: Any, openai_encode: Any, dataset: str
) -> None:
    words = reference_words(dataset)
    for word, prompt in zip(words.injection_words, words.prompts):
        assert _ids(clip_tokenizer, word) == openai_encode(word)
        assert _ids(clip_tokenizer, prompt) == openai_encode(prompt)
    firsts = _first_tokens(clip_tokenizer, words.injection_words)
    assert len(set(firsts)) == 100  # the published rows are pairwise different


def test_known_token_ids(clip_tokenizer: Any) -> None:
    assert clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer.convert_ids_to_tokens(_ids(clip_tokenizer, "chimpanzee")) == ["chim", "pan", "zee</w>"]
    assert clip_tokenizer.convert_ids_to_tokens(_ids(clip_tokenizer, "chimp")) == ["chimp</w>"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_reference_prompts_hold_the_injected_token_except_chimpanzee(clip_tokenizer: Any, dataset: str) -> None:
    words = reference_words(dataset)
    missing = [
        name
        for name, word, prompt in zip(words.class_names, words.injection_words, words.prompts)
        if _ids(clip_tokenizer, word)[0] not in _ids(clip_tokenizer, prompt)
    ]
    assert missing == (["chimpanzee"] if dataset == "cifar100" else [])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared reference data absent")
def test_published_anchor_rows_follow_the_injection_words(clip_tokenizer: Any) -> None:
    published = {d: np.load(SHARED_DATA / PUBLISHED[d]) for d in DATASETS}
    firsts = {d: _first_tokens(clip_tokenizer, reference_words(d).injection_words) for d in DATASETS}
    equal_rows = {
        (i, j)
        for i in range(100)
        for j in range(100)
        if np.array_equal(published["cifar100"][i], published["imagenet100"][j])
    }
    equal_tokens = {(i, j) for i in range(100) for j in range(100) if firsts["cifar100"][i] == firsts["imagenet100"][j]}
    assert equal_rows == equal_tokens
    assert len(equal_rows) == 11
    # dreamood's class names share other rows (e.g. lawn mower's "lawn"), so they cannot be the published tokens.
    by_name = {d: _first_tokens(clip_tokenizer, NAMES[d]) for d in DATASETS}
    assert by_name["cifar100"] != firsts["cifar100"]


@functools.lru_cache(maxsize=1)
def _table_with_published_rows(clip_tokenizer: Any, dim: int = 768) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 49,408-row table holding the published anchors at their injection words' first-token rows."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(len(clip_tokenizer), dim, generator=generator)
    table = table / table.norm(dim=1, keepdim=True) * torch.empty(len(clip_tokenizer), 1).uniform_(0.34, 0.42)
    expected: dict[str, torch.Tensor] = {}
    for dataset in DATASETS:
        path = SHARED_DATA / PUBLISHED[dataset]
        rows = torch.from_numpy(np.load(path)) if path.is_file() else table[:100].clone() + 1.0
        table[_first_tokens(clip_tokenizer, reference_words(dataset).injection_words)] = rows
        expected[dataset] = rows
    return table, expected


@pytest.mark.parametrize("dataset", DATASETS)
def test_reference_policy_gives_the_injection_words_first_rows(clip_tokenizer: Any, dataset: str) -> None:
    table, expected = _table_with_published_rows(clip_tokenizer)
    encoder = _TextEncoder(table)
    words = reference_words(dataset)
    anchors = TokenEmbeddings.from_text_encoder(
        clip_tokenizer, encoder, NAMES[dataset], "first", words=words.injection_words
    )
    assert anchors.words == list(words.injection_words) and anchors.policy == "first"
    assert torch.equal(anchors.vectors, expected[dataset])
    assert [ids[0] for ids in anchors.token_ids] == _first_tokens(clip_tokenizer, words.injection_words)
    # From dreamood's class names the anchors differ for 25 classes: 19 on CIFAR-100, 6 on ImageNet-100.
    by_name = TokenEmbeddings.from_text_encoder(clip_tokenizer, encoder, NAMES[dataset], "first")
    differ = (by_name.vectors != anchors.vectors).any(dim=1).sum().item()
    assert differ == {"cifar100": 19, "imagenet100": 6}[dataset]


@pytest.mark.parametrize("dataset", DATASETS)
def test_mean_policy_shrinks_the_norm_and_mean_norm_keeps_it(clip_tokenizer: Any, dataset: str) -> None:
    table, _ = _table_with_published_rows(clip_tokenizer)
    encoder = _TextEncoder(table)
    mean = TokenEmbeddings.from_text_encoder(clip_tokenizer, encoder, NAMES[dataset], "mean")
    kept = TokenEmbeddings.from_text_encoder(clip_tokenizer, encoder, NAMES[dataset], "mean-norm")
    split = [index for index, ids in enumerate(mean.token_ids) if len(ids) > 1]
    assert len(split) == {"cifar100": 15, "imagenet100": 6}[dataset]
    single = [index for index in range(100) if index not in split]
    assert torch.equal(mean.vectors[single], kept.vectors[single])
    table64 = table.double()
    for index in split:
        rows = table64[mean.token_ids[index]]
        # The plain mean is shorter than every one of its rows; the rescaled one has their mean norm.
        assert mean.norms[index] < rows.norm(dim=1).min()
        assert torch.isclose(kept.norms[index].double(), rows.norm(dim=1).mean(), atol=1e-6)
        cosine = torch.nn.functional.cosine_similarity(mean.vectors[index], kept.vectors[index], dim=0)
        assert cosine > 1 - 1e-6
    assert mean.norms[split].max() < 0.33  # below every single row of the table
    assert kept.norms.min() >= 0.33 and kept.norms.max() <= 0.43
