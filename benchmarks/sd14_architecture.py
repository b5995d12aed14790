"""A randomly initialised Stable Diffusion pipeline of the exact v1.4 architecture, for timing without weights.

The configurations below are those of ``CompVis/stable-diffusion-v1-4`` (``unet/``, ``vae/``, ``text_encoder/``
and ``scheduler/`` config files): the UNet has blocks of 320/640/1280/1280 channels, two layers per block,
8-channel attention heads and 768-wide cross-attention; the VAE 128/256/512/512 channels; the text encoder is
CLIP ViT-L/14's (hidden 768, 12 layers, 12 heads, MLP 3072, 77 positions, vocabulary 49,408). Random weights
cost exactly the arithmetic of the real ones, so images per second measured with this pipeline are those of
the real model; the images themselves are meaningless.

The tokenizer is the tiny CLIP BPE tokenizer of :mod:`dreamood.testing` (its ids are all far below 49,408, so
the full-size text encoder accepts them). Every prompt is padded to the 77-token window as with the real
tokenizer, so the text encoder does the same work.

``tiny_pipeline`` builds the small test pipeline of :mod:`dreamood.testing` for CPU smoke runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SD14_TEXT_ENCODER",
    "SD14_UNET",
    "SD14_VAE",
    "load_pipeline",
    "sd14_pipeline",
    "tiny_pipeline",
]

#: ``UNet2DConditionModel`` arguments of Stable Diffusion v1.4.
SD14_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: ``AutoencoderKL`` arguments of Stable Diffusion v1.4.
SD14_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: ``CLIPTextConfig`` arguments of Stable Diffusion v1.4's text encoder (CLIP ViT-L/14), without token ids.
SD14_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

#: Stable Diffusion v1.4's scheduler: PNDM in its PLMS form, the paper's sampler.
_SD14_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def sd14_pipeline(
    tokenizer_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> Any:
    """A ``StableDiffusionPipeline`` of the exact v1.4 architecture with random weights (no safety checker).

    The weights are drawn on ``device`` (fast on a GPU) in float32 from ``seed`` and then cast to ``dtype``, so
    the same seed, device and dtype give the same pipeline.

    Args:
        tokenizer_dir: Folder the tiny CLIP tokenizer's vocabulary is written to.
        device: Where the weights are created and kept.
        dtype: Dtype of the weights.
        seed: Seed of the random weights.

    Returns:
        The pipeline, on ``device``, in ``dtype``.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamood.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(Path(tokenizer_dir), model_max_length=SD14_TEXT_ENCODER["max_position_embeddings"])
    if len(tokenizer) > SD14_TEXT_ENCODER["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the text encoder's vocabulary")
    text_config = CLIPTextConfig(
        **SD14_TEXT_ENCODER,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    target = torch.device(device)
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []), target:
        torch.manual_seed(seed)
        unet: Any = UNet2DConditionModel(**SD14_UNET)
        vae: Any = AutoencoderKL(**SD14_VAE)
        text_encoder: Any = CLIPTextModel(text_config)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**_SD14_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _cast(pipeline, target, dtype)
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipeline


def _cast(pipeline: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast a pipeline without diffusers' warning about float32 modules (these models have none)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipeline.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def tiny_pipeline(
    tokenizer_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Any:
    """The tiny random pipeline of :func:`dreamood.testing.tiny_stable_diffusion_pipeline`, for smoke runs.

    Args:
        tokenizer_dir: Folder the tiny CLIP tokenizer's vocabulary is written to.
        device: Where the pipeline is put.
        dtype: Dtype of the weights.
        seed: Seed of the random weights.

    Returns:
        The pipeline, on ``device``, in ``dtype``.
    """
    from dreamood.testing import tiny_stable_diffusion_pipeline

    pipeline = tiny_stable_diffusion_pipeline(Path(tokenizer_dir), seed=seed)
    _cast(pipeline, torch.device(device), dtype)
    return pipeline


def load_pipeline(
    model: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
) -> Any:
    """Stable Diffusion v1.x weights from a local folder, as a plain ``StableDiffusionPipeline`` (no safety checker).

    The scheduler is replaced by PNDM in its PLMS form built from the model's scheduler configuration (the
    paper's sampler), so real and random pipelines run the same sampler.

    Args:
        model: A folder with ``tokenizer/``, ``text_encoder/``, ``unet/``, ``vae/`` and ``scheduler/``.
        device: Where the pipeline is put.
        dtype: Dtype of the weights.

    Returns:
        The pipeline, on ``device``, in ``dtype``.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(model),
        torch_dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipeline.scheduler = PNDMScheduler.from_config(pipeline.scheduler.config, skip_prk_steps=True)
    pipeline.to(torch.device(device))
    return pipeline
