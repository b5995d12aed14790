"""What a run needs before it starts: data folders, model folders, disk space, GPU memory; checked without loading.

``dreamood run --dry-run`` calls :func:`check_requirements`, so a run that would fail at its first stage (or,
worse, after hours at its sixth) fails in a second instead, saying everything that is missing at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dreamood.pipeline.runner import Pipeline

__all__ = ["BYTES_PER_PIXEL_ESTIMATE", "GENERATION_GPU_BYTES", "check_requirements"]

#: Bytes a generated PNG takes per pixel, roughly (photographs compress to about 60% of their 3 bytes per pixel).
BYTES_PER_PIXEL_ESTIMATE = 2.0
#: Free GPU memory Stable Diffusion v1.x needs to render a batch of 8 at 512x512 in half precision, roughly.
GENERATION_GPU_BYTES = 6 * 2**30

# Stages that read the training or test data, and the stages that load a pretrained model.
_DATA_STAGES = frozenset({"encoder", "bank", "classifier", "report"})


def _free_bytes(folder: Path) -> int:
    existing = folder.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _data_problems(pipe: Pipeline) -> list[str]:
    from dreamood.data.ood import ood_sets_of

    config = pipe.config
    data = config.data
    root = Path(data.root).expanduser()
    problems = []
    if config.benchmark == "cifar100":
        if not data.download and not (root / "cifar-100-python").is_dir():
            problems.append(
                f"CIFAR-100 not found: no folder {root / 'cifar-100-python'} (set data.root, or data.download)"
            )
    elif config.benchmark == "imagenet100":
        from dreamood.data.classes import IMAGENET100_WNIDS

        for split in ("train", "val"):
            missing = [wnid for wnid in IMAGENET100_WNIDS if not (root / split / wnid).is_dir()]
            if missing:
                problems.append(
                    f"ImageNet-100 {split} images not found: {len(missing)} of the 100 class folders are missing "
                    f"under {root / split} (e.g. {missing[0]}); data.root must be the ImageNet-1k root"
                )
    else:
        problems += [f"no folder {root / split} (data.root/{split}/<class>/...)" for split in ("train", "test")
                     if not (root / split).is_dir()]  # fmt: skip
    known = ood_sets_of(config.benchmark) if config.benchmark != "folder" else ()
    specs = {spec.name: spec for spec in known}
    names = data.ood_sets if data.ood_sets is not None else list(specs)
    for name in names:
        if name in data.ood_paths:
            folder = Path(data.ood_paths[name]).expanduser()
        elif name in specs:
            folder = Path(data.ood_root).expanduser() / specs[name].folder
        else:
            continue  # an unknown set name is the configuration's error, reported when the data is built
        if not folder.exists():
            layout = f" ({specs[name].layout})" if name in specs else ""
            problems.append(f"OOD test set {name!r} not found: no folder {folder}{layout}")
    return problems


# The parts of a model folder that the anchors and the generation read.
_ANCHOR_PARTS = ("tokenizer", "text_encoder")
_GENERATION_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def _model_problem(model: str, local_files_only: bool, key: str, parts: tuple[str, ...]) -> str | None:
    from dreamood.errors import ModelNotFoundError
    from dreamood.pretrained import resolve_pretrained

    try:
        resolve_pretrained(model, parts, local_files_only=local_files_only)
    except ModelNotFoundError as error:
        return f"{key}: {error}"
    return None


def check_requirements(pipe: Pipeline) -> list[str]:
    """What the stages that will run need and do not have, found without loading any model or dataset.

    Checks, for the stages :meth:`Pipeline.plan <dreamood.pipeline.Pipeline.plan>` says will run: the data
    folders (ID and OOD; skipped when the pipeline was given its data), the pretrained model folders of the
    anchors and of the generation (skipped for a component passed in), the free disk space for the images to
    generate, and the free GPU memory for the generation when it runs on CUDA.

    Args:
        pipe: The run.

    Returns:
        One line per missing thing; empty when the run has what it needs.
    """
    running = {status.stage for status in pipe.plan() if status.runs}
    config = pipe.config
    problems: list[str] = []
    if running & _DATA_STAGES and not pipe.has_given_data:
        problems += _data_problems(pipe)
    if "anchors" in running and "anchor_source" not in pipe.given_components:
        problem = _model_problem(config.anchors.model, config.anchors.local_files_only, "anchors.model", _ANCHOR_PARTS)
        problems += [problem] if problem else []
    if "images" in running:
        generation = config.generation
        if "decoder_factory" not in pipe.given_components:
            problem = _model_problem(
                generation.model, generation.local_files_only, "generation.model", _GENERATION_PARTS
            )
            problems += [problem] if problem else []
        side = generation.save_size or max(generation.height, generation.width)
        count = len(pipe.class_names) * generation.images_per_class
        needed = count * side * side * BYTES_PER_PIXEL_ESTIMATE
        free = _free_bytes(pipe.output_dir)
        if needed > free:
            problems.append(
                f"not enough disk space for the images: {count} images of {side}x{side} take about "
                f"{needed / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB are free under {pipe.output_dir}"
            )
        if pipe.device.type == "cuda":
            import torch

            free_memory, _ = torch.cuda.mem_get_info(pipe.device)
            if free_memory < GENERATION_GPU_BYTES:
                problems.append(
                    f"{pipe.device} has {free_memory / 2**30:.1f} GiB free; generation needs about "
                    f"{GENERATION_GPU_BYTES / 2**30:.0f} GiB (lower generation.batch_size or free the GPU)"
                )
    return problems
