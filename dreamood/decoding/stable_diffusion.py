"""Decode sampled token embeddings into images with Stable Diffusion (DREAM-OOD step 4).

Reference: Du, Sun, Zhu, Li, "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023
(Eq. 6): the sampled embedding replaces the class token's input embedding in the prompt and Stable Diffusion
renders the result. dreamood's default prompt ``"A high-quality photo of a <class>"`` is the paper's text; the
authors' code renders ``"A high-quality image of the <word>"`` with their own per-class words and suffixes
(``dreamood.data.reference_words``), which per-class templates and prompt words reproduce.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import DeviceLike
from dreamood._validation import check_choice, check_positive
from dreamood.config import COMPILE_MODES
from dreamood.decoding._diffusers import DiffusersDecoder, check_pipeline_parts, check_sampling, load_pipeline
from dreamood.decoding.few_step import SCHEDULERS as FEW_STEP_SCHEDULERS
from dreamood.decoding.injection import (
    INJECTION_MODES,
    PromptTokens,
    build_injection_prompts,
    build_token_prompts,
    encode_prompt_tokens,
    tokenize_prompts,
)

__all__ = ["COMPILE_MODES", "SCHEDULERS", "StableDiffusionDecoder"]

#: Scheduler names accepted by :meth:`StableDiffusionDecoder.from_pretrained` (see
#: :data:`dreamood.decoding.few_step.SCHEDULERS`). ``"pndm"`` with ``skip_prk_steps`` is PLMS, the paper's sampler.
SCHEDULERS: tuple[str, ...] = FEW_STEP_SCHEDULERS


_SD_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# transformers gives a tokenizer without a configured model_max_length the placeholder int(1e30).
_UNSET_MAX_LENGTH = 10**29


class StableDiffusionDecoder(DiffusersDecoder):
    """Render sampled token embeddings as images with a diffusers Stable Diffusion pipeline.

    Implements DREAM-OOD's decoding step (Du et al., "Dream the Impossible: Outlier Imagination with Diffusion
    Models", NeurIPS 2023, Eq. 6). For a label ``y`` the prompt is ``prompt_template`` with class name ``y``
    written in; the name's token span is replaced by one slot whose *input* token embedding is the given vector
    (see :mod:`dreamood.decoding.injection`). The unconditional branch of classifier-free guidance uses
    ``negative_prompt``. Decoding the class's own token embedding ``T(y)`` (single-token names) reproduces the
    plain pipeline's image for the prompt text and the same seed exactly.

    Each image's initial latents are drawn from its own CPU ``torch.Generator`` seeded with its seed (the same
    draw as ``pipeline(prompt, generator=torch.Generator().manual_seed(seed))``), and the same generators feed
    any stochastic scheduler step, so an image does not depend on the batch it is decoded in (up to the
    device's floating-point behaviour for different batch sizes). All images of a batch go through one UNet
    call per denoising step (conditional and unconditional halves concatenated) and one VAE decode.

    The pipeline is used as given: a pipeline that still carries a safety checker blacks out the images it
    flags (:meth:`from_pretrained` loads without one).

    Args:
        pipeline: A diffusers ``StableDiffusionPipeline`` (or one with the same components and call signature).
        class_names: Class names, indexed by label; each must appear as its own tokens in the prompt (unless
            ``prompt_words`` are given).
        prompt_template: Prompt with exactly one ``{}`` for the class name (the paper's text by default), or one
            such template per class (e.g. ``reference_words("imagenet100").prompt_templates``).
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance weight; ``<= 1`` disables guidance.
        negative_prompt: Text of the unconditional branch (the empty prompt by default, as in the paper).
        height: Generated image height in pixels (a multiple of 8).
        width: Generated image width in pixels (a multiple of 8).
        output_size: Size ``int`` or ``(height, width)`` the images are resized to (antialiased), e.g. 32 for
            CIFAR; ``None`` keeps ``(height, width)``.
        batch_size: Largest number of images rendered together; ``None`` renders each call in one batch.
        resize_mode: ``"bilinear"`` or ``"bicubic"`` interpolation for ``output_size``.
        device: Move the pipeline to this device first; ``None`` leaves it where it is.
        progress: Show progress bars: one over batches, and the pipeline's own denoising bar (set through
            ``pipeline.set_progress_bar_config``).
        prompt_words: Per class, the word written into the template instead of the class name (e.g. the
            authors' prompt words); ``None`` uses the class names.
        injection: ``"span"`` (default): the prompt word's token span collapses into one slot that takes the
            vector; ``"token"``: every occurrence of the class's injection token takes the vector and the other
            sub-tokens stay, bit for bit what overwriting that row of the embedding table gives (the authors'
            code). See :mod:`dreamood.decoding.injection`.
        injection_words: ``"token"`` mode only: per class, the word whose *first* token is replaced (e.g.
            ``reference_words("cifar100").injection_words``); ``None`` takes the prompt word's first token.
        conditioning_noise: Standard deviation of Gaussian noise added to the conditional prompt embeddings
            (the authors' ``--gaussian_scale``; 0 adds none). The noise of an image is drawn from its own
            generator right after its starting latent, so it is seeded by the image's seed.
        fixed_latent_seed: When set, every image starts from the same latent, drawn from a generator seeded with
            this value (the authors' ``--fixed_code``, which reuses one batch of starting latents); the
            per-image seeds still drive the conditioning noise and any stochastic scheduler step.

    Attributes:
        pipeline: The diffusers pipeline.
        prompt_tokens: The per-class prompt ids with their injection slots.

    Raises:
        ValueError: A setting is out of range, the template does not hold exactly one ``{}``, a class name
            does not appear as its own tokens in its prompt, a class's injection token does not occur in its
            prompt (``"token"`` mode), or a prompt exceeds the text encoder's window.
    """

    def __init__(
        self,
        pipeline: Any,
        class_names: Sequence[str],
        prompt_template: str | Sequence[str] = "A high-quality photo of a {}",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        height: int = 512,
        width: int = 512,
        output_size: int | tuple[int, int] | None = None,
        *,
        batch_size: int | None = None,
        resize_mode: str = "bilinear",
        device: DeviceLike = None,
        progress: bool = True,
        prompt_words: Sequence[str] | None = None,
        injection: str = "span",
        injection_words: Sequence[str] | None = None,
        conditioning_noise: float = 0.0,
        fixed_latent_seed: int | None = None,
    ) -> None:
        check_pipeline_parts(pipeline, _SD_PARTS, "a Stable Diffusion pipeline")
        check_sampling(
            num_inference_steps,
            guidance_scale,
            negative_prompt,
            height,
            width,
            batch_size,
            resize_mode,
            negative_optional=False,
        )
        check_choice(injection, INJECTION_MODES, "injection")
        check_positive(float(conditioning_noise), "conditioning_noise", allow_zero=True)
        if fixed_latent_seed is not None:
            self._check_seeds([fixed_latent_seed], 1)
        if injection_words is not None and injection != "token":
            raise ValueError("injection_words are used by the 'token' injection mode only; pass injection='token'")

        window = int(pipeline.tokenizer.model_max_length)
        positions = int(getattr(pipeline.text_encoder.config, "max_position_embeddings", window))
        if window >= _UNSET_MAX_LENGTH and positions < _UNSET_MAX_LENGTH:
            # transformers' placeholder when the tokenizer folder has no tokenizer_config.json: use the encoder's.
            logging.getLogger(__name__).warning(
                "the tokenizer sets no model_max_length (its folder has no tokenizer_config.json); using the text "
                "encoder's %d positions",
                positions,
            )
            pipeline.tokenizer.model_max_length = window = positions
        if window > positions:
            raise ValueError(
                f"tokenizer.model_max_length ({window}) exceeds the text encoder's {positions} positions; the "
                "tokenizer folder's tokenizer_config.json should set model_max_length to the encoder's "
                f"max_position_embeddings ({positions} for Stable Diffusion v1.x)"
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
        self.prompt_template: str | list[str] = (
            prompt_template if isinstance(prompt_template, str) else list(prompt_template)
        )
        self.negative_prompt = negative_prompt
        self.injection = injection
        self.conditioning_noise = float(conditioning_noise)
        self.fixed_latent_seed = fixed_latent_seed
        self.prompt_words = self._per_class(prompt_words, "prompt_words")
        self.injection_words = self._per_class(injection_words, "injection_words")
        words = self.prompt_words or self._class_names
        if injection == "token":
            token_words = self.injection_words or words
            token_ids = []
            for label, word in enumerate(token_words):
                ids = pipeline.tokenizer(word, add_special_tokens=False).input_ids
                if not ids:
                    raise ValueError(f"the injection word of class {label} ({word!r}) tokenises to no tokens")
                token_ids.append(int(ids[0]))
            self.prompt_tokens: PromptTokens = build_token_prompts(
                pipeline.tokenizer, prompt_template, words, token_ids, class_names=self._class_names
            )
        else:
            self.prompt_tokens = build_injection_prompts(pipeline.tokenizer, prompt_template, words)
        # Fail now, not at the first decode, when the unconditional prompt does not fit.
        tokenize_prompts(pipeline.tokenizer, [negative_prompt], what="negative_prompt")
        self._place(device)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike[str],
        class_names: Sequence[str],
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: DeviceLike = None,
        scheduler: str = "pndm",
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
    ) -> StableDiffusionDecoder:
        """Load a Stable Diffusion v1.x pipeline from disk (or the Hugging Face cache) and wrap it.

        The safety checker is **disabled** (loaded as ``None``): it would replace flagged images by black ones,
        which silently corrupts a set of generated training outliers.

        Args:
            model_id_or_path: A folder with ``tokenizer/``, ``text_encoder/``, ``unet/``, ``vae/`` and
                ``scheduler/``, or a model id such as ``"CompVis/stable-diffusion-v1-4"``.
            class_names: Class names, indexed by label.
            torch_dtype: Weights' dtype (``torch.float16``, ``"bf16"``, ...); ``None`` means float16 on CUDA and
                float32 elsewhere.
            device: Where to run; ``None``/``"auto"`` picks CUDA when available.
            scheduler: ``"pndm"`` (PLMS, the paper's sampler), ``"ddim"``, ``"dpm++"`` (DPM-Solver++ multistep),
                or a few-step choice of :data:`SCHEDULERS` (``"lcm"``, ``"model"`` for Turbo models, ...).
            local_files_only: Never download (the default); ``False`` lets diffusers fetch a model id.
            sdpa: Use PyTorch's scaled-dot-product attention kernels. This and the next five arguments are
                :meth:`enable_speedups`'s.
            channels_last: Put the UNet and VAE in channels-last memory format.
            fuse_qkv_projections: Fuse the attention layers' query/key/value projections.
            compile: ``torch.compile`` the UNet (slow first call, faster afterwards).
            compile_vae: ``torch.compile`` the VAE decoder.
            compile_mode: ``torch.compile`` mode, one of :data:`COMPILE_MODES`.
            compile_backend: ``torch.compile`` backend.
            lora: LoRA weights to load and fuse before the speed-ups (e.g. an LCM-LoRA folder, used with
                ``scheduler="lcm"``); see :func:`~dreamood.decoding.few_step.apply_lora`.
            lora_scale: Weight of the LoRA update.
            **kwargs: Passed to the constructor (``prompt_template``, ``num_inference_steps``, ``output_size``,
                ``batch_size``, ...).

        Returns:
            The decoder.

        Raises:
            ModelNotFoundError: The weights are not on disk (the message says how to get them).
            ValueError: An argument is invalid (see the constructor).
        """
        from diffusers import StableDiffusionPipeline

        pipeline, lora_config = load_pipeline(
            StableDiffusionPipeline,
            model_id_or_path,
            _SD_PARTS,
            torch_dtype=torch_dtype,
            device=device,
            scheduler=scheduler,
            local_files_only=local_files_only,
            lora=lora,
            lora_scale=lora_scale,
            options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
            failure=lambda source, error: (
                f"could not load the Stable Diffusion pipeline from {source}: its weights are missing, truncated or "
                f"corrupt ({error}). A Stable Diffusion v1.x folder holds tokenizer/, text_encoder/, unet/, vae/ "
                f"and scheduler/, each with its config and weights; download it again (e.g. `hf download "
                f"{model_id_or_path} --local-dir <folder>`)"
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

    def _per_class(self, words: Sequence[str] | None, name: str) -> list[str] | None:
        if words is None:
            return None
        if isinstance(words, str):
            raise TypeError(f"{name} must be a sequence of strings (one per class), not the string {words!r}")
        values = [str(word) for word in words]
        if len(values) != len(self._class_names):
            raise ValueError(f"{name} has {len(values)} entries but there are {len(self._class_names)} classes")
        return values

    @property
    def embedding_dim(self) -> int:
        """Width ``m`` of the text encoder's input token embeddings (768 for Stable Diffusion v1.x)."""
        return int(self.pipeline.text_encoder.get_input_embeddings().embedding_dim)

    @property
    def config(self) -> dict[str, Any]:
        """Every setting that changes the images, JSON-serialisable (used to tell generated folders apart).

        It includes the scheduler's class and configuration, the weights' dtype, and the prompt and sampling
        settings. The model's folder is left out on purpose: the same weights moved elsewhere give the same
        images.
        """
        settings: dict[str, Any] = {
            **self._scheduler_settings(),
            "prompt_template": self.prompt_template,
            "negative_prompt": self.negative_prompt,
            **self._sampling_settings(),
        }
        # Keys of the options below appear only when they are used, so that earlier folders keep their identity.
        if self.prompt_words is not None:
            settings["prompt_words"] = self.prompt_words
        if self.injection != "span":
            settings["injection"] = self.injection
            settings["injection_words"] = self.injection_words
        if self.conditioning_noise:
            settings["conditioning_noise"] = self.conditioning_noise
        if self.fixed_latent_seed is not None:
            settings["fixed_latent_seed"] = self.fixed_latent_seed
        return settings

    @property
    def prompts(self) -> list[str]:
        """Each class's prompt text (the template with the class name written in), indexed by label."""
        return list(self.prompt_tokens.prompts)

    def _dimension_error(self, width: int) -> str:
        return (
            f"vectors have dimension {width} but the text encoder's token embeddings have dimension "
            f"{self.embedding_dim}"
        )

    def encode(self, vectors: Tensor, labels: Tensor) -> Tensor:
        """Text-encoder conditioning of the class prompts with ``vectors`` injected in the class slots.

        Args:
            vectors: ``(B, m)`` token embeddings, ``m = embedding_dim``.
            labels: ``(B,)`` integer class labels selecting each vector's prompt.

        Returns:
            ``prompt_embeds`` of shape ``(B, L, d)`` on the text encoder's device.

        Raises:
            ValueError: Shapes disagree, ``m`` differs from the token-embedding width, or a label is out of range.
            TypeError: ``vectors`` is not floating point or ``labels`` not integer.
            NonFiniteError: ``vectors`` holds NaN or infinity.
        """
        table, targets = self._check_vectors(vectors, labels)
        return self._encode_injected(table, targets)

    def _encode_injected(self, vectors: Tensor, labels: Tensor) -> Tensor:
        tokens = self.prompt_tokens
        return encode_prompt_tokens(
            self.pipeline.text_encoder,
            tokens.input_ids[labels],
            tokens.attention_mask[labels],
            vectors,
            tokens.slots[labels],
            None if tokens.slot_mask is None else tokens.slot_mask[labels],
        )

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder conditioning of plain text prompts, computed as the diffusers pipeline computes it.

        Args:
            prompts: Prompt texts.

        Returns:
            ``prompt_embeds`` of shape ``(len(prompts), L, d)``.

        Raises:
            ValueError: A prompt is longer than the text encoder's window.
        """
        return self._encode_texts(self._check_prompts(prompts))

    def _encode_texts(self, texts: list[str]) -> Tensor:
        ids, mask = tokenize_prompts(self.pipeline.tokenizer, texts)
        return encode_prompt_tokens(self.pipeline.text_encoder, ids, mask)

    def decode(self, vectors: Tensor, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """Render one image per vector, injected into its class's prompt (paper Eq. 6).

        Args:
            vectors: ``(B, m)`` token embeddings (e.g. sampled outlier embeddings rescaled to ``||T(y)||``).
            labels: ``(B,)`` integer labels choosing the prompt of each vector.
            seeds: One non-negative int per image; the same ``(vector, label, seed)`` gives the same image.

        Returns:
            Images ``(B, 3, H, W)`` in ``[0, 1]``, float32, on the pipeline's device; ``(H, W)`` is
            ``output_size`` when set, else ``(height, width)``.

        Raises:
            ValueError: Shapes disagree, ``m`` differs from the token-embedding width, a label is out of range,
                or the number of seeds differs from ``B``.
            TypeError: ``vectors`` is not floating point, ``labels`` not integer, or a seed not an int.
            NonFiniteError: ``vectors`` holds NaN or infinity.
        """
        return self._decode(vectors, labels, seeds)

    def decode_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Render plain text prompts, no injection (e.g. ``decoder.prompts`` per label, or generic prompts).

        Args:
            prompts: One prompt text per image.
            seeds: One non-negative int per image.

        Returns:
            Images ``(B, 3, H, W)`` in ``[0, 1]``, float32, on the pipeline's device.

        Raises:
            ValueError: A prompt exceeds the text encoder's window or the number of seeds differs.
            TypeError: A prompt is not a string or a seed not an int.
        """
        return self._decode_prompts(prompts, seeds)

    def _negative_embeds(self, count: int) -> Tensor:
        ids, mask = tokenize_prompts(self.pipeline.tokenizer, [self.negative_prompt], what="negative_prompt")
        row = encode_prompt_tokens(self.pipeline.text_encoder, ids, mask)
        return row.expand(count, -1, -1)

    def _render(self, conditioning: Tensor, seeds: list[int]) -> Tensor:
        """Run the pipeline on ready conditioning, with per-image latents and generators."""
        from diffusers.utils.torch_utils import randn_tensor

        prompt_embeds = conditioning
        generators, latents = self._start(seeds, prompt_embeds.dtype)
        if self.fixed_latent_seed is not None:
            fixed = torch.Generator(device="cpu").manual_seed(self.fixed_latent_seed)
            shape = latents.shape
            one = randn_tensor((1, *shape[1:]), generator=fixed, device=self.pipeline.device, dtype=prompt_embeds.dtype)
            latents = one.expand(shape).clone()
        if self.conditioning_noise:
            # Drawn after the latent from each image's own generator: seeded, and independent of the batch.
            noise = torch.stack([torch.randn(prompt_embeds.shape[1:], generator=g) for g in generators])
            prompt_embeds = prompt_embeds + self.conditioning_noise * noise.to(prompt_embeds)
        negative = self._negative_embeds(len(seeds)) if self.guidance_scale > 1 else None
        return self._finish(latents, generators, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative)

    def __repr__(self) -> str:
        return (
            f"StableDiffusionDecoder(num_classes={len(self._class_names)}, prompt_template={self.prompt_template!r}, "
            f"num_inference_steps={self.num_inference_steps}, guidance_scale={self.guidance_scale}, "
            f"size=({self.height}, {self.width}), output_size={self.output_size})"
        )
