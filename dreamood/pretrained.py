"""Locating pretrained weights on disk (Stable Diffusion, CLIP) with one clear error when they are missing.

dreamood never needs the network: pretrained models load with ``local_files_only=True`` unless the caller
opts in. A model id (``"CompVis/stable-diffusion-v1-4"``) is looked up in the Hugging Face cache; a path
must hold the expected sub-folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dreamood.errors import ModelNotFoundError

__all__ = ["is_local_path", "resolve_pretrained"]

# Each folder is complete when one of its alternative file sets is present (transformers 5 may save a
# tokenizer as tokenizer.json alone; the published SD v1.x snapshots have vocab.json and merges.txt).
_FILES_BY_FOLDER: dict[str, tuple[tuple[str, ...], ...]] = {
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "text_encoder": (("config.json",),),
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "scheduler": (("scheduler_config.json",),),
}


_EXAMPLE_ID = "CompVis/stable-diffusion-v1-4"
_ALLOW_DOWNLOAD = (
    "or let Hugging Face download it now: local_files_only=False in Python, or from the dreamood command "
    "--set generation.local_files_only=false (and --set anchors.local_files_only=false for the anchors)"
)


def is_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder rather than a Hugging Face Hub id (``name`` or ``owner/name``).

    A path: it exists, starts with ``.``, ``/`` or ``~``, is absolute, has a backslash or more than one ``/``,
    or its parent folder exists here (``models/sd`` with a ``models/`` folder).
    """
    path = Path(name).expanduser()
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
        or path.exists()
        or (name.count("/") == 1 and path.parent.is_dir())
    )


def _how_to_fetch(model: str) -> str:
    if is_local_path(model):
        return (
            f"{model!r} is a local folder: download the model into it once, on a machine with network access, "
            f"with its Hugging Face id, e.g. `hf download {_EXAMPLE_ID} --local-dir {model}` "
            "(`huggingface-cli download` before huggingface_hub 1.0), or pass another folder that holds it."
        )
    return (
        "Download it once on a machine with network access, for example with "
        f"`hf download {model} --local-dir <folder>` (`huggingface-cli download` before huggingface_hub 1.0, "
        f"or `snapshot_download`), then pass that folder; {_ALLOW_DOWNLOAD}. If {model!r} was meant as a local "
        f"folder, it does not exist under {os.getcwd()}."
    )


def resolve_pretrained(
    model_id_or_path: str | os.PathLike[str], subfolders: Sequence[str], *, local_files_only: bool = True
) -> str:
    """Return a local folder (or, when downloads are allowed, the model id) that holds ``subfolders``.

    Args:
        model_id_or_path: A folder on disk or a Hugging Face model id.
        subfolders: The parts that must be present, e.g. ``("tokenizer", "text_encoder")``. An empty
            sequence means the folder itself is the model (a plain CLIP text model, say).
        local_files_only: Never touch the network. With ``False`` a model id is returned unchanged for
            ``from_pretrained`` to download.

    Raises:
        ModelNotFoundError: The folder does not exist, or lacks a part (the message names what is missing,
            the expected layout and how to fetch the weights).
    """
    name = os.fspath(model_id_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        local = is_local_path(name)
        if not local_files_only and not local:
            return name
        cached = _cached_snapshot(name) if not local else None
        if cached is None:
            layout = ", ".join(f"{s}/" for s in subfolders) or "config.json and weights"
            where = "no such folder" if local else "no such folder and not in the Hugging Face cache"
            raise ModelNotFoundError(
                f"pretrained model {name!r} was not found: {where}. "
                f"Expected a folder holding {layout}. {_how_to_fetch(name)}"
            )
        path = cached
    missing = []
    for folder in subfolders:
        part = path / folder
        alternatives = _FILES_BY_FOLDER.get(folder, ((),))
        if not part.is_dir() or not any(all((part / f).is_file() for f in files) for files in alternatives):
            expected = " or ".join(", ".join(files) for files in alternatives if files) or "files"
            missing.append(f"{folder}/ ({expected})")
    if not subfolders and not (path / "config.json").is_file():
        missing.append("config.json")
    if missing:
        raise ModelNotFoundError(
            f"pretrained model folder {str(path)!r} is incomplete: missing {'; '.join(missing)}. "
            f"A Stable Diffusion v1.x folder holds tokenizer/, text_encoder/, unet/, vae/ and scheduler/. "
            f"{_how_to_fetch(name)}"
        )
    return str(path)


def _cached_snapshot(model_id: str) -> Path | None:
    """The newest snapshot folder of ``model_id`` in the Hugging Face cache, if any (no network)."""
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = cache.expanduser() / f"models--{model_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None
