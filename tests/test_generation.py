"""generate_images: layout, seeds, resuming after corruption and SIGKILL, sharding; GeneratedImageFolder."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor

from dreamood.data.generated import GeneratedImageFolder
from dreamood.decoding.generation import (
    MANIFEST_NAME,
    decoder_config_hash,
    generate_images,
    image_seed,
)
from dreamood.decoding.in_domain import InDomainDiffusionDecoder
from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.sampling.samples import EmbeddingSamples

CLASSES = ["zero", "one", "two"]
TINY = {
    "image_size": 8,
    "embedding_dim": 8,
    "block_out_channels": (8, 16),
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "num_inference_steps": 2,
    "guidance_scale": 2.0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def decoder() -> InDomainDiffusionDecoder:
    return InDomainDiffusionDecoder(CLASSES, **TINY)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def samples() -> EmbeddingSamples:
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2, 2])
    return EmbeddingSamples(torch.randn(len(labels), 8, generator=generator), labels, class_names=CLASSES)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _run(decoder: Any, samples: EmbeddingSamples, out: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("seed", 5)
    return generate_images(decoder, samples, out, **kwargs)


# ---------------------------------------------------------------- seeds and hashes


def test_image_seed_is_the_documented_sha256() -> None:
    digest = hashlib.sha256(b"7:123").digest()
    assert image_seed(7, 123) == int.from_bytes(digest[:8], "big") % 2**63


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**40), st.integers(0, 10**7), st.integers(1, 10**7))
def test_image_seed_is_stable_in_range_and_distinct(seed: int, index: int, offset: int) -> None:
    value = image_seed(seed, index)
    assert 0 <= value < 2**63
    assert value == image_seed(seed, index)
    assert value != image_seed(seed, index + offset)
    assert value != image_seed(seed + offset, index)


def test_config_hash_follows_the_decoder_config(decoder: InDomainDiffusionDecoder) -> None:
    same = InDomainDiffusionDecoder(CLASSES, **TINY)  # type: ignore[arg-type]
    other = InDomainDiffusionDecoder(CLASSES, **{**TINY, "guidance_scale": 3.0})  # type: ignore[arg-type]
    assert decoder_config_hash(decoder) == decoder_config_hash(same)
    assert decoder_config_hash(decoder) != decoder_config_hash(other)
    assert len(decoder_config_hash(decoder)) == 64


# ---------------------------------------------------------------- layout, content and determinism


def test_layout_manifest_and_pixels(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    result = _run(decoder, samples, tmp_path, images_per_class=3, batch_size=4)
    labels = samples.labels.tolist()
    # Independent plan: first three rows of each class, classes ascending, indices counted class-major.
    expected_rows = [row for c in (0, 1, 2) for row in [i for i, y in enumerate(labels) if y == c][:3]]
    paths = [f"{labels[row]:03d}/{index:06d}.png" for index, row in enumerate(expected_rows)]
    assert sorted(_tree(tmp_path)) == sorted([*paths, MANIFEST_NAME, "classes.json"])
    assert json.loads((tmp_path / "classes.json").read_text()) == CLASSES
    assert result.num_images == result.generated == 9 and result.skipped == 0
    assert result.manifest == tmp_path / MANIFEST_NAME

    lines = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["image_index"] for r in rows] == list(range(9))
    assert [r["embedding_row"] for r in rows] == expected_rows
    assert [r["class_index"] for r in rows] == [labels[row] for row in expected_rows]
    assert [r["class_name"] for r in rows] == [CLASSES[labels[row]] for row in expected_rows]
    assert [r["seed"] for r in rows] == [image_seed(5, i) for i in range(9)]
    assert {r["decoder_config_hash"] for r in rows} == {decoder_config_hash(decoder)}
    assert [r["path"] for r in rows] == paths

    # Each file holds the decoding of its own row with its own seed (a batch of one: no batching effects).
    for record in rows:
        row = record["embedding_row"]
        image = decoder.decode(samples.vectors[row : row + 1], samples.labels[row : row + 1], [record["seed"]])[0]
        reference = (image * 255).round().permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(_pixels(tmp_path / record["path"]) - reference).max() <= 1


def test_all_rows_by_default_and_identical_bytes_on_rerun(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    first = _run(decoder, samples, tmp_path / "a", batch_size=3)
    _run(decoder, samples, tmp_path / "b", batch_size=3)
    assert first.num_images == len(samples)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    again = _run(decoder, samples, tmp_path / "a", batch_size=3)
    assert again.generated == 0 and again.skipped == len(samples)


def test_resume_redoes_missing_truncated_and_corrupt_images(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, work = tmp_path / "reference", tmp_path / "work"
    _run(decoder, samples, reference, batch_size=2)
    _run(decoder, samples, work, batch_size=2)
    (work / "000" / "000001.png").unlink()
    truncated = work / "001" / "000005.png"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    (work / "002" / "000010.png").write_bytes(b"not a png")
    (work / "002" / ".000011.png.abc123.tmp").write_bytes(b"half-written")
    (work / MANIFEST_NAME).unlink()
    untouched = work / "000" / "000003.png"
    stamp = untouched.stat().st_mtime_ns

    calls: list[int] = []
    original = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda v, y, s: calls.append(len(s)) or original(v, y, s))
    result = _run(decoder, samples, work, batch_size=2)
    assert result.generated == 3
    assert result.skipped == len(samples) - 3
    assert calls == [2, 2, 2]  # only the three batches holding a broken image are decoded
    assert untouched.stat().st_mtime_ns == stamp
    assert _tree(work) == _tree(reference)


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_files_do_not_depend_on_the_writer_threads(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path, threads: int
) -> None:
    reference = _run(decoder, samples, tmp_path / "reference", batch_size=3, writer_threads=2)
    result = _run(decoder, samples, tmp_path / "work", batch_size=3, writer_threads=threads)
    assert result.generated == reference.generated == len(samples)
    assert _tree(tmp_path / "work") == _tree(tmp_path / "reference")


def test_writer_threads_write_one_batch_while_the_next_is_decoded(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dreamood.decoding.generation as generation

    # The first batch's files may only be written once the second batch is being decoded: without overlap
    # these waits would time out.
    second_decode = threading.Event()
    calls: list[int] = []
    original_decode, original_write = decoder.decode, generation._write_png

    def decode(vectors: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
        calls.append(len(seeds))
        if len(calls) == 2:
            second_decode.set()
        return original_decode(vectors, labels, seeds)

    overlapped: list[bool] = []

    def write(path: Path, pixels: np.ndarray, record: dict[str, Any]) -> None:
        if record["image_index"] < 4:
            overlapped.append(second_decode.wait(timeout=60))
        original_write(path, pixels, record)

    monkeypatch.setattr(decoder, "decode", decode)
    monkeypatch.setattr(generation, "_write_png", write)
    _run(decoder, samples, tmp_path / "work", batch_size=4, writer_threads=2)
    assert overlapped == [True] * 4
    monkeypatch.undo()
    _run(decoder, samples, tmp_path / "reference", batch_size=4, writer_threads=0)
    assert _tree(tmp_path / "work") == _tree(tmp_path / "reference")


@pytest.mark.parametrize("threads", [0, 2])
def test_a_failed_write_surfaces_and_a_rerun_completes_the_folder(
    decoder: InDomainDiffusionDecoder,
    samples: EmbeddingSamples,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    import dreamood.decoding.generation as generation

    original_write = generation._write_png

    def write(path: Path, pixels: np.ndarray, record: dict[str, Any]) -> None:
        if record["image_index"] == 5:
            raise OSError(28, "No space left on device", str(path))
        original_write(path, pixels, record)

    monkeypatch.setattr(generation, "_write_png", write)
    with pytest.raises(OSError, match="No space left"):
        _run(decoder, samples, tmp_path / "work", batch_size=3, writer_threads=threads)
    written = {p.relative_to(tmp_path / "work").as_posix() for p in (tmp_path / "work").rglob("*.png")}
    assert "001/000005.png" not in written and len(written) >= 5
    assert not list((tmp_path / "work").rglob("*.tmp"))
    monkeypatch.undo()
    resumed = _run(decoder, samples, tmp_path / "work", batch_size=3, writer_threads=threads)
    assert resumed.generated + resumed.skipped == len(samples) and resumed.skipped >= 5
    _run(decoder, samples, tmp_path / "reference", batch_size=3)
    assert _tree(tmp_path / "work") == _tree(tmp_path / "reference")


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_identical_files(decoder: InDomainDiffusionDecoder, tmp_path: Path) -> None:
    model_dir, reference, work = tmp_path / "model", tmp_path / "reference", tmp_path / "work"
    decoder.save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    many = EmbeddingSamples(torch.randn(24, 8, generator=generator), torch.arange(24) % 3)
    many.save(tmp_path / "samples")
    script = textwrap.dedent(
        f"""
        import time, torch
        torch.set_num_threads(1)
        from dreamood.decoding.generation import generate_images
        from dreamood.decoding.in_domain import InDomainDiffusionDecoder
        from dreamood.sampling.samples import EmbeddingSamples
        decoder = InDomainDiffusionDecoder.from_pretrained({str(model_dir)!r}, device="cpu")
        decode = decoder.decode
        def slow_decode(vectors, labels, seeds):
            images = decode(vectors, labels, seeds)
            time.sleep(0.4)
            return images
        decoder.decode = slow_decode
        samples = EmbeddingSamples.load({str(tmp_path / "samples")!r})
        generate_images(decoder, samples, {str(work)!r}, batch_size=2, seed=5, show_progress=False)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 300
        while len(list(work.rglob("*.png"))) < 4:
            assert process.poll() is None, "the generation process ended before it could be killed"
            assert time.monotonic() < deadline, "the generation process never started writing"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    written = len(list(work.rglob("*.png")))
    assert 4 <= written < 24
    assert not (work / MANIFEST_NAME).exists()

    loaded = InDomainDiffusionDecoder.from_pretrained(model_dir, device="cpu")
    resumed = _run(loaded, many, work, batch_size=2)
    assert resumed.skipped >= 4 and resumed.generated == 24 - resumed.skipped
    _run(decoder, many, reference, batch_size=2)
    assert _tree(work) == _tree(reference)


# ---------------------------------------------------------------- sharding


def test_two_env_ranks_equal_a_single_process(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _run(decoder, samples, single, batch_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = _run(decoder, samples, sharded, batch_size=1)
    written = sorted(p.relative_to(sharded).as_posix() for p in sharded.rglob("*.png"))
    assert written == sorted(f"{y:03d}/{i:06d}.png" for i, y in _planned(samples) if i % 2 == 0)
    assert first.manifest is None and not (sharded / MANIFEST_NAME).exists()
    monkeypatch.setenv("RANK", "1")
    second = _run(decoder, samples, sharded, batch_size=1)
    assert first.generated + second.generated == len(samples)
    assert second.manifest == sharded / MANIFEST_NAME
    assert _tree(sharded) == _tree(single)


def _planned(samples: EmbeddingSamples) -> list[tuple[int, int]]:
    """(image index, class) of every image when all rows are rendered, computed independently."""
    labels = samples.labels.tolist()
    classes = [y for c in sorted(set(labels)) for y in labels if y == c]
    return list(enumerate(classes))


def test_sharded_batches_agree_with_single_process_up_to_rounding(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _run(decoder, samples, single, batch_size=4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in (2, 0, 1):
        monkeypatch.setenv("RANK", str(rank))
        _run(decoder, samples, sharded, batch_size=4)
    assert sorted(_tree(sharded)) == sorted(_tree(single))
    assert (sharded / MANIFEST_NAME).read_bytes() == (single / MANIFEST_NAME).read_bytes()
    for path in single.rglob("*.png"):
        assert np.abs(_pixels(path) - _pixels(sharded / path.relative_to(single))).max() <= 1


def test_process_group_rank_zero_writes_the_manifest(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        result = _run(decoder, samples, tmp_path / "out", images_per_class=2, batch_size=4)
    finally:
        dist.destroy_process_group()
    assert result.manifest == tmp_path / "out" / MANIFEST_NAME
    assert len((tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()) == 6


def test_inconsistent_rank_environment_is_rejected(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        _run(decoder, samples, tmp_path)


# ---------------------------------------------------------------- changed configurations


def test_other_decoder_config_needs_overwrite(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    other = InDomainDiffusionDecoder(CLASSES, **{**TINY, "guidance_scale": 4.0})  # type: ignore[arg-type]
    _run(decoder, samples, tmp_path / "out", batch_size=4)
    with pytest.raises(ValueError, match="overwrite=True"):
        _run(other, samples, tmp_path / "out", batch_size=4)
    _run(other, samples, tmp_path / "out", batch_size=4, overwrite=True)
    _run(other, samples, tmp_path / "fresh", batch_size=4)
    assert _tree(tmp_path / "out") == _tree(tmp_path / "fresh")


def test_changed_image_record_needs_overwrite_even_without_manifest(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    _run(decoder, samples, tmp_path, batch_size=4)
    (tmp_path / MANIFEST_NAME).unlink()  # as after a crash: only the images say how they were made
    with pytest.raises(ValueError, match=r"seed: .*overwrite=True"):
        _run(decoder, samples, tmp_path, batch_size=4, seed=6)
    shifted = EmbeddingSamples(samples.vectors + 1.0, samples.labels)
    with pytest.raises(ValueError, match="vector_sha256"):
        _run(decoder, shifted, tmp_path, batch_size=4)


def test_images_outside_the_plan_need_overwrite(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    # Batches of one: kept images then match a fresh run bit for bit whatever the batches around them.
    _run(decoder, samples, tmp_path / "out", batch_size=1)
    (tmp_path / "out" / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="does not plan"):
        _run(decoder, samples, tmp_path / "out", images_per_class=2, batch_size=1)
    _run(decoder, samples, tmp_path / "out", images_per_class=2, batch_size=1, overwrite=True)
    _run(decoder, samples, tmp_path / "fresh", images_per_class=2, batch_size=1)
    (tmp_path / "fresh" / "notes.txt").write_text("kept")
    assert _tree(tmp_path / "out") == _tree(tmp_path / "fresh")


# ---------------------------------------------------------------- bad input


class _FakeDecoder:
    """A decoder returning whatever ``make`` builds, to test the checks on decoded images."""

    def __init__(self, make: Any) -> None:
        self.make = make

    @property
    def embedding_dim(self) -> int:
        return 8

    @property
    def class_names(self) -> list[str]:
        return CLASSES

    def decode(self, vectors: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
        result: Tensor = self.make(len(seeds))
        return result


def test_bad_arguments_name_the_problem(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="class 0 has only 4"):
        _run(decoder, samples, tmp_path, images_per_class=5)
    with pytest.raises(ValueError, match="batch_size"):
        _run(decoder, samples, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="writer_threads"):
        _run(decoder, samples, tmp_path, writer_threads=-1)
    with pytest.raises(ValueError, match="image_format"):
        _run(decoder, samples, tmp_path, image_format="jpeg")
    with pytest.raises(ValueError, match="dimension 4"):
        _run(decoder, EmbeddingSamples(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)), tmp_path)
    with pytest.raises(ValueError, match=r"samples.labels must lie in \[0, 2\]"):
        _run(decoder, EmbeddingSamples(torch.randn(3, 8), torch.tensor([0, 1, 3])), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        _run(decoder, EmbeddingSamples(torch.randn(0, 8), torch.zeros(0, dtype=torch.long)), tmp_path)
    with pytest.raises(TypeError, match="EmbeddingSamples"):
        _run(decoder, samples.vectors, tmp_path)  # type: ignore[arg-type]


def test_bad_decoder_output_is_reported(samples: EmbeddingSamples, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(4, 3, H, W\)"):
        _run(_FakeDecoder(lambda n: torch.rand(n, 1, 8, 8)), samples, tmp_path, batch_size=4)
    with pytest.raises(NonFiniteError, match="decoded images"):
        _run(_FakeDecoder(lambda n: torch.full((n, 3, 8, 8), float("nan"))), samples, tmp_path, batch_size=4)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        _run(_FakeDecoder(lambda n: torch.full((n, 3, 8, 8), 2.0)), samples, tmp_path, batch_size=4)
    assert not list(tmp_path.rglob("*.png"))


# ---------------------------------------------------------------- GeneratedImageFolder


@pytest.fixture
def folder(decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, tmp_path: Path) -> Path:
    _run(decoder, samples, tmp_path, images_per_class=2, batch_size=6)
    return tmp_path


def test_folder_reads_images_and_manifest_labels(folder: Path) -> None:
    dataset = GeneratedImageFolder(folder)
    rows = [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]
    assert len(dataset) == len(rows) == 6
    assert dataset.targets == [r["class_index"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert dataset.classes == CLASSES
    for index, record in enumerate(rows):
        image, label = dataset[index]
        assert label == record["class_index"]
        assert image.dtype == torch.float32 and image.shape == (3, 8, 8)
        expected = torch.from_numpy(_pixels(folder / record["path"]).astype(np.float32) / 255).permute(2, 0, 1)
        assert torch.equal(image, expected)


def test_folder_resizes_converts_and_transforms(folder: Path) -> None:
    gray, _ = GeneratedImageFolder(folder, image_size=(4, 6), mode="L")[0]
    assert gray.shape == (1, 4, 6) and float(gray.min()) >= 0.0 and float(gray.max()) <= 1.0
    with Image.open(folder / "000" / "000000.png") as opened:
        expected = np.asarray(opened.convert("L").resize((6, 4), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert torch.allclose(gray[0], torch.from_numpy(expected))
    seen: list[Any] = []
    dataset = GeneratedImageFolder(folder, image_size=16, transform=lambda im: seen.append(im.size) or "done")
    assert dataset[1] == ("done", 0)
    assert seen == [(16, 16)]


def test_folder_errors_name_the_file(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        GeneratedImageFolder(empty)
    dataset = GeneratedImageFolder(folder)
    broken = folder / "001" / "000002.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(ArtifactError, match="000002.png"):
        dataset[2]
    (folder / "002" / "000004.png").unlink()
    with pytest.raises(FileNotFoundError, match="000004.png"):
        dataset[4]
    with pytest.raises(ValueError, match="mode"):
        GeneratedImageFolder(folder, mode="CMYK")
    (folder / MANIFEST_NAME).write_text('{"path": 3}\n')
    with pytest.raises(ArtifactError, match="line 1"):
        GeneratedImageFolder(folder)
