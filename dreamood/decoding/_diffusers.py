"""What the Stable Diffusion and Stable Diffusion XL decoders share: loading, checks, batching, seeding, rendering.

The two decoders differ only in their text conditioning (one text encoder, or two with a pooled embedding) and in
the options built on it; everything around the diffusers pipeline call lives here.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

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
from dreamood.decoding.few_step import SCHEDULERS, apply_lora, make_scheduler
from dreamood.errors import ModelNotFoundError
from dreamood.pretrained import resolve_pretrained

if TYPE_CHECKING:
    from typing_extensions import Self

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


def check_pipeline_parts(pipeline: Any, parts: Sequence[str], needed: str) -> None:
    """Raise ``ValueError`` naming the first of ``parts`` the pipeline lacks and the ``needed`` kind of pipeline."""
    for part in parts:
        if getattr(pipeline, part, None) is None:
            raise ValueError(f"pipeline has no {part}; {needed} is needed")


def check_sampling(
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str | None,
    height: int,
    width: int,
    batch_size: int | None,
    resize_mode: str,
    *,
    negative_optional: bool,
) -> None:
    """Check the sampling settings both decoders take; ``negative_optional`` lets ``negative_prompt`` be ``None``."""
    check_positive_int(num_inference_steps, "num_inference_steps")
    check_positive(float(guidance_scale), "guidance_scale", allow_zero=True)
    if negative_optional:
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    elif not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
    for side, name in ((height, "height"), (width, "width")):
        check_positive_int(side, name)
        if side % 8:
            raise ValueError(f"{name} must be a multiple of 8, got {side}")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    check_choice(resize_mode, ("bilinear", "bicubic"), "resize_mode")


def load_pipeline(
    pipeline_class: Any,
    model_id_or_path: str | os.PathLike[str],
    parts: Sequence[str],
    *,
    torch_dtype: torch.dtype | str | None,
    device: DeviceLike,
    scheduler: str,
    local_files_only: bool,
    lora: str | os.PathLike[str] | None,
    lora_scale: float,
    options: dict[str, Any],
    failure: Callable[[str, str], str],
) -> tuple[Any, dict[str, Any] | None]:
    """Load a diffusers pipeline, set its scheduler, fuse a LoRA and move it to its device.

    ``options`` go to the pipeline's ``from_pretrained``; ``failure(source, error)`` words the
    ``ModelNotFoundError`` raised when the weights cannot be read. Returns the pipeline and the LoRA's record.
    """
    from safetensors import SafetensorError

    check_choice(scheduler, SCHEDULERS, "scheduler")
    target = resolve_device(device)
    dtype = _resolve_dtype(torch_dtype, target)
    source = resolve_pretrained(model_id_or_path, parts, local_files_only=local_files_only)
    try:
        pipeline = pipeline_class.from_pretrained(
            source,
            **_dtype_keyword(dtype),
            **options,
            local_files_only=local_files_only,
            # What diffusers falls back to without accelerate anyway, minus its warning on every load.
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as error:
        detail = " ".join(str(error).split())[:300] or type(error).__name__
        raise ModelNotFoundError(failure(repr(source), f"{type(error).__name__}: {detail}")) from error
    pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler)
    lora_config = None
    if lora is not None:
        lora_config = apply_lora(pipeline, lora, scale=lora_scale, local_files_only=local_files_only)
    pipeline.to(target)
    return pipeline, lora_config


class DiffusersDecoder:
    """Base of the decoders that drive a diffusers text-to-image pipeline on ready text conditioning.

    A subclass sets the sampling settings with :meth:`_set_sampling`, encodes its conditioning and renders it
    with :meth:`_start` and :meth:`_finish`; batching, seeds, labels, speed-ups and the shared part of
    ``config`` live here.
    """

    #: The LoRA fused into the pipeline by :meth:`from_pretrained` (its tensors' hash and scale), or ``None``.
    lora: dict[str, Any] | None = None

    pipeline: Any
    _class_names: list[str]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    output_size: tuple[int, int] | None
    batch_size: int | None
    resize_mode: str
    progress: bool

    @property
    def embedding_dim(self) -> int:
        """Width of the vectors the decoder accepts."""
        raise NotImplementedError

    def _set_sampling(
        self,
        pipeline: Any,
        class_names: Sequence[str],
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        output_size: int | tuple[int, int] | None,
        batch_size: int | None,
        resize_mode: str,
        progress: bool,
    ) -> None:
        self.pipeline = pipeline
        self._class_names = check_class_names(class_names)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.height = height
        self.width = width
        self.output_size = None if output_size is None else check_size_pair(output_size, "output_size")
        self.batch_size = batch_size
        self.resize_mode = resize_mode
        self.progress = progress

    def _place(self, device: DeviceLike) -> None:
        """Set the pipeline's progress bar and move it to ``device`` (``None`` leaves it where it is)."""
        self.pipeline.set_progress_bar_config(disable=not self.progress)
        if device is not None:
            self.pipeline.to(resolve_device(device))

    @classmethod
    def _wrap(
        cls,
        pipeline: Any,
        lora_config: dict[str, Any] | None,
        class_names: Sequence[str],
        speedups: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> Self:
        decoder = cls(pipeline, class_names, **kwargs)  # type: ignore[call-arg]
        decoder.lora = lora_config
        return decoder.enable_speedups(**speedups)

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
    ) -> Self:
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
            compile_mode: ``torch.compile`` mode, one of :data:`~dreamood.config.COMPILE_MODES`
                (``"reduce-overhead"`` replays CUDA graphs); used by the inductor backend only.
            compile_backend: ``torch.compile`` backend (``"inductor"``, or e.g. ``"eager"`` to check graph
                capture without generating code).

        Returns:
            ``self``.

        Raises:
            ValueError: ``compile_mode`` is unknown, ``compile_backend`` is not a backend name, or the pipeline's
                VAE cannot fuse its projections.
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

    @property
    def class_names(self) -> list[str]:
        """Names of the classes, indexed by label."""
        return list(self._class_names)

    def _scheduler_settings(self) -> dict[str, Any]:
        """The ``config`` entries that name the decoder, its scheduler and the weights' dtype."""
        scheduler = self.pipeline.scheduler
        return {
            "decoder": type(self).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
            "dtype": str(self.pipeline.unet.dtype),
        }

    def _sampling_settings(self) -> dict[str, Any]:
        """The ``config`` entries of the sampling settings and the LoRA."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "output_size": None if self.output_size is None else list(self.output_size),
            "resize_mode": self.resize_mode,
            **({} if self.lora is None else {"lora": self.lora}),
        }

    def _dimension_error(self, width: int) -> str:
        """The message of the error raised for vectors of the wrong ``width``."""
        raise NotImplementedError

    def _check_vectors(self, vectors: Tensor | Any, labels: Tensor | Any) -> tuple[Tensor, Tensor]:
        table = as_tensor(vectors, "vectors")
        check_rank(table, 2, "vectors", "(batch, embedding_dim)")
        check_floating(table, "vectors")
        check_finite(table, "vectors")
        if table.shape[1] != self.embedding_dim:
            raise ValueError(self._dimension_error(int(table.shape[1])))
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

    @staticmethod
    def _check_seeds(seeds: Sequence[int], count: int) -> list[int]:
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

    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a sequence of strings, not a single string {prompts!r}")
        texts = list(prompts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompts[{index}] must be a string, got {type(text).__name__}")
        return texts

    def _encode_injected(self, vectors: Tensor, labels: Tensor) -> Any:
        """The conditioning of the class prompts with ``vectors`` injected (checked arguments)."""
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]) -> Any:
        """The conditioning of plain prompt texts (checked arguments)."""
        raise NotImplementedError

    def _render(self, conditioning: Any, seeds: list[int]) -> Tensor:
        """Images of one batch from its conditioning and per-image seeds."""
        raise NotImplementedError

    def _decode(self, vectors: Tensor, labels: Tensor, seeds: Sequence[int]) -> Tensor:
        """:meth:`decode`: check, then encode and render batch by batch."""
        table, targets = self._check_vectors(vectors, labels)
        seed_list = self._check_seeds(seeds, int(table.shape[0]))
        chunks = [
            self._render(self._encode_injected(table[part], targets[part]), seed_list[part])
            for part in self._slices(len(seed_list))
        ]
        return self._join(chunks)

    def _decode_prompts(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """:meth:`decode_prompts`: check, then encode and render batch by batch."""
        texts = self._check_prompts(prompts)
        seed_list = self._check_seeds(seeds, len(texts))
        chunks = [self._render(self._encode_texts(texts[part]), seed_list[part]) for part in self._slices(len(texts))]
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

    def _start(self, seeds: list[int], dtype: torch.dtype) -> tuple[list[torch.Generator], Tensor]:
        """One CPU generator per image, seeded with its seed, and the images' initial latents drawn from them."""
        from diffusers.utils.torch_utils import randn_tensor

        pipeline = self.pipeline
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        scale = int(pipeline.vae_scale_factor)
        shape = (len(seeds), int(pipeline.unet.config.in_channels), self.height // scale, self.width // scale)
        # Same draw as the pipeline's own prepare_latents with these generators.
        latents: Tensor = randn_tensor(shape, generator=generators, device=pipeline.device, dtype=dtype)
        return generators, latents

    def _finish(self, latents: Tensor, generators: list[torch.Generator], **conditioning: Any) -> Tensor:
        """Run the pipeline from ``latents`` on ready ``conditioning``; float32 images in ``[0, 1]``, resized."""
        images: Tensor = self.pipeline(
            **conditioning,
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
