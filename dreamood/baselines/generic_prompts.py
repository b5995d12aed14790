"""Generic-prompt images: each class's plain prompt rendered by the decoder DREAM-ID uses (paper Table 4).

The "generic prompts" baseline of DREAM-ID (Du et al., NeurIPS 2023, Table 4) appends images generated from
the plain prompt ``"A high-quality photo of a {class}"`` instead of from sampled inlier embeddings. Here it is the
plain-prompt path of :class:`~dreamood.decoding.stable_diffusion.StableDiffusionDecoder`
(:meth:`~dreamood.decoding.stable_diffusion.StableDiffusionDecoder.decode_prompts` on ``decoder.prompts``) run
through :func:`~dreamood.decoding.generation.generate_images`, so the images get the same folder layout,
per-image seeds, manifest and resumability as DREAM-ID's, and
:class:`~dreamood.data.generated.GeneratedImageFolder` reads them back with their labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dreamood._validation import check_positive_int
from dreamood.decoding.generation import GenerationResult, generate_images
from dreamood.sampling.samples import EmbeddingSamples

__all__ = ["PlainPromptDecoder", "PromptDecoder", "generate_generic_prompt_images"]


@runtime_checkable
class PromptDecoder(Protocol):
    """A decoder that renders plain text prompts, such as ``StableDiffusionDecoder``."""

    @property
    def class_names(self) -> Sequence[str]:
        """Names of the classes, indexed by label."""
        ...

    @property
    def prompts(self) -> Sequence[str]:
        """Each class's plain prompt (the prompt template with the class name written in)."""
        ...

    def decode_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Render one image ``(3, H, W)`` in ``[0, 1]`` per prompt, with one seed per image."""
        ...


class PlainPromptDecoder:
    """An :class:`~dreamood.protocols.EmbeddingDecoder` that renders each label's plain prompt.

    ``decode(vectors, labels, seeds)`` ignores ``vectors`` (of width 1) and returns
    ``decoder.decode_prompts([decoder.prompts[y] for y in labels], seeds)``, so that
    :func:`~dreamood.decoding.generation.generate_images` can render plain prompts.

    Args:
        decoder: A :class:`PromptDecoder`.

    Raises:
        TypeError: ``decoder`` lacks ``class_names``, ``prompts`` or ``decode_prompts``.
        ValueError: The decoder has not one prompt per class.
    """

    def __init__(self, decoder: PromptDecoder) -> None:
        if not isinstance(decoder, PromptDecoder):
            raise TypeError(
                f"decoder must have class_names, prompts and decode_prompts(prompts, seeds), got "
                f"{type(decoder).__name__}"
            )
        self.decoder = decoder
        self._class_names = list(decoder.class_names)
        self._prompts = list(decoder.prompts)
        if len(self._prompts) != len(self._class_names):
            raise ValueError(f"decoder has {len(self._class_names)} class names but {len(self._prompts)} prompts")

    @property
    def embedding_dim(self) -> int:
        """1: the vectors are placeholders."""
        return 1

    @property
    def class_names(self) -> list[str]:
        """The wrapped decoder's class names."""
        return list(self._class_names)

    @property
    def config(self) -> dict[str, Any]:
        """What identifies the images: the prompts and the wrapped decoder's ``config`` (else its ``repr``)."""
        settings = getattr(self.decoder, "config", None)
        return {"kind": "plain_prompt", "prompts": list(self._prompts), "decoder": settings or repr(self.decoder)}

    def decode(self, vectors: Tensor, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """Render the plain prompt of each label with its seed (``vectors`` is ignored).

        Args:
            vectors: Placeholders ``(B, 1)``.
            labels: Class labels ``(B,)``.
            seeds: One seed per image.

        Returns:
            The wrapped decoder's images ``(B, 3, H, W)``.
        """
        return self.decoder.decode_prompts([self._prompts[int(label)] for label in labels.tolist()], seeds)


def generate_generic_prompt_images(
    decoder: PromptDecoder,
    out_dir: str | os.PathLike[str],
    images_per_class: int,
    *,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
) -> GenerationResult:
    """Render ``images_per_class`` images of every class from its plain prompt, resumably.

    Runs :func:`~dreamood.decoding.generation.generate_images` on a :class:`PlainPromptDecoder`: images go to
    ``out_dir/<class_index:03d>/<image_index:06d>.png`` with ``manifest.jsonl``, image ``i`` (class-major) is
    decoded with ``image_seed(seed, i)``, and a second call finishes an interrupted run. Read the folder back
    with ``GeneratedImageFolder(out_dir, image_size=...)`` and append it to the ID training set as
    ``synthetic_id_loader`` of :func:`~dreamood.training.train_classifier`.

    Args:
        decoder: A :class:`PromptDecoder`, e.g. the ``StableDiffusionDecoder`` that renders DREAM-ID's
            inliers (default template ``"A high-quality photo of a {}"``).
        out_dir: Output folder.
        images_per_class: Images per class (as many as DREAM-ID generates, for the paper's comparison).
        batch_size: Images per ``decode_prompts`` call.
        seed: Seed from which each image's seed is derived.
        show_progress: Show a progress bar.
        overwrite: Replace images of another configuration found in ``out_dir`` instead of raising.

    Returns:
        What ``generate_images`` did.

    Raises:
        TypeError: ``decoder`` lacks ``class_names``, ``prompts`` or ``decode_prompts``.
        ValueError: A count is not positive, or ``out_dir`` holds images of another configuration.
    """
    plain = PlainPromptDecoder(decoder)
    check_positive_int(images_per_class, "images_per_class")
    count = len(plain.class_names)
    labels = torch.arange(count).repeat_interleave(images_per_class)
    samples = EmbeddingSamples(
        torch.zeros(labels.numel(), 1),
        labels,
        config={"sampler": "generic_prompt"},
        class_names=plain.class_names,
    )
    return generate_images(
        plain,
        samples,
        out_dir,
        images_per_class,
        batch_size=batch_size,
        seed=seed,
        show_progress=show_progress,
        overwrite=overwrite,
    )
