"""Check a whole run folder: its configuration, stage records, artefacts, generated images and checkpoints.

:func:`verify_run` is what ``dreamood verify RUN_DIR`` runs. It reads everything and reports every problem it
finds instead of stopping at the first, so a user learns at once what a folder can still be trusted for.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from dreamood.errors import ArtifactError

__all__ = ["check_generated_folder", "verify_run"]


def check_generated_folder(
    folder: str | os.PathLike[str],
    *,
    images_per_class: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
) -> list[str]:
    """Check a generated image folder against its ``manifest.jsonl``.

    Every row of the manifest must name an existing 8-bit RGB PNG whose embedded record (written by
    :func:`~dreamood.decoding.generation.generate_images`) is that row: this catches missing, truncated or
    swapped files, images of other classes, and files that are no PNG of the generator (JPEG data, 16-bit,
    grey or RGBA images). With the expected counts it also catches a cut manifest.

    Args:
        folder: The generated folder.
        images_per_class: Images each class must have.
        num_classes: Classes that must have images (labels ``0 .. num_classes - 1``).
        image_size: Side every image must have (``generation.save_size``).

    Returns:
        One line per problem; empty when the folder is sound.
    """
    from PIL import Image

    from dreamood.decoding.generation import MANIFEST_NAME, RECORD_KEY

    root = Path(folder)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return [f"{manifest} is missing: the generation did not complete"]
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{manifest} line {number} is not JSON ({error})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            problems.append(f"{manifest} line {number} has no 'path'")
            continue
        rows.append(row)
    if not rows:
        problems.append(f"{manifest} lists no image")
    counts = Counter(int(row.get("class_index", -1)) for row in rows)
    if num_classes is not None and images_per_class is not None:
        expected = {label: images_per_class for label in range(num_classes)}
        if dict(counts) != expected:
            wrong = sorted(label for label in set(counts) | set(expected) if counts.get(label) != expected.get(label))
            shown = ", ".join(f"class {label}: {counts.get(label, 0)}" for label in wrong[:5])
            problems.append(
                f"{manifest} lists {len(rows)} images, expected {images_per_class} for each of {num_classes} classes "
                f"({shown}{', ...' if len(wrong) > 5 else ''})"
            )
    for row in rows:
        path = root / row["path"]
        if not path.is_file():
            problems.append(f"{path} is missing (listed in {manifest})")
            continue
        try:
            with Image.open(path) as image:
                kind, mode, size = image.format, image.mode, image.size
                record_text = image.info.get(RECORD_KEY)
        except Exception as error:  # PIL raises several types for unreadable files
            problems.append(f"{path} is not a readable image ({type(error).__name__}: {error})")
            continue
        if kind != "PNG" or mode != "RGB":
            problems.append(f"{path} is a {kind} image in mode {mode}, expected an 8-bit RGB PNG")
        if image_size is not None and size != (image_size, image_size):
            problems.append(f"{path} is {size[0]}x{size[1]}, expected {image_size}x{image_size}")
        try:
            record = json.loads(record_text) if isinstance(record_text, str) else None
        except json.JSONDecodeError:
            record = None
        if record != row:
            problems.append(f"{path} is not the image its manifest row describes (its embedded record differs)")
    return problems


def verify_run(folder: str | os.PathLike[str]) -> list[str]:
    """Check every artefact of a run folder against what the folder says made it.

    Checks the configuration (``config.json``), each stage's record and the digests of the files it wrote,
    whether each finished stage was made from the configuration's settings and from the current results of the
    stages before it, the content digests of the tensor artefacts, the generated images against their manifest,
    and that every checkpoint loads safely.

    Args:
        folder: The run folder.

    Returns:
        One line per problem; empty when the folder is sound.
    """
    from dreamood.config import ConfigError, config_from_dict
    from dreamood.io import load_artifact, load_checkpoint
    from dreamood.pipeline.runner import Pipeline
    from dreamood.pipeline.stages import IMAGES, STAGES

    root = Path(folder)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    config_path = root / "config.json"
    try:
        config = config_from_dict(json.loads(config_path.read_text()))
    except FileNotFoundError:
        return [f"{config_path} is missing: is {root} a dreamood run folder?"]
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as error:
        return [f"{config_path} is not a valid configuration: {error}"]
    pipe = Pipeline(config.replace(output_dir=str(root)))
    problems: list[str] = []
    for stage in STAGES:
        try:
            status = pipe.status(stage)
            problems += pipe.verify(stage)
        except ArtifactError as error:
            problems.append(str(error))
            continue
        except (FileNotFoundError, ValueError) as error:  # e.g. a folder benchmark whose data is gone
            problems.append(f"{stage.name}: cannot check ({error})")
            continue
        if status.state == "redo":
            problems.append(f"{stage.name}: made from other settings or inputs than config.json says ({status.reason})")
        elif status.state == "resume":
            problems.append(f"{stage.name}: interrupted, not finished")
        elif status.state == "to do" and pipe.path(stage).exists():
            problems.append(f"{stage.name}: {pipe.path(stage)} exists but {status.reason}")
    kinds = {"anchors": "TokenEmbeddings", "feature_bank": "FeatureBank", "samples": "EmbeddingSamples"}
    for name, kind in kinds.items():
        if (root / f"{name}.safetensors").is_file():
            try:
                load_artifact(root / f"{name}.safetensors", kind=kind)
            except (ArtifactError, FileNotFoundError) as error:
                problems.append(str(error))
    if pipe.path(IMAGES).is_dir():
        generation = config.generation
        problems += check_generated_folder(
            pipe.path(IMAGES),
            images_per_class=generation.images_per_class,
            num_classes=len(pipe.class_names),
            image_size=generation.save_size,
        )
    for checkpoint in sorted(root.rglob("*.pt")):
        try:
            load_checkpoint(checkpoint)
        except ArtifactError as error:
            problems.append(str(error))
    return problems
