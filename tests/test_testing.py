"""The offline tiny models behave like the real ones they stand in for."""

from __future__ import annotations

from pathlib import Path

from dreamood.testing import TINY_WORDS, tiny_clip_text_encoder, tiny_clip_tokenizer


def test_every_tiny_word_is_one_token(tmp_path: Path) -> None:
    tokenizer = tiny_clip_tokenizer(tmp_path)
    split = {word: tokenizer(word, add_special_tokens=False).input_ids for word in TINY_WORDS}
    assert all(len(ids) == 1 for ids in split.values()), {w: ids for w, ids in split.items() if len(ids) != 1}
    assert len(set(ids[0] for ids in split.values())) == len(TINY_WORDS)


def test_unknown_words_fall_back_to_pieces(tmp_path: Path) -> None:
    tokenizer = tiny_clip_tokenizer(tmp_path)
    ids = tokenizer("chimpanzee", add_special_tokens=False).input_ids
    assert len(ids) > 1
    assert tokenizer.decode(ids).strip() == "chimpanzee"


def test_text_encoder_accepts_the_tokenizer_ids(tmp_path: Path) -> None:
    tokenizer = tiny_clip_tokenizer(tmp_path)
    encoder = tiny_clip_text_encoder(len(tokenizer))
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert encoder(ids).last_hidden_state.shape == (1, 77, 32)
