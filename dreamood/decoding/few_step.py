"""Samplers and LoRA weights of a diffusion decoder: the paper's PLMS, DPM-Solver++, and few-step generation.

The paper renders with PLMS, 50 steps, guidance 7.5. Fewer UNet evaluations per image come from three kinds
of models and settings, each a *setting* of the same decoder (no other code path):

* **DPM-Solver++** (``scheduler="dpm++"``): the same model, 20-25 steps instead of 50.
* **LCM-LoRA** (``scheduler="lcm"``, ``lora=<folder>``): a latent-consistency LoRA (e.g.
  ``latent-consistency/lcm-lora-sdv1-5`` or ``lcm-lora-sdxl``) loaded into the model with diffusers' LoRA
  loading and fused into its weights; 2-8 steps, guidance 1 (off) to 2.
* **Turbo models** (SD-Turbo, SDXL-Turbo; ``scheduler="model"`` keeps the Euler scheduler with "trailing"
  timesteps they ship): 1-4 steps, guidance 0 (off).
"""

from __future__ import annotations

import math
import os
from typing import Any

from dreamood._validation import check_choice

__all__ = ["SCHEDULERS", "apply_lora", "make_scheduler"]

#: Scheduler names a decoder accepts. ``"pndm"`` with ``skip_prk_steps`` is PLMS, the paper's sampler;
#: ``"ddim"``; ``"dpm++"`` is DPM-Solver++ (multistep); ``"lcm"`` the latent-consistency scheduler (for
#: LCM-LoRA); ``"euler"`` and ``"euler-a"`` Euler and Euler-ancestral (the latter draws fresh noise at every
#: step from each image's own generator); ``"model"`` keeps the scheduler the model folder ships (what Turbo
#: models need). Every one but ``"model"`` is built from the model's scheduler configuration, so the noise
#: schedule and the prediction type (epsilon or v) of the model are kept.
SCHEDULERS: tuple[str, ...] = ("pndm", "ddim", "dpm++", "lcm", "euler", "euler-a", "model")


def make_scheduler(name: str, scheduler: Any) -> Any:
    """A scheduler of kind ``name`` built from a pipeline's current scheduler's configuration.

    Args:
        name: One of :data:`SCHEDULERS`.
        scheduler: The pipeline's scheduler (its configuration carries the model's noise schedule and
            prediction type).

    Returns:
        A fresh scheduler, or ``scheduler`` itself for ``"model"``.

    Raises:
        ValueError: ``name`` is unknown.
    """
    check_choice(name, SCHEDULERS, "scheduler")
    if name == "model":
        return scheduler
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        PNDMScheduler,
    )

    config = scheduler.config
    if name == "pndm":
        return PNDMScheduler.from_config(config, skip_prk_steps=True)  # type: ignore[no-untyped-call]
    if name == "ddim":
        return DDIMScheduler.from_config(config)  # type: ignore[no-untyped-call]
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")  # type: ignore[no-untyped-call]
    if name == "lcm":
        return LCMScheduler.from_config(config)  # type: ignore[no-untyped-call]
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)  # type: ignore[no-untyped-call]
    return EulerAncestralDiscreteScheduler.from_config(config)  # type: ignore[no-untyped-call]


def apply_lora(
    pipeline: Any,
    lora: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    weight_name: str | None = None,
    local_files_only: bool = True,
) -> dict[str, Any]:
    """Load LoRA weights into a diffusers pipeline and fuse them into its weights, in place.

    The LoRA is loaded with the pipeline's own ``load_lora_weights`` (UNet and, when the file holds them, the
    text encoders), fused with ``fuse_lora(lora_scale=scale)`` and the LoRA layers are then removed
    (``unload_lora_weights``): the pipeline is left with plain layers holding ``W + scale * B A``, so fused
    attention projections and ``torch.compile`` work as without a LoRA. Call it before those speed-ups.

    Note that a LoRA on the text encoder changes its layers, not its input token-embedding table, so anchors
    taken from the table stay valid.

    Args:
        pipeline: A diffusers pipeline with LoRA loading (Stable Diffusion, Stable Diffusion XL).
        lora: A folder holding the LoRA weights (``pytorch_lora_weights.safetensors``), a weights file, or a
            Hugging Face model id (e.g. ``"latent-consistency/lcm-lora-sdv1-5"``).
        scale: Weight of the LoRA update.
        weight_name: File name inside the folder, when not the default one.
        local_files_only: Never download (a model id must be in the Hugging Face cache).

    Returns:
        What identifies the change, for a decoder's ``config``: ``{"sha256": <hash of the LoRA tensors>,
        "scale": scale}`` (the same weights in another folder give the same hash).

    Raises:
        ImportError: ``peft`` is not installed (diffusers needs it to load LoRA weights).
        ModelNotFoundError: The LoRA weights are missing or cannot be read.
        ValueError: ``scale`` is not finite.
    """
    import importlib.util

    import torch

    from dreamood.errors import ModelNotFoundError

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"lora_scale must be a finite number, got {scale!r}")
    if importlib.util.find_spec("peft") is None:
        raise ImportError("loading LoRA weights needs the peft package: pip install peft")
    source = os.fspath(lora)
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if weight_name is not None:
        kwargs["weight_name"] = weight_name
    if os.path.isfile(source):
        kwargs.setdefault("weight_name", os.path.basename(source))
        source = os.path.dirname(source) or "."
    elif local_files_only and not os.path.isdir(source) and source.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"LoRA weights {source!r} not found: no such file or folder")
    try:
        loaded = pipeline.lora_state_dict(source, **kwargs)
        pipeline.load_lora_weights(source, adapter_name="dreamood_lora", **kwargs)
    except (OSError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelNotFoundError(
            f"could not load LoRA weights from {os.fspath(lora)!r} ({type(error).__name__}: {detail}). Expected a "
            "folder with pytorch_lora_weights.safetensors, a .safetensors file, or a cached model id (download it "
            f"once with `hf download {os.fspath(lora)} --local-dir <folder>`)"
        ) from error
    # lora_state_dict gives (state dict, network alphas[, metadata]); alphas scale the update too.
    state = dict(loaded[0])
    alphas = loaded[1] if len(loaded) > 1 and isinstance(loaded[1], dict) else {}
    state.update({f"alpha:{name}": torch.tensor(float(value)) for name, value in alphas.items()})
    digest = _tensors_sha256(state)
    pipeline.fuse_lora(lora_scale=float(scale), adapter_names=["dreamood_lora"])
    pipeline.unload_lora_weights()
    return {"sha256": digest, "scale": float(scale)}


def _tensors_sha256(tensors: dict[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict, in sorted name order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
