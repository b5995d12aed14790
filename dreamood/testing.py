"""Tiny, randomly initialised models for tests, smoke runs and examples that must run offline.

Nothing here downloads anything: the CLIP tokenizer is written from a small ``vocab.json``/``merges.txt``
built on the fly, and every network is randomly initialised from a seed. The models have the same
architecture families as Stable Diffusion v1.x (CLIP text encoder, conditional UNet, KL autoencoder),
so code paths are exercised exactly as with real weights, only smaller.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_WORDS",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "write_tiny_clip_tokenizer",
]

#: Words that the tiny tokenizer knows as single tokens: the default prompt's words and a few class names.
TINY_WORDS: tuple[str, ...] = (
    "a", "high", "-", "quality", "photo", "of", "an", "image", "the",
    "cat", "dog", "car", "ship", "apple", "bird", "horse", "truck", "frog", "deer", "plane",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "digit",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of CLIP's (and GPT-2's) byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_tiny_clip_tokenizer(directory: str | os.PathLike[str], words: Sequence[str] = TINY_WORDS) -> Path:
    """Write a ``vocab.json`` and ``merges.txt`` for a CLIP BPE tokenizer that knows ``words`` whole.

    Every byte is in the vocabulary (alone and as an end-of-word piece), so any text can be tokenised;
    ``words`` get merges that turn each into a single token. Returns ``directory``.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    characters = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(piece, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return target


def tiny_clip_tokenizer(
    directory: str | os.PathLike[str], words: Sequence[str] = TINY_WORDS, model_max_length: int = 77
) -> Any:
    """Write a tiny vocabulary to ``directory`` and load it as a ``transformers.CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer(directory, words)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length, local_files_only=True)


def tiny_clip_text_encoder(
    vocab_size: int, *, hidden_size: int = 32, max_position_embeddings: int = 77, seed: int = 0
) -> Any:
    """A randomly initialised two-layer ``transformers.CLIPTextModel`` (eval mode, float32)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        projection_dim=hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    model: Any = CLIPTextModel(config)
    # A wider spread than the default init so that swapping one token embedding visibly changes the output.
    table: torch.nn.Embedding = model.get_input_embeddings()
    with torch.no_grad():
        table.weight.normal_(0.0, 0.4, generator=torch.Generator().manual_seed(seed))
    model.eval()
    return model
