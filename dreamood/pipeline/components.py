"""The components a run builds from its configuration when none is passed in.

:class:`~dreamood.pipeline.Pipeline` takes an anchor source, a sampler, a decoder factory and a backbone factory;
each defaults to what is built here from the configuration: the anchors of ``anchors.model``'s token table(s),
the k-NN boundary sampler of ``[sampler]``, the decoder of ``generation.model``'s family with the ``[generation]``
settings, and dreamood's backbones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from dreamood._utils import library_progress_bars
from dreamood.config import PipelineConfig
from dreamood.pipeline.data import build_backbone, image_size_of

if TYPE_CHECKING:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.protocols import EmbeddingDecoder, EmbeddingSampler

__all__ = [
    "BackboneFactory",
    "DecoderFactory",
    "check_config_anchors",
    "config_anchors",
    "config_backbone_factory",
    "config_decoder",
    "config_sampler",
]

#: Builds the image decoder from the configuration and the class names.
DecoderFactory = Callable[[PipelineConfig, list[str]], "EmbeddingDecoder"]
#: Builds a feature extractor (with an integer ``feature_dim``) from a backbone name and a ResNet stem of the
#: configuration (``encoder.backbone`` and ``encoder.stem``, or ``training.backbone`` and ``training.stem``).
BackboneFactory = Callable[[str, str], nn.Module]


def config_anchors(config: PipelineConfig, class_names: Sequence[str]) -> TokenEmbeddings:
    """The rows of ``anchors.model``'s token table(s), in the form its family's decoder accepts.

    Args:
        config: The run's configuration (``[anchors]``).
        class_names: The class names, in label order.

    Returns:
        The anchors.
    """
    from dreamood.decoding.backends import load_anchors

    cfg = config.anchors
    with library_progress_bars(["transformers"], enabled=config.progress):
        return load_anchors(
            cfg.model, list(class_names), cfg.subword, words=cfg.words, local_files_only=cfg.local_files_only
        )


def check_config_anchors(config: PipelineConfig, anchors: TokenEmbeddings) -> None:
    """Check that anchors fit ``generation.model``: its width and token ids (its JSON files only, no weights).

    Args:
        config: The run's configuration.
        anchors: The class anchors.

    Raises:
        AnchorMismatchError: The anchors do not fit ``generation.model``.
    """
    from dreamood.decoding.backends import check_anchors

    generation = config.generation
    check_anchors(anchors, generation.model, local_files_only=generation.local_files_only)


def config_sampler(config: PipelineConfig, device: torch.device) -> EmbeddingSampler:
    """The k-NN boundary sampler of ``[sampler]``, in inlier mode for DREAM-ID.

    Args:
        config: The run's configuration.
        device: Where it computes.

    Returns:
        The sampler.
    """
    from dreamood.sampling.knn_boundary import KNNBoundarySampler

    cfg = config.sampler
    return KNNBoundarySampler(
        k=cfg.k,
        boundary_size=cfg.boundary,
        anchors_per_round=cfg.anchors_per_round,
        candidates_per_anchor=cfg.candidates_per_anchor,
        sigma=cfg.sigma,
        keep_per_anchor=cfg.keep,
        mode="inlier" if config.method == "dream-id" else "outlier",
        seed=config.seed,
        device=device,
        show_progress=config.progress,
    )


def config_backbone_factory(config: PipelineConfig) -> BackboneFactory:
    """:func:`~dreamood.pipeline.build_backbone` with the stem a name of ``STEMS`` means at the run's image size.

    Args:
        config: The run's configuration.

    Returns:
        The factory: ``"auto"`` takes the 3x3 stem for images up to 64 px.
    """
    from dreamood.models.resnet import uses_small_stem

    size = image_size_of(config)

    def factory(name: str, stem: str) -> nn.Module:
        return build_backbone(name, small_input=uses_small_stem(stem, size))

    return factory


def config_decoder(config: PipelineConfig, class_names: list[str], device: torch.device) -> EmbeddingDecoder:
    """The decoder of ``generation.model``'s family (Stable Diffusion v1.x/2.x or XL) with the generation settings.

    The authors' prompt and injection options are passed only when they are set, since only the Stable Diffusion
    v1.x/2.x decoder has them; asking them of another family is an error.

    Args:
        config: The run's configuration (``[generation]``).
        class_names: The class names, in label order.
        device: Where it renders.

    Returns:
        The decoder.

    Raises:
        ValueError: ``generation.class_prompts`` names an unknown class, or an option needs another family.
    """
    from dreamood.decoding.backends import inspect_model, load_decoder

    cfg = config.generation
    unknown = sorted(set(cfg.class_prompts) - set(class_names))
    if unknown:
        raise ValueError(f"generation.class_prompts names classes the run does not have: {', '.join(unknown)}")
    templates = [cfg.class_prompts.get(name, cfg.prompt) for name in class_names] if cfg.class_prompts else cfg.prompt
    options = {
        "prompt_words": cfg.prompt_words,
        "injection": cfg.injection,
        "injection_words": cfg.injection_words,
        "conditioning_noise": cfg.conditioning_noise,
        "fixed_latent_seed": cfg.fixed_latent_seed,
    }
    defaults = {"injection": "span", "conditioning_noise": 0.0}
    chosen = {key: value for key, value in options.items() if value is not None and value != defaults.get(key)}
    if isinstance(templates, list):
        chosen["prompt_template"] = templates
    family = inspect_model(cfg.model, local_files_only=cfg.local_files_only).family
    if chosen and family != "stable-diffusion":
        names = ", ".join(f"generation.{key}" for key in sorted(chosen) if key != "prompt_template")
        raise ValueError(f"{names or 'generation.class_prompts'} need a Stable Diffusion v1.x/2.x model, not {family}")
    decoder: EmbeddingDecoder = load_decoder(
        cfg.model,
        class_names,
        local_files_only=cfg.local_files_only,
        torch_dtype=cfg.dtype,
        device=device,
        scheduler=cfg.scheduler,
        prompt_template=chosen.pop("prompt_template", cfg.prompt),
        lora=cfg.lora,
        lora_scale=cfg.lora_scale,
        **chosen,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=cfg.height,
        width=cfg.width,
        output_size=cfg.save_size,
        progress=config.progress,
        channels_last=cfg.channels_last,
        fuse_qkv_projections=cfg.fuse_qkv_projections,
        compile=cfg.compile,
        compile_vae=cfg.compile_vae,
        compile_mode=cfg.compile_mode,
    )
    return decoder
