"""Atomic artefact and checkpoint I/O: round trips, corruption, and refusing pickled code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from dreamood.errors import ArtifactError
from dreamood.io import atomic_write, load_artifact, load_checkpoint, save_artifact, save_checkpoint, sidecar_path


def test_artifact_round_trip(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    path = save_artifact(tmp_path / "thing", tensors, {"note": "hi", "n": 3}, kind="Thing")
    assert path.name == "thing.safetensors"
    assert sidecar_path(path).is_file()
    loaded, metadata = load_artifact(path, kind="Thing")
    assert metadata == {"note": "hi", "n": 3}
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])


def test_artifact_wrong_kind_and_corruption(tmp_path: Path) -> None:
    path = save_artifact(tmp_path / "x.safetensors", {"a": torch.ones(2)}, {}, kind="Thing")
    with pytest.raises(ArtifactError, match="expected 'Other'"):
        load_artifact(path, kind="Other")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_artifact(path, kind="Thing")
    sidecar_path(path).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path, kind="Thing")
    sidecar_path(path).write_text(json.dumps({"kind": "Thing"}))
    with pytest.raises(ArtifactError, match="metadata"):
        load_artifact(path, kind="Thing")


def test_artifact_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_artifact(tmp_path / "nothing", kind="Thing")
    path = save_artifact(tmp_path / "x", {"a": torch.ones(2)}, {}, kind="Thing")
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match=r"x\.json"):
        load_artifact(path, kind="Thing")


def test_atomic_write_leaves_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("new and partial")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["file.txt"], "temporary file left behind"


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(2, 2)}, "epoch": 3, "history": [0.5, 0.25], "name": "x"}
    path = save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["history"] == [0.5, 0.25] and loaded["name"] == "x"
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_refuses_malicious_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path, pickle_module=pickle)
    with pytest.raises(ArtifactError, match="weights_only=True"):
        load_checkpoint(path)


def test_checkpoint_truncated_and_missing(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="cannot be loaded safely"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_gives_the_usual_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "report.md", "w") as handle:
            handle.write("readable by everyone")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
