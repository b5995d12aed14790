"""Decode sampled token embeddings into images with Stable Diffusion XL (two text encoders).

Stable Diffusion XL conditions its UNet on two CLIP text encoders: ``text_encoder`` (CLIP ViT-L, 768-d token
table) and ``text_encoder_2`` (OpenCLIP ViT-bigG, 1280-d token table, with a projection). The UNet reads the
concatenation of the two encoders' penultimate hidden states (768 + 1280 = 2048 per token) and, through its
"text_time" embedding, the *pooled* embedding of the second encoder (its projected end-of-text state).

**The anchor of a class lives in both token tables.** ``T(y) = [T_1(y), T_2(y)]`` is the concatenation of the
class name's row of the first table (768-d) and of the second (1280-d), 2048-d in all
(:meth:`dreamood.anchors.TokenEmbeddings.from_text_encoders`). The latent space of Phase 1 and the sampled
outliers are 2048-d; a sampled vector ``v`` is split again at the same widths, ``v[:768]`` goes into the class
slot of the first encoder's prompt and ``v[768:]`` into the class slot of the second's. Both encoders then run
unchanged, so the per-token conditioning *and* the pooled embedding follow the injected vector. Rescaling a
sampled vector to ``||T(y)||`` (Phase 2) rescales the concatenation, not each part.

Decoding a class's own ``T(y)`` gives exactly the plain pipeline's image for the prompt text and the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood.decoding._diffusers import DiffusersDecoder, check_pipeline_parts, check_sampling, load_pipeline
from dreamood.decoding.injection import PromptTokens, build_injection_prompts, inject_token_embeddings, tokenize_prompts

__all__ = ["SDXL_PARTS", "StableDiffusionXLDecoder", "encode_sdxl_tokens"]

#: Sub-folders of a Stable Diffusion XL model folder.
SDXL_PARTS: tuple[str, ...] = (
    "tokenizer",
    "tokenizer_2",
    "text_encoder",
    "text_encoder_2",
    "unet",
    "vae",
    "scheduler",
)


def encode_sdxl_tokens(
    text_encoders: Sequence[Any],
    input_ids: Sequence[Tensor],
    vectors: Sequence[Tensor] | None = None,
    slots: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run SDXL's two text encoders as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does.

    Each encoder runs on its own ids (no attention mask) with ``output_hidden_states=True``; the conditioning is
    the concatenation of the penultimate hidden states, the pooled embedding the second encoder's first output
    (its projected end-of-text state). With ``vectors``, ``vectors[i]`` replaces encoder ``i``'s input token
    embedding at ``slots[i]`` of every row.

    Args:
        text_encoders: ``(text_encoder, text_encoder_2)``.
        input_ids: ``(B, L)`` ids for each encoder.
        vectors: ``(B, m_i)`` vectors for each encoder, or ``None`` for the plain prompts.
        slots: ``(B,)`` slot positions for each encoder; required with ``vectors``.

    Returns:
        ``prompt_embeds`` ``(B, L, d_1 + d_2)`` in the second encoder's dtype and ``pooled_prompt_embeds``
        ``(B, p)``, on the second encoder's device.

    Raises:
        ValueError: ``vectors`` is given without ``slots``.
    """
    if vectors is not None and slots is None:
        raise ValueError("slots are required when vectors are injected")
    hidden: list[Tensor] = []
    pooled: Tensor | None = None
    with torch.no_grad():
        for index, (encoder, ids) in enumerate(zip(text_encoders, input_ids)):
            ids = ids.to(encoder.device)
            if vectors is None or slots is None:
                output = encoder(ids, output_hidden_states=True)
            else:
                with inject_token_embeddings(encoder.get_input_embeddings(), vectors[index], slots[index]):
                    output = encoder(ids, output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
    if pooled is None:
        raise ValueError("no text encoder returned a pooled embedding; text_encoder_2 must be a projection model")
    last = text_encoders[-1]
    embeds = torch.cat(hidden, dim=-1).to(dtype=last.dtype, device=last.device)
    return embeds, pooled


class StableDiffusionXLDecoder(DiffusersDecoder):
    """Render sampled token embeddings as images with a diffusers Stable Diffusion XL pipeline.

    The decoder of :class:`~dreamood.decoding.stable_diffusion.StableDiffusionDecoder` for a model with two text
    encoders: a vector ``v`` of width ``embedding_dim = d_1 + d_2`` (768 + 1280 = 2048 for SDXL) is split at
    ``split`` and its parts go into the class slot of each encoder's prompt (see the module's description), so
    the pooled text embedding follows too. Decoding a class's own anchor ``[T_1(y), T_2(y)]`` (single-token names)
    reproduces the plain pipeline's image for the prompt text and the same seed exactly.

    Seeds, batching and resizing behave as in ``StableDiffusionDecoder``: every image's initial latents come from
    its own CPU generator seeded with its seed, and the same generators feed stochastic scheduler steps.

    The unconditional branch of classifier-free guidance follows the pipeline: with ``negative_prompt=None`` a
    model whose config sets ``force_zeros_for_empty_prompt`` (SDXL base) uses all-zero embeddings, as a plain
    ``pipeline(prompt)`` call does; a string is encoded by both encoders. Turbo models run without guidance
    (``guidance_scale=0``).

    Args:
        pipeline: A diffusers ``StableDiffusionXLPipeline``.
        class_names: Class names, indexed by label; each must appear as its own tokens in the prompt.
        prompt_template: Prompt with exactly one ``{}`` for the class name (the same text for both encoders).
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance weight; ``<= 1`` disables guidance.
        negative_prompt: Text of the unconditional branch, or ``None`` for the pipeline's default.
        height: Generated image height in pixels (a multiple of 8; SDXL is trained at 1024).
        width: Generated image width in pixels (a multiple of 8).
        output_size: Size ``int`` or ``(height, width)`` the images are resized to (antialiased); ``None`` keeps
            ``(height, width)``.
        batch_size: Largest number of images rendered together; ``None`` renders each call in one batch.
        resize_mode: ``"bilinear"`` or ``"bicubic"`` interpolation for ``output_size``.
        device: Move the pipeline to this device first; ``None`` leaves it where it is.
        progress: Show progress bars.

    Attributes:
        pipeline: The diffusers pipeline.
        prompt_tokens: The per-class prompt ids with their slots, one :class:`PromptTokens` per text encoder.

    Raises:
        ValueError: The pipeline lacks a part, a setting is out of range, the template does not hold exactly one
            ``{}``, a class name does not appear as its own tokens in its prompt, or a prompt is too long.
    """

    def __init__(
        self,
        pipeline: Any,
        class_names: Sequence[str],
        prompt_template: str = "A high-quality photo of a {}",
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str | None = None,
        height: int = 1024,
        width: int = 1024,
        output_size: int | tuple[int, int] | None = None,
        *,
        batch_size: int | None = None,
        resize_mode: str = "bilinear",
        device: DeviceLike = None,
        progress: bool = True,
    ) -> None:
        check_pipeline_parts(pipeline, SDXL_PARTS, "a Stable Diffusion XL pipeline with two text encoders")
        check_sampling(
            num_inference_steps,
            guidance_scale,
            negative_prompt,
            height,
            width,
            batch_size,
            resize_mode,
            negative_optional=True,
        )
        tokenizers = (pipeline.tokenizer, pipeline.tokenizer_2)
        encoders = (pipeline.text_encoder, pipeline.text_encoder_2)
        for index, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders)):
            window = int(tokenizer.model_max_length)
            positions = int(getattr(encoder.config, "max_position_embeddings", window))
            if window > positions:
                raise ValueError(
                    f"tokenizer {index + 1}'s model_max_length ({window}) exceeds its text encoder's "
                    f"{positions} positions"
                )

        self._set_sampling(
            pipeline,
            class_names,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            output_size,
            batch_size,
            resize_mode,
            progress,
        )
        self.prompt_template = prompt_template
        self.negative_prompt = negative_prompt
        self.prompt_tokens: tuple[PromptTokens, PromptTokens] = (
            build_injection_prompts(tokenizers[0], prompt_template, self._class_names),
            build_injection_prompts(tokenizers[1], prompt_template, self._class_names),
        )
        if negative_prompt is not None:
            for tokenizer in tokenizers:
                tokenize_prompts(tokenizer, [negative_prompt], what="negative_prompt")
        self._place(device)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str],
        class_names: Sequence[str],
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: DeviceLike = None,
        scheduler: str = "model",
        local_files_only: bool = True,
        sdpa: bool = True,
        channels_last: bool = False,
        fuse_qkv_projections: bool = False,
        compile: bool = False,
        compile_vae: bool = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
        lora: str | os.PathLike[str] | None = None,
        lora_scale: float = 1.0,
        **kwargs: Any,
    ) -> StableDiffusionXLDecoder:
        """Load a Stable Diffusion XL pipeline from disk (or the Hugging Face cache) and wrap it.

        No invisible watermark is added to the images (``add_watermarker=False``): it would be a pattern shared
        by every generated outlier.

        Args:
            model_id_or_path: A folder with ``tokenizer/``, ``tokenizer_2/``, ``text_encoder/``,
                ``text_encoder_2/``, ``unet/``, ``vae/`` and ``scheduler/`` (e.g. a download of
                ``stabilityai/stable-diffusion-xl-base-1.0`` or ``stabilityai/sdxl-turbo``).
            class_names: Class names, indexed by label.
            torch_dtype: Weights' dtype; ``None`` means float16 on CUDA and float32 elsewhere.
            device: Where to run; ``None``/``"auto"`` picks CUDA when available.
            scheduler: One of :data:`~dreamood.decoding.few_step.SCHEDULERS`; ``"model"`` (the default) keeps the
                folder's scheduler (Euler for SDXL base and SDXL-Turbo).
            local_files_only: Never download (the default).
            sdpa: Use PyTorch's scaled-dot-product attention. This and the next five arguments are
                :meth:`enable_speedups`'s.
            channels_last: Put the UNet and VAE in channels-last memory format.
            fuse_qkv_projections: Fuse the attention layers' query/key/value projections.
            compile: ``torch.compile`` the UNet.
            compile_vae: ``torch.compile`` the VAE decoder.
            compile_mode: ``torch.compile`` mode, one of :data:`~dreamood.config.COMPILE_MODES`.
            compile_backend: ``torch.compile`` backend.
            lora: LoRA weights to load and fuse first (e.g. ``lcm-lora-sdxl`` with ``scheduler="lcm"``).
            lora_scale: Weight of the LoRA update.
            **kwargs: Passed to the constructor.

        Returns:
            The decoder.

        Raises:
            ModelNotFoundError: The weights are not on disk (the message says how to get them).
            ValueError: An argument is invalid.
        """
        from diffusers import StableDiffusionXLPipeline

        pipeline, lora_config = load_pipeline(
            StableDiffusionXLPipeline,
            model_id_or_path,
            SDXL_PARTS,
            torch_dtype=torch_dtype,
            device=device,
            scheduler=scheduler,
            local_files_only=local_files_only,
            lora=lora,
            lora_scale=lora_scale,
            options={"add_watermarker": False},
            failure=lambda source, error: (
                f"could not load the Stable Diffusion XL pipeline from {source}: its weights are missing, truncated "
                f"or corrupt ({error}). An SDXL folder holds {', '.join(SDXL_PARTS)}, each with its config and "
                f"weights; download it again (e.g. `hf download {model_id_or_path} --local-dir <folder>`)"
            ),
        )
        speedups = {
            "sdpa": sdpa,
            "channels_last": channels_last,
            "fuse_qkv_projections": fuse_qkv_projections,
            "compile": compile,
            "compile_vae": compile_vae,
            "compile_mode": compile_mode,
            "compile_backend": compile_backend,
        }
        return cls._wrap(pipeline, lora_config, class_names, speedups, kwargs)

    @property
    def split(self) -> tuple[int, int]:
        """Widths ``(d_1, d_2)`` of the two input token tables (768 and 1280 for SDXL), in the vector's order."""
        first = self.pipeline.text_encoder.get_input_embeddings().embedding_dim
        second = self.pipeline.text_encoder_2.get_input_embeddings().embedding_dim
        return int(first), int(second)

    @property
    def embedding_dim(self) -> int:
        """Width ``m = d_1 + d_2`` of the vectors the decoder accepts (2048 for SDXL)."""
        return sum(self.split)

    @property
    def prompts(self) -> list[str]:
        """Each class's prompt text, indexed by label."""
        return list(self.prompt_tokens[0].prompts)

    @property
    def config(self) -> dict[str, Any]:
        """Every setting that changes the images, JSON-serialisable (used to tell generated folders apart)."""
        return {
            **self._scheduler_settings(),
            "split": list(self.split),
            "prompt_template": self.prompt_template,
            "negative_prompt": self.negative_prompt,
            "force_zeros_for_empty_prompt": self._zero_negative,
            **self._sampling_settings(),
        }

    @property
    def _zero_negative(self) -> bool:
        return self.negative_prompt is None and bool(
            getattr(self.pipeline.config, "force_zeros_for_empty_prompt", False)
        )

    def _encoders(self) -> tuple[Any, Any]:
        return self.pipeline.text_encoder, self.pipeline.text_encoder_2

    def _dimension_error(self, width: int) -> str:
        first, second = self.split
        return (
            f"vectors have dimension {width} but this Stable Diffusion XL model takes "
            f"{self.embedding_dim} = {first} + {second} (the rows of its two token tables, concatenated); "
            "build the anchors with dreamood.decoding.backends.load_anchors or TokenEmbeddings.from_text_encoders"
        )

    def encode(self, vectors: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Conditioning of the class prompts with each vector's two parts injected in the class slots.

        Args:
            vectors: ``(B, m)`` vectors, ``m = embedding_dim``; the first ``split[0]`` columns go into the first
                text encoder, the rest into the second.
            labels: ``(B,)`` integer class labels selecting each vector's prompt.

        Returns:
            ``prompt_embeds`` ``(B, L, d_1' + d_2')`` and ``pooled_prompt_embeds`` ``(B, p)``.

        Raises:
            ValueError: Shapes disagree, ``m`` differs from ``embedding_dim``, or a label is out of range.
            TypeError: ``vectors`` is not floating point or ``labels`` not integer.
            NonFiniteError: ``vectors`` holds NaN or infinity.
        """
        table, targets = self._check_vectors(vectors, labels)
        return self._encode_injected(table, targets)

    def _encode_injected(self, vectors: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        first, second = self.prompt_tokens
        parts = torch.split(vectors, list(self.split), dim=1)
        return encode_sdxl_tokens(
            self._encoders(),
            (first.input_ids[labels], second.input_ids[labels]),
            parts,
            (first.slots[labels], second.slots[labels]),
        )

    def _encode_texts(self, texts: list[str], what: str = "prompt") -> tuple[Tensor, Tensor]:
        ids = [tokenize_prompts(tokenizer, texts, what=what)[0] for tokenizer in self._tokenizers()]
        return encode_sdxl_tokens(self._encoders(), ids)

    def _tokenizers(self) -> tuple[Any, Any]:
        return self.pipeline.tokenizer, self.pipeline.tokenizer_2

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Conditioning of plain text prompts, computed as the diffusers pipeline computes it.

        Args:
            prompts: Prompt texts (the same text goes to both encoders).

        Returns:
            ``prompt_embeds`` and ``pooled_prompt_embeds``.

        Raises:
            ValueError: A prompt is longer than a text encoder's window.
        """
        return self._encode_texts(self._check_prompts(prompts))

    def decode(self, vectors: Tensor, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """Render one image per vector, its parts injected into both encoders' class prompts.

        Args:
            vectors: ``(B, m)`` vectors, ``m = embedding_dim``.
            labels: ``(B,)`` integer labels choosing the prompt of each vector.
            seeds: One non-negative int per image.

        Returns:
            Images ``(B, 3, H, W)`` in ``[0, 1]``, float32, on the pipeline's device.

        Raises:
            ValueError: Shapes disagree, ``m`` differs from ``embedding_dim``, a label is out of range, or the
                number of seeds differs from ``B``.
            TypeError: ``vectors`` is not floating point, ``labels`` not integer, or a seed not an int.
            NonFiniteError: ``vectors`` holds NaN or infinity.
        """
        return self._decode(vectors, labels, seeds)

    def decode_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Render plain text prompts, no injection.

        Args:
            prompts: One prompt text per image.
            seeds: One non-negative int per image.

        Returns:
            Images ``(B, 3, H, W)`` in ``[0, 1]``, float32, on the pipeline's device.

        Raises:
            ValueError: A prompt exceeds a text encoder's window or the number of seeds differs.
            TypeError: A prompt is not a string or a seed not an int.
        """
        return self._decode_prompts(prompts, seeds)

    def _negative(self, embeds: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor]:
        count = int(embeds.shape[0])
        if self._zero_negative:
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        negative, negative_pooled = self._encode_texts([self.negative_prompt or ""], what="negative_prompt")
        return negative.expand(count, -1, -1), negative_pooled.expand(count, -1)

    def _render(self, conditioning: tuple[Tensor, Tensor], seeds: list[int]) -> Tensor:
        """Run the pipeline on ready conditioning, with per-image latents and generators."""
        prompt_embeds, pooled = conditioning
        generators, latents = self._start(seeds, prompt_embeds.dtype)
        negative, negative_pooled = self._negative(prompt_embeds, pooled) if self.guidance_scale > 1 else (None, None)
        return self._finish(
            latents,
            generators,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
        )

    def __repr__(self) -> str:
        return (
            f"StableDiffusionXLDecoder(num_classes={len(self._class_names)}, split={self.split}, "
            f"prompt_template={self.prompt_template!r}, num_inference_steps={self.num_inference_steps}, "
            f"guidance_scale={self.guidance_scale}, size=({self.height}, {self.width}), output_size={self.output_size})"
        )
