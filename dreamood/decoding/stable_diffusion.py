"""Decode sampled token embeddings into images with Stable Diffusion (DREAM-OOD step 4).

Reference: Du, Sun, Zhu, Li, "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023
(Eq. 6): the sampled embedding replaces the class token's input embedding in the prompt and Stable Diffusion
renders the result. dreamood's default prompt ``"A high-quality photo of a <class>"`` is the paper's text; the
authors' code renders ``"A high-quality image of the <word>"`` with their own per-class words and suffixes
(``dreamood.data.reference_words``), which per-class templates and prompt words reproduce.
"""

from __future__ import annotations

import importlib.util
import logging
import operator
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dreamood._utils import DeviceLike, progress, resolve_device
from dreamood._validation import (
    as_tensor,
    check_choice,
    check_class_names,
    check_finite,
    check_floating,
    check_positive,
    check_positive_int,
    check_rank,
    check_size_pair,
)
from dreamood.config import COMPILE_MODES
from dreamood.decoding.few_step import SCHEDULERS as FEW_STEP_SCHEDULERS
from dreamood.decoding.few_step import apply_lora, make_scheduler
from dreamood.decoding.injection import (
    INJECTION_MODES,
    PromptTokens,
    build_injection_prompts,
    build_token_prompts,
    encode_prompt_tokens,
    tokenize_prompts,
)
from dreamood.errors import ModelNotFoundError
from dreamood.pretrained import resolve_pretrained

__all__ = ["COMPILE_MODES", "SCHEDULERS", "StableDiffusionDecoder"]

#: Scheduler names accepted by :meth:`StableDiffusionDecoder.from_pretrained` (see
#: :data:`dreamood.decoding.few_step.SCHEDULERS`). ``"pndm"`` with ``skip_prk_steps`` is PLMS, the paper's sampler.
SCHEDULERS: tuple[str, ...] = FEW_STEP_SCHEDULERS


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_SD_PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# transformers gives a tokenizer without a configured model_max_length the placeholder int(1e30).
_UNSET_MAX_LENGTH = 10**29


def _make_scheduler(name: str, scheduler: Any) -> Any:
    """A scheduler of kind ``name`` from a pipeline's scheduler (:func:`~dreamood.decoding.few_step.make_scheduler`)."""
    return make_scheduler(name, scheduler)


def _dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype argument of diffusers' ``from_pretrained``: ``dtype`` from 0.40 on, ``torch_dtype`` before."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 40) else {"torch_dtype": dtype}


def _resolve_dtype(torch_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if torch_dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(torch_dtype, torch.dtype):
        if not torch_dtype.is_floating_point:
            raise ValueError(f"torch_dtype must be a floating-point dtype, got {torch_dtype}")
        return torch_dtype
    check_choice(torch_dtype, tuple(_DTYPES), "torch_dtype")
    return _DTYPES[torch_dtype]


class StableDiffusionDecoder:
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

    #: The LoRA fused into the pipeline by :meth:`from_pretrained` (its tensors' hash and scale), or ``None``.
    lora: dict[str, Any] | None = None

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
        for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
            if getattr(pipeline, part, None) is None:
                raise ValueError(f"pipeline has no {part}; a Stable Diffusion pipeline is needed")
        check_positive_int(num_inference_steps, "num_inference_steps")
        check_positive(float(guidance_scale), "guidance_scale", allow_zero=True)
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        for side, name in ((height, "height"), (width, "width")):
            check_positive_int(side, name)
            if side % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {side}")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        check_choice(resize_mode, ("bilinear", "bicubic"), "resize_mode")
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

        self.pipeline: Any = pipeline
        self._class_names = check_class_names(class_names)
        self.prompt_template: str | list[str] = (
            prompt_template if isinstance(prompt_template, str) else list(prompt_template)
        )
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.height = height
        self.width = width
        self.output_size = None if output_size is None else check_size_pair(output_size, "output_size")
        self.batch_size = batch_size
        self.resize_mode = resize_mode
        self.progress = progress
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
        pipeline.set_progress_bar_config(disable=not progress)
        if device is not None:
            pipeline.to(resolve_device(device))

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
        from safetensors import SafetensorError

        check_choice(scheduler, SCHEDULERS, "scheduler")
        target = resolve_device(device)
        dtype = _resolve_dtype(torch_dtype, target)
        source = resolve_pretrained(model_id_or_path, _SD_PARTS, local_files_only=local_files_only)
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                source,
                **_dtype_keyword(dtype),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=local_files_only,
                # What diffusers falls back to without accelerate anyway, minus its warning on every load.
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as error:
            detail = " ".join(str(error).split())[:300] or type(error).__name__
            raise ModelNotFoundError(
                f"could not load the Stable Diffusion pipeline from {source!r}: its weights are missing, truncated or "
                f"corrupt ({type(error).__name__}: {detail}). A Stable Diffusion v1.x folder holds tokenizer/, "
                "text_encoder/, unet/, vae/ and scheduler/, each with its config and weights; download it again "
                f"(e.g. `hf download {model_id_or_path} --local-dir <folder>`)"
            ) from error
        pipeline.scheduler = _make_scheduler(scheduler, pipeline.scheduler)
        lora_config = None
        if lora is not None:
            lora_config = apply_lora(pipeline, lora, scale=lora_scale, local_files_only=local_files_only)
        pipeline.to(target)
        decoder = cls(pipeline, class_names, **kwargs)
        decoder.lora = lora_config
        return decoder.enable_speedups(
            sdpa=sdpa,
            channels_last=channels_last,
            fuse_qkv_projections=fuse_qkv_projections,
            compile=compile,
            compile_vae=compile_vae,
            compile_mode=compile_mode,
            compile_backend=compile_backend,
        )

    def enable_speedups(
        self,
        *,
        sdpa: bool = True,
        channels_last: bool = False,
        fuse_qkv_projections: bool = False,
        compile: bool = False,
        compile_vae: bool = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
    ) -> StableDiffusionDecoder:
        """Switch on inference speed-ups of the pipeline in place (they change images only within numerics).

        The fastest configuration on a recent GPU is usually every switch on, in half precision::

            decoder.enable_speedups(channels_last=True, fuse_qkv_projections=True, compile=True, compile_vae=True)

        Compiled modules compile at their first call (minutes for Stable Diffusion at 512x512) and again for
        every new batch size; keep the batch size fixed.

        Args:
            sdpa: Set PyTorch's scaled-dot-product attention processor on the UNet and VAE.
            channels_last: Put the UNet and VAE in channels-last memory format.
            fuse_qkv_projections: Fuse the query/key/value projections of the UNet's and the VAE's attention
                layers into one matrix product each (the key/value ones for cross-attention).
            compile: Compile the UNet with ``torch.compile``.
            compile_vae: Compile the VAE decoder with ``torch.compile``.
            compile_mode: ``torch.compile`` mode, one of :data:`COMPILE_MODES` (``"reduce-overhead"`` replays
                CUDA graphs); used by the inductor backend only.
            compile_backend: ``torch.compile`` backend (``"inductor"``, or e.g. ``"eager"`` to check graph
                capture without generating code).

        Returns:
            ``self``.

        Raises:
            ValueError: ``compile_mode`` is unknown, or the pipeline's VAE cannot fuse its projections.
        """
        check_choice(compile_mode, COMPILE_MODES, "compile_mode")
        if not isinstance(compile_backend, str) or not compile_backend:
            raise ValueError(f"compile_backend must be a backend name such as 'inductor', got {compile_backend!r}")
        pipeline = self.pipeline
        if sdpa:
            from diffusers.models.attention_processor import AttnProcessor2_0

            pipeline.unet.set_attn_processor(AttnProcessor2_0())  # type: ignore[no-untyped-call]
            pipeline.vae.set_attn_processor(AttnProcessor2_0())  # type: ignore[no-untyped-call]
        if channels_last:
            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
        if fuse_qkv_projections:
            # Fuses the weights and sets diffusers' fused SDPA attention processor.
            pipeline.fuse_qkv_projections()
        options: dict[str, Any] = {"backend": compile_backend}
        if compile_backend == "inductor":
            options["mode"] = compile_mode
        if compile:
            pipeline.unet.compile(**options)
        if compile_vae:
            pipeline.vae.decoder.compile(**options)
        return self

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
    def class_names(self) -> list[str]:
        """Names of the classes, indexed by label."""
        return list(self._class_names)

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
        scheduler = self.pipeline.scheduler
        settings: dict[str, Any] = {
            "decoder": type(self).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
            "dtype": str(self.pipeline.unet.dtype),
            "prompt_template": self.prompt_template,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "output_size": None if self.output_size is None else list(self.output_size),
            "resize_mode": self.resize_mode,
            **({} if self.lora is None else {"lora": self.lora}),
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

    def _check_vectors(self, vectors: Tensor | Any, labels: Tensor | Any) -> tuple[Tensor, Tensor]:
        table = as_tensor(vectors, "vectors")
        check_rank(table, 2, "vectors", "(batch, embedding_dim)")
        check_floating(table, "vectors")
        check_finite(table, "vectors")
        if table.shape[1] != self.embedding_dim:
            raise ValueError(
                f"vectors have dimension {table.shape[1]} but the text encoder's token embeddings have "
                f"dimension {self.embedding_dim}"
            )
        targets = as_tensor(labels, "labels")
        check_rank(targets, 1, "labels", "(batch,)")
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype, got {targets.dtype}")
        if targets.shape[0] != table.shape[0]:
            raise ValueError(f"labels has {targets.shape[0]} entries but vectors has {table.shape[0]} rows")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(self._class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self._class_names) - 1}], got values from {int(targets.min())} "
                f"to {int(targets.max())}"
            )
        return table, targets.long().cpu()

    def _check_seeds(self, seeds: Sequence[int], count: int) -> list[int]:
        if isinstance(seeds, (int, str)):
            raise TypeError(f"seeds must be a sequence of ints (one per image), got {type(seeds).__name__}")
        values = []
        for index, seed in enumerate(seeds):
            try:
                value = operator.index(seed)
            except TypeError as error:
                raise TypeError(f"seeds[{index}] must be an int, got {type(seed).__name__} {seed!r}") from error
            if value < 0 or value >= 2**63:
                raise ValueError(f"seeds[{index}] must lie in [0, 2**63), got {value}")
            values.append(value)
        if len(values) != count:
            raise ValueError(f"seeds has {len(values)} entries but {count} images are decoded; give one seed per image")
        return values

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
        texts = self._check_prompts(prompts)
        ids, mask = tokenize_prompts(self.pipeline.tokenizer, texts)
        return encode_prompt_tokens(self.pipeline.text_encoder, ids, mask)

    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a sequence of strings, not a single string {prompts!r}")
        texts = list(prompts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompts[{index}] must be a string, got {type(text).__name__}")
        return texts

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
        table, targets = self._check_vectors(vectors, labels)
        seed_list = self._check_seeds(seeds, int(table.shape[0]))
        chunks = [
            self._render(self._encode_injected(table[part], targets[part]), seed_list[part])
            for part in self._slices(len(seed_list))
        ]
        return self._join(chunks)

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
        texts = self._check_prompts(prompts)
        seed_list = self._check_seeds(seeds, len(texts))
        chunks = [self._render(self.encode_prompts(texts[part]), seed_list[part]) for part in self._slices(len(texts))]
        return self._join(chunks)

    def _slices(self, count: int) -> Iterator[slice]:
        step = self.batch_size or max(count, 1)
        parts = [slice(start, start + step) for start in range(0, count, step)]
        return progress(parts, enabled=self.progress and len(parts) > 1, desc="decoding", total=len(parts))

    def _join(self, chunks: list[Tensor]) -> Tensor:
        if chunks:
            return torch.cat(chunks)
        height, width = self.output_size or (self.height, self.width)
        return torch.empty((0, 3, height, width), device=self.pipeline.device)

    def _negative_embeds(self, count: int) -> Tensor:
        ids, mask = tokenize_prompts(self.pipeline.tokenizer, [self.negative_prompt], what="negative_prompt")
        row = encode_prompt_tokens(self.pipeline.text_encoder, ids, mask)
        return row.expand(count, -1, -1)

    def _render(self, prompt_embeds: Tensor, seeds: list[int]) -> Tensor:
        """Run the pipeline on ready conditioning, with per-image latents and generators."""
        from diffusers.utils.torch_utils import randn_tensor

        pipeline = self.pipeline
        count = len(seeds)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        scale = int(pipeline.vae_scale_factor)
        shape = (count, int(pipeline.unet.config.in_channels), self.height // scale, self.width // scale)
        # Same draw as the pipeline's own prepare_latents with these generators.
        latents = randn_tensor(shape, generator=generators, device=pipeline.device, dtype=prompt_embeds.dtype)
        if self.fixed_latent_seed is not None:
            fixed = torch.Generator(device="cpu").manual_seed(self.fixed_latent_seed)
            one = randn_tensor((1, *shape[1:]), generator=fixed, device=pipeline.device, dtype=prompt_embeds.dtype)
            latents = one.expand(shape).clone()
        if self.conditioning_noise:
            # Drawn after the latent from each image's own generator: seeded, and independent of the batch.
            noise = torch.stack([torch.randn(prompt_embeds.shape[1:], generator=g) for g in generators])
            prompt_embeds = prompt_embeds + self.conditioning_noise * noise.to(prompt_embeds)
        negative = self._negative_embeds(count) if self.guidance_scale > 1 else None
        images: Tensor = pipeline(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            latents=latents,
            generator=generators,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            output_type="pt",
            return_dict=False,
        )[0]
        images = images.float()
        if self.output_size is not None and tuple(images.shape[-2:]) != self.output_size:
            images = F.interpolate(images, size=self.output_size, mode=self.resize_mode, antialias=True)
        return images.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"StableDiffusionDecoder(num_classes={len(self._class_names)}, prompt_template={self.prompt_template!r}, "
            f"num_inference_steps={self.num_inference_steps}, guidance_scale={self.guidance_scale}, "
            f"size=({self.height}, {self.width}), output_size={self.output_size})"
        )
