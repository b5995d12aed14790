"""Resumable, sharded rendering of sampled embeddings into an image folder (DREAM-OOD step 4 at scale).

Layout of ``out_dir``::

    out_dir/<class_folder>/<image_index:06d>.png
    out_dir/classes.json
    out_dir/manifest.jsonl

**Class folders.** Each class's images go to a folder named by its class index, zero-padded to the same width
(at least 3 digits: ``000/``, ``001/``, ..., ``011/``; see :func:`class_folder_name`), so that tools which sort
folder names as strings (torchvision's ``ImageFolder``) give every image its class index as label whenever
every class has images. ``classes.json`` lists the decoder's class names by class index; the manifest lists
every image with its class index and name. Folders written before this layout (``0/``, ``1/``, ``10/``) stay
readable by :class:`~dreamood.data.generated.GeneratedImageFolder`, which takes labels from the manifest, and a
generation resumed in such a folder keeps its layout.

**Which images.** For every class present in the samples (ascending class index) the first
``images_per_class`` rows of that class, in their order in the samples, are rendered (all rows when
``images_per_class`` is ``None``). Image indices count ``0, 1, 2, ...`` over this class-major list.

**Seeds.** Image ``i`` is decoded with :func:`image_seed` ``(seed, i)``: the first 8 bytes of
``sha256(f"{seed}:{i}")``, big-endian, masked to 63 bits. It does not depend on the process, the rank or the
batch, so parallel workers never repeat each other's noise.

**Resuming.** Every image is written atomically (temporary file, then rename) and carries its own record
(index, class, embedding row, seed, decoder configuration hash, vector hash) in a PNG text chunk. A re-run
re-opens each existing image: complete ones whose record matches are skipped, unreadable or truncated ones
are redone, and ones made with another configuration raise an error unless ``overwrite=True``. Batches
are fixed slices of each rank's list of images and a batch holding any missing image is decoded whole, so
a run resumed after a crash or ``kill -9`` ends with the same files, byte for byte, as an uninterrupted
run with the same ``batch_size`` and number of ranks. PNG encoding is deterministic (same pixels, same
bytes). Across different batch compositions, images agree up to float rounding of the decoder's kernels.

**Overlap.** The decoder's images are checked and quantised to 8 bits on its device and copied to the CPU in
one transfer per batch; a pool of ``writer_threads`` threads then encodes and writes them while the decoder
renders the next batch (PNG compression releases the GIL). At most two batches of pixels are held at once, and
an error in a writer surfaces in the calling thread at the next batch. The files do not depend on the number of
writer threads.

**Sharding.** Under ``torchrun`` (an initialised ``torch.distributed`` process group, or the ``RANK`` and
``WORLD_SIZE`` environment variables) rank ``r`` renders the images with ``index % world_size == r``. With a
process group, rank 0 writes the manifest after a barrier; without one, whichever rank finds the set
complete when it finishes writes it (its content is deterministic, so concurrent writes agree).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dreamood._utils import progress
from dreamood._validation import check_choice, check_finite, check_positive_int
from dreamood.io import atomic_write
from dreamood.protocols import EmbeddingDecoder
from dreamood.sampling.samples import EmbeddingSamples

__all__ = [
    "CLASSES_NAME",
    "MANIFEST_NAME",
    "RECORD_KEY",
    "GenerationResult",
    "class_folder_name",
    "decoder_config_hash",
    "generate_images",
    "image_seed",
]

MANIFEST_NAME = "manifest.jsonl"
#: File of a generated folder that lists the class names by class index (a JSON list of strings).
CLASSES_NAME = "classes.json"
#: Key of the PNG text chunk that holds each image's record.
RECORD_KEY = "dreamood"
_IMAGE_FORMATS = ("png",)
logger = logging.getLogger(__name__)
_IMAGE_NAME = re.compile(r"^\d+\.png$")
_TEMP_NAME = re.compile(r"^\.\d+\.png\..*\.tmp$")


@dataclass(frozen=True)
class GenerationResult:
    """What one call of :func:`generate_images` did.

    Attributes:
        out_dir: The output folder.
        num_images: Images in the whole generation (all ranks).
        generated: Images this process rendered and wrote.
        skipped: Images of this process that were already complete.
        manifest: Path of the manifest when the generation is complete, else ``None`` (without a process
            group, other ranks may still have images to render).
    """

    out_dir: Path
    num_images: int
    generated: int
    skipped: int
    manifest: Path | None


def class_folder_name(class_index: int, num_classes: int) -> str:
    """The folder of class ``class_index`` in a generated folder of ``num_classes`` classes.

    The class index zero-padded to ``max(3, len(str(num_classes - 1)))`` digits (``7`` of 12 classes is
    ``"007"``), so that sorting the folder names as strings gives the class-index order.

    Raises:
        ValueError: ``class_index`` is not in ``[0, num_classes)``.
    """
    check_positive_int(num_classes, "num_classes")
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index must lie in [0, {num_classes}), got {class_index}")
    width = max(3, len(str(num_classes - 1)))
    return f"{class_index:0{width}d}"


def _legacy_layout(out_dir: Path, num_classes: int) -> bool:
    """Whether ``out_dir`` holds class folders of the earlier, unpadded layout (``0/``, ``1/``, ``10/``)."""
    if not out_dir.is_dir():
        return False
    return any(
        folder.is_dir()
        and folder.name.isdigit()
        and int(folder.name) < num_classes
        and folder.name != class_folder_name(int(folder.name), num_classes)
        and any(folder.glob("*.png"))
        for folder in out_dir.iterdir()
    )


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` in a generation seeded with ``seed``.

    Stable across processes, platforms and Python versions (unlike ``hash()``): the first 8 bytes of
    ``sha256(f"{seed}:{index}")`` read big-endian, masked to 63 bits so it suits ``torch.Generator``.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def decoder_config_hash(decoder: EmbeddingDecoder) -> str:
    """SHA-256 (hex) of what identifies a decoder's output: its configuration, class names and dimension.

    The configuration is the decoder's ``config`` mapping when it has one (for example
    :class:`~dreamood.decoding.in_domain.InDomainDiffusionDecoder`, whose config covers every setting
    that changes the images), else its ``repr`` when its class defines one (the settings it shows), else its
    type name.

    Args:
        decoder: Any :class:`~dreamood.protocols.EmbeddingDecoder`.

    Returns:
        The 64-character hexadecimal digest.
    """
    config = getattr(decoder, "config", None)
    if config is None:
        config = repr(decoder) if type(decoder).__repr__ is not object.__repr__ else type(decoder).__qualname__
    payload = {
        "config": config,
        "class_names": list(decoder.class_names),
        "embedding_dim": int(decoder.embedding_dim),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _vector_hash(vector: Tensor) -> str:
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _plan(
    samples: EmbeddingSamples,
    images_per_class: int | None,
    seed: int,
    config_hash: str,
    class_names: Sequence[str],
    legacy: bool = False,
) -> list[dict[str, Any]]:
    """One record per image to render, in image-index order (see the module docstring)."""
    labels = samples.labels.cpu()
    vectors = samples.vectors
    records: list[dict[str, Any]] = []
    for class_index in sorted({int(v) for v in labels.tolist()}):
        rows = torch.nonzero(labels == class_index).flatten().tolist()
        if images_per_class is not None:
            if len(rows) < images_per_class:
                raise ValueError(
                    f"images_per_class={images_per_class} but class {class_index} has only {len(rows)} sampled rows"
                )
            rows = rows[:images_per_class]
        folder = str(class_index) if legacy else class_folder_name(class_index, len(class_names))
        for row in rows:
            index = len(records)
            records.append(
                {
                    "image_index": index,
                    "class_index": class_index,
                    "class_name": class_names[class_index],
                    "embedding_row": int(row),
                    "seed": image_seed(seed, index),
                    "decoder_config_hash": config_hash,
                    "vector_sha256": _vector_hash(vectors[row]),
                    "path": f"{folder}/{index:06d}.png",
                }
            )
    return records


def _rank_and_world_size() -> tuple[int, int, bool]:
    """``(rank, world_size, has_process_group)`` from torch.distributed, else from RANK/WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise ValueError(f"RANK and WORLD_SIZE must be integers: {error}") from error
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"environment variables RANK={rank} and WORLD_SIZE={world_size} are inconsistent")
    return rank, world_size, False


def _read_record(path: Path) -> dict[str, Any] | None:
    """The record stored in a complete image, or ``None`` when the file is missing, truncated or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            text = image.info.get(RECORD_KEY)
        record = json.loads(text) if isinstance(text, str) else None
    except Exception:  # any failure to decode (PIL raises several types) means the file must be redone
        return None
    return record if isinstance(record, dict) else None


def _record_text(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _to_pixels(images: Tensor, count: int) -> np.ndarray:
    """Check a decoded batch ``(count, 3, H, W)`` in ``[0, 1]`` and return its 8-bit ``(count, H, W, 3)`` pixels.

    The checks and the quantisation run on the images' device, with one read-back for the checks and one
    transfer of the 8-bit pixels.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] != count or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"decoder.decode must return images of shape ({count}, 3, H, W), got {shape}")
    values = images.detach().float()
    low, high = (float(v) for v in torch.stack(torch.aminmax(values)).tolist())
    if not (np.isfinite(low) and np.isfinite(high)):
        check_finite(values, "decoded images")
    if low < 0.0 or high > 1.0:
        raise ValueError(f"decoder.decode must return images in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    pixels = (values * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _write_png(path: Path, pixels: np.ndarray, record: dict[str, Any]) -> None:
    """Write 8-bit RGB ``pixels`` ``(H, W, 3)`` as a PNG file with ``record`` in a text chunk, atomically."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(RECORD_KEY, _record_text(record))
    with atomic_write(path) as handle:
        # Fixed settings and no timestamps: identical pixels always give identical bytes.
        Image.fromarray(pixels).save(handle, format="PNG", pnginfo=info, compress_level=6, optimize=False)


class _ImageWriter:
    """Writes PNG files in a thread pool, at most two batches behind the caller (or inline without threads)."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dreamood-png") if threads else None
        self._pending: list[Future[None]] = []

    def write_batch(self, jobs: list[tuple[Path, np.ndarray, dict[str, Any]]]) -> None:
        """Wait for the previous batch's files, then write this batch's (in the background with threads)."""
        self._finish()
        if self._pool is None:
            for job in jobs:
                _write_png(*job)
        else:
            self._pending = [self._pool.submit(_write_png, *job) for job in jobs]

    def _finish(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a writer's error here, in the calling thread

    def __enter__(self) -> _ImageWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if error is None:
                self._finish()
        finally:
            if self._pool is not None:
                # Pending writes complete even when the caller failed: their pixels are already rendered.
                self._pool.shutdown(wait=True)


def _remove_temporaries(path: Path) -> None:
    """Delete temporary files a killed process left behind for ``path``."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def _foreign_files(out_dir: Path, planned: set[str]) -> tuple[list[Path], list[Path]]:
    """Image files under ``out_dir`` that this generation does not plan, and stray temporary files."""
    images: list[Path] = []
    temporaries: list[Path] = []
    if not out_dir.is_dir():
        return images, temporaries
    for folder in sorted(out_dir.iterdir()):
        if not (folder.is_dir() and folder.name.isdigit()):
            continue
        for entry in sorted(folder.iterdir()):
            relative = f"{folder.name}/{entry.name}"
            if _IMAGE_NAME.match(entry.name) and relative not in planned:
                images.append(entry)
            elif (
                _TEMP_NAME.match(entry.name) and f"{folder.name}/{entry.name[1:].split('.png.')[0]}.png" not in planned
            ):
                temporaries.append(entry)
    return images, temporaries


def _mismatch(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> ValueError:
    keys = sorted(k for k in expected if found.get(k) != expected[k])
    detail = ", ".join(f"{k}: {found.get(k)!r} != {expected[k]!r}" for k in keys)
    return ValueError(
        f"{path} was generated with another configuration ({detail}); pass overwrite=True to replace the images "
        "in this folder, or choose another out_dir"
    )


def _check_manifest(manifest: Path, config_hash: str, overwrite: bool) -> None:
    if not manifest.is_file():
        return
    hashes = set()
    for line in manifest.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            hashes.add(json.loads(line).get("decoder_config_hash"))
    if hashes - {config_hash}:
        if not overwrite:
            raise ValueError(
                f"{manifest} lists images of a decoder with another configuration (hash {sorted(hashes)} != "
                f"{config_hash!r}); pass overwrite=True to replace them, or choose another out_dir"
            )
        with contextlib.suppress(FileNotFoundError):
            manifest.unlink()


def _write_manifest(manifest: Path, records: list[dict[str, Any]], class_names: Sequence[str]) -> None:
    # classes.json first: a folder with a manifest is complete.
    with atomic_write(manifest.parent / CLASSES_NAME, "w") as handle:
        handle.write(json.dumps(list(class_names), indent=1) + "\n")
    with atomic_write(manifest, "w") as handle:
        handle.write("".join(_record_text(record) + "\n" for record in records))


def generate_images(
    decoder: EmbeddingDecoder,
    samples: EmbeddingSamples,
    out_dir: str | os.PathLike[str],
    images_per_class: int | None = None,
    *,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
    image_format: str = "png",
    overwrite: bool = False,
    writer_threads: int = 4,
) -> GenerationResult:
    """Render sampled embeddings into ``out_dir/<class>/<index>.png`` plus ``manifest.jsonl``, resumably.

    ``<class>`` is the zero-padded class index (:func:`class_folder_name`), and ``classes.json`` lists the class
    names, so torchvision's ``ImageFolder`` reads the folder with the same labels.

    See the module documentation for which rows are used, how seeds are derived, how a re-run resumes and
    how ranks share the work. Call it from every rank under ``torchrun``; call it again with the same
    arguments to finish an interrupted run.

    Args:
        decoder: Any :class:`~dreamood.protocols.EmbeddingDecoder` (its ``config``, when present, is hashed
            into every image's record).
        samples: The embeddings to render with their class labels.
        out_dir: Output folder (created when missing).
        images_per_class: Images per class: the first that many rows of each class (``None``: all rows).
        batch_size: Images per ``decoder.decode`` call.
        seed: Seed from which every image's own seed is derived (:func:`image_seed`).
        show_progress: Show a progress bar (on rank 0 only).
        image_format: Only ``"png"`` (lossless, deterministic, carries the record).
        overwrite: Replace images and a manifest left in ``out_dir`` by a generation with another
            configuration (and remove images it does not plan) instead of raising.
        writer_threads: Threads that encode and write the PNG files while the decoder renders the next batch;
            ``0`` writes them in the calling thread. The files are the same either way.

    Returns:
        A :class:`GenerationResult`.

    Raises:
        ValueError: Invalid arguments, samples that do not fit the decoder, or ``out_dir`` holding images of
            another configuration while ``overwrite`` is false.
        NonFiniteError: The decoder returned NaN or infinite pixels.
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(seed, "seed", allow_zero=True)
    check_positive_int(writer_threads, "writer_threads", allow_zero=True)
    if images_per_class is not None:
        check_positive_int(images_per_class, "images_per_class")
    check_choice(image_format, _IMAGE_FORMATS, "image_format")
    if not isinstance(samples, EmbeddingSamples):
        raise TypeError(f"samples must be an EmbeddingSamples, got {type(samples).__name__}")
    if samples.dim != decoder.embedding_dim:
        raise ValueError(f"samples have dimension {samples.dim}, the decoder expects {decoder.embedding_dim}")
    class_names = list(decoder.class_names)
    if len(samples) and (int(samples.labels.min()) < 0 or int(samples.labels.max()) >= len(class_names)):
        raise ValueError(
            f"samples.labels must lie in [0, {len(class_names) - 1}] (the decoder's classes), got values in "
            f"[{int(samples.labels.min())}, {int(samples.labels.max())}]"
        )
    if len(samples) == 0:
        raise ValueError("samples is empty: there is nothing to generate")
    rank, world_size, has_group = _rank_and_world_size()
    root = Path(out_dir)
    config_hash = decoder_config_hash(decoder)
    legacy = _legacy_layout(root, len(class_names))
    if legacy:
        logger.warning(
            "%s holds class folders of the earlier unpadded layout (0/, 1/, ...); the generation resumed there "
            "keeps that layout (GeneratedImageFolder reads it; use dreamood.data.export for other tools)",
            root,
        )
    records = _plan(samples, images_per_class, seed, config_hash, class_names, legacy)
    manifest = root / MANIFEST_NAME
    _check_manifest(manifest, config_hash, overwrite)
    if rank == 0:
        foreign, temporaries = _foreign_files(root, {r["path"] for r in records})
        if foreign and not overwrite:
            raise ValueError(
                f"{root} holds {len(foreign)} image(s) that this generation does not plan (e.g. {foreign[0]}); "
                "pass overwrite=True to remove them, or choose another out_dir"
            )
        for stale in foreign + temporaries:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    # Which of this rank's images are missing or broken; fixed batches keep a resumed run bit-identical.
    mine = records[rank::world_size]
    todo: list[bool] = []
    for record in mine:
        path = root / record["path"]
        _remove_temporaries(path)
        found = _read_record(path) if path.exists() else None
        if found is not None and found != record and not overwrite:
            raise _mismatch(path, found, record)
        todo.append(found != record)
    batches = [range(s, min(s + batch_size, len(mine))) for s in range(0, len(mine), batch_size)]
    batches = [b for b in batches if any(todo[i] for i in b)]
    if batches:
        with contextlib.suppress(FileNotFoundError):
            manifest.unlink()
    generated = 0
    bar = progress(batches, enabled=show_progress and rank == 0, desc="generating images", total=len(batches))
    with _ImageWriter(writer_threads) as writer:
        for batch in bar:
            chunk = [mine[i] for i in batch]
            rows = torch.tensor([r["embedding_row"] for r in chunk], device=samples.device)
            images = decoder.decode(samples.vectors[rows], samples.labels[rows], [r["seed"] for r in chunk])
            pixels = _to_pixels(images, len(chunk))
            jobs = [(root / record["path"], image, record) for i, record, image in zip(batch, chunk, pixels) if todo[i]]
            writer.write_batch(jobs)
            generated += len(jobs)

    if has_group:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _write_manifest(manifest, records, class_names)
        dist.barrier()
        complete = True
    else:
        complete = all((root / r["path"]).is_file() for r in records)
        if complete:
            _write_manifest(manifest, records, class_names)
    return GenerationResult(
        out_dir=root,
        num_images=len(records),
        generated=generated,
        skipped=len(mine) - sum(todo),
        manifest=manifest if complete else None,
    )
