"""Shared test configuration: no network, deterministic threads, paths to the shared reference data."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The test models are tiny: one intra-op thread avoids thread-pool overhead that dominates their run time.
torch.set_num_threads(1)

_real_connect = socket.socket.connect


def _refuse_connection(self: socket.socket, address: Any) -> None:
    # Local sockets (torch.distributed on 127.0.0.1, Unix sockets) are fine; anything else is a bug.
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    if isinstance(address, (str, bytes)):
        return _real_connect(self, address)
    raise RuntimeError(f"a test tried to open a network connection to {address!r}")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs with outbound connections refused: dreamood must work offline."""
    monkeypatch.setattr(socket.socket, "connect", _refuse_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test starts on one intra-op thread, and a test that changes the count does not leak it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The folder of reference token embeddings; tests using it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared reference data not available")
    return SHARED_DATA


def _write_clip_vocabulary(bpe_path: Path, target: Path) -> None:
    """OpenAI CLIP's 49,408-token vocabulary, built from its BPE merges as CLIP's own tokenizer builds it."""
    import gzip
    import json

    from dreamood.testing import _bytes_to_unicode

    with gzip.open(bpe_path) as handle:
        merges = handle.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    characters = list(_bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The real CLIP ViT-L/14 tokenizer (Stable Diffusion v1.x), built once per session from OpenAI's BPE file.

    The BPE file ships in the ``clip-anytorch`` package (a dev dependency); the test is skipped without it.
    """
    import importlib.util

    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    bpe = next((Path(p) / "bpe_simple_vocab_16e6.txt.gz" for p in locations), None)
    if bpe is None or not bpe.is_file():
        pytest.skip("clip-anytorch (OpenAI's CLIP BPE vocabulary) is not installed")
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    _write_clip_vocabulary(bpe, folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, local_files_only=True)
    assert len(tokenizer) == 49408
    return tokenizer
