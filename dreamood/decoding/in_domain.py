"""A small class-conditional diffusion model trained from scratch on the in-distribution images.

DREAM-OOD (Du et al., NeurIPS 2023) decodes sampled embeddings with Stable Diffusion. Where no pretrained
text-to-image model fits the domain (grayscale, medical, small images), this decoder plays its part: a small
``UNet2DConditionModel`` learns to denoise the ID images (DDPM, Ho et al., NeurIPS 2020), conditioned by
cross-attention on one token, the image's class embedding from a learned table ``(C, m)``. The table is the set
of anchors T(y) for Phase 1, and any vector of dimension ``m`` (an imagined outlier embedding) can replace the
class token when sampling. A learned null embedding, used in place of the class token with probability
``p_uncond`` during training, enables classifier-free guidance (Ho & Salimans, 2022); sampling uses DDIM
(Song et al., ICLR 2021) without sample clipping.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
)
from dreamood.anchors import TokenEmbeddings
from dreamood.errors import ArtifactError, ModelNotFoundError, NonFiniteError
from dreamood.io import load_artifact, save_artifact
from dreamood.training.checkpoint import TrainingCheckpoint

__all__ = ["InDomainDiffusionDecoder"]

_WEIGHTS_FILE = "decoder.safetensors"
_CHECKPOINT_FILE = "in_domain_decoder.pt"
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class _ClassConditionalUNet(nn.Module):
    """The denoiser: a UNet conditioned on one cross-attention token, plus the class and null embeddings."""

    def __init__(self, config: dict[str, Any]) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        channels = list(config["block_out_channels"])
        levels = len(channels)
        size = config["image_size"]
        # Attention only at the lower resolutions: full-resolution self-attention is the costly part on CPU.
        self.unet: Any = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=size,
            in_channels=config["in_channels"],
            out_channels=config["in_channels"],
            block_out_channels=tuple(channels),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            layers_per_block=config["layers_per_block"],
            cross_attention_dim=config["embedding_dim"],
            attention_head_dim=config["attention_head_dim"],
            norm_num_groups=config["norm_num_groups"],
        )
        dim = config["embedding_dim"]
        self.class_embeddings = nn.Parameter(torch.randn(len(config["class_names"]), dim) / dim**0.5)
        self.null_embedding = nn.Parameter(torch.zeros(dim))

    def forward(self, images: Tensor, timesteps: Tensor, condition: Tensor) -> Tensor:
        """Predict the noise in ``images`` at ``timesteps`` given one condition vector ``(B, m)`` per image."""
        noise: Tensor = self.unet(images, timesteps, encoder_hidden_states=condition[:, None, :]).sample
        return noise


class InDomainDiffusionDecoder:
    """Class-conditional diffusion decoder trained from scratch on in-distribution images.

    Implements :class:`~dreamood.protocols.EmbeddingDecoder` for domains where no pretrained text-to-image
    model fits, following DREAM-OOD (Du et al., "Dream the Impossible: Outlier Imagination with Diffusion
    Models", NeurIPS 2023) with a small DDPM (Ho et al., NeurIPS 2020) in place of Stable Diffusion. The
    condition is a single cross-attention token: during training the learned embedding of the image's class
    (or, with probability ``p_uncond``, a learned null embedding for classifier-free guidance, Ho & Salimans
    2022); at decoding time any vector of dimension ``embedding_dim``. Sampling is DDIM (Song et al., ICLR
    2021) with ``clip_sample=False``: with clipping on, guidance washes out the class identity of the samples.

    The networks are initialised from ``seed`` when the decoder is built, so an untrained decoder can already
    decode (random images), which is enough for testing pipelines. :meth:`fit` re-initialises them from
    ``seed`` and trains (unless it resumes from a checkpoint).

    Args:
        class_names: Names of the in-distribution classes, indexed by label.
        image_size: Side of the square images the model is trained on and generates; divisible by
            ``2 ** (len(block_out_channels) - 1)``.
        in_channels: Image channels: 1 for grayscale, 3 for RGB. :meth:`decode` always returns 3 channels.
        embedding_dim: Dimension ``m`` of the class embeddings (the cross-attention width).
        block_out_channels: UNet channels per resolution level (at least two levels).
        layers_per_block: ResNet layers per UNet block.
        attention_head_dim: Width of each attention head.
        norm_num_groups: Group-norm groups; must divide every entry of ``block_out_channels``.
        num_train_timesteps: Diffusion steps of the training noise schedule.
        beta_schedule: Noise schedule: ``"squaredcos_cap_v2"`` (cosine), ``"linear"`` or ``"scaled_linear"``.
        p_uncond: Probability of replacing the class token with the null embedding during training.
        num_inference_steps: Default number of DDIM steps of :meth:`decode`.
        guidance_scale: Default classifier-free guidance scale of :meth:`decode` (1 = no guidance).
        seed: Seed of the initial weights.
        device: Where the networks live (``None``/``"auto"``: CUDA when available, else CPU).

    Attributes:
        network_: The denoiser: ``network_.unet`` (diffusers ``UNet2DConditionModel``),
            ``network_.class_embeddings`` ``(C, m)`` and ``network_.null_embedding`` ``(m,)``.
        epochs_trained_: Number of training epochs behind the current weights.
        loss_history_: Mean training loss of every epoch.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        image_size: int = 16,
        in_channels: int = 1,
        embedding_dim: int = 64,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        p_uncond: float = 0.1,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        device: DeviceLike = None,
    ) -> None:
        self._class_names = check_class_names(class_names)
        for value, name in (
            (image_size, "image_size"),
            (in_channels, "in_channels"),
            (embedding_dim, "embedding_dim"),
            (layers_per_block, "layers_per_block"),
            (attention_head_dim, "attention_head_dim"),
            (norm_num_groups, "norm_num_groups"),
            (num_train_timesteps, "num_train_timesteps"),
            (num_inference_steps, "num_inference_steps"),
        ):
            check_positive_int(value, name)
        check_positive_int(seed, "seed", allow_zero=True)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
        channels = list(block_out_channels)
        if len(channels) < 2:
            raise ValueError(f"block_out_channels needs at least two levels, got {channels}")
        for index, width in enumerate(channels):
            check_positive_int(width, f"block_out_channels[{index}]")
            if width % norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{index}]={width} is not divisible by norm_num_groups={norm_num_groups}"
                )
        factor = 2 ** (len(channels) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by {factor} for {len(channels)} UNet levels")
        check_choice(beta_schedule, _BETA_SCHEDULES, "beta_schedule")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond!r}")
        check_positive(guidance_scale, "guidance_scale")
        if num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds num_train_timesteps={num_train_timesteps}"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self._embedding_dim = embedding_dim
        self.block_out_channels = tuple(channels)
        self.layers_per_block = layers_per_block
        self.attention_head_dim = attention_head_dim
        self.norm_num_groups = norm_num_groups
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.p_uncond = float(p_uncond)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.seed = seed
        self.device = resolve_device(device)
        self.network_ = self._new_network()
        self.epochs_trained_ = 0
        self.loss_history_: list[float] = []

    # ------------------------------------------------------------------ EmbeddingDecoder interface

    @property
    def embedding_dim(self) -> int:
        """Dimension ``m`` of the vectors the decoder accepts."""
        return self._embedding_dim

    @property
    def class_names(self) -> list[str]:
        """Names of the classes, indexed by label."""
        return list(self._class_names)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (except ``device``) as a JSON-serialisable dict."""
        return {
            "class_names": list(self._class_names),
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "embedding_dim": self._embedding_dim,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "p_uncond": self.p_uncond,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
        }

    @property
    def token_embeddings(self) -> TokenEmbeddings:
        """The learned class-embedding table as anchors T(y) (a detached CPU copy)."""
        table = self.network_.class_embeddings.detach().to("cpu", torch.float32).clone()
        return TokenEmbeddings(self._class_names, table, policy="learned")

    def __repr__(self) -> str:
        return (
            f"InDomainDiffusionDecoder(num_classes={len(self._class_names)}, image_size={self.image_size}, "
            f"in_channels={self.in_channels}, embedding_dim={self._embedding_dim}, "
            f"epochs_trained_={self.epochs_trained_})"
        )

    def to(self, device: DeviceLike) -> InDomainDiffusionDecoder:
        """Move the networks to ``device``; returns ``self``."""
        self.device = resolve_device(device)
        self.network_.to(self.device)
        return self

    # ------------------------------------------------------------------ training

    def fit(
        self,
        data: Any,
        epochs: int = 100,
        *,
        batch_size: int = 32,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        show_progress: bool = True,
        seed: int = 0,
    ) -> InDomainDiffusionDecoder:
        """Train the denoiser and the class embeddings on labelled in-distribution images.

        Training minimises the DDPM noise-prediction loss ``||eps - eps_theta(x_t, t, c)||^2`` with AdamW;
        each image's condition ``c`` is its class embedding, or the null embedding with probability
        ``p_uncond``. All randomness (shuffling, timesteps, noise, condition dropout) comes from one CPU
        generator seeded with ``seed``, so the same call gives the same weights, and a resumed run continues
        exactly where the checkpoint left off.

        Args:
            data: Either a tuple ``(images, labels)`` of tensors/arrays, images ``(N, H, W)`` or
                ``(N, in_channels, H, W)`` in ``[0, 1]`` (``uint8`` images are divided by 255), or a dataset
                of ``(image, label)`` pairs with image tensors of that form. Images are resized to
                ``image_size`` when needed.
            epochs: Total number of epochs (a resumed run trains up to this number).
            batch_size: Images per optimisation step.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            checkpoint_dir: Folder for an atomically written checkpoint after every epoch (``None``: none).
            resume: Continue from the checkpoint in ``checkpoint_dir`` when there is one (start afresh
                otherwise, so the same command can both start and restart a job).
            show_progress: Show a progress bar over epochs.
            seed: Seed of the training randomness.

        Returns:
            ``self``, trained.

        Raises:
            ValueError: Invalid arguments or data, or a checkpoint written with another configuration.
            TypeError: ``data`` is of an unsupported type.
            ArtifactError: The checkpoint is corrupt, or is not a checkpoint of this version of fit (one written
                by an older dreamood, say).
        """
        check_positive_int(epochs, "epochs")
        check_positive_int(batch_size, "batch_size")
        check_positive(lr, "lr")
        check_positive(weight_decay, "weight_decay", allow_zero=True)
        check_positive_int(seed, "seed", allow_zero=True)
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        images, labels = self._training_tensors(data)
        from diffusers import DDPMScheduler

        scheduler: Any = DDPMScheduler(  # type: ignore[no-untyped-call]
            num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule
        )
        fit_args = {
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "num_images": int(images.shape[0]),
        }
        network = self._new_network()
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        # All the training randomness comes from `generator`: the global generators are neither used nor saved.
        checkpoint = TrainingCheckpoint(
            None if checkpoint_dir is None else Path(checkpoint_dir) / _CHECKPOINT_FILE,
            "InDomainDiffusionDecoder.fit",
            objects={"model": network, "optimizer": optimizer},
            run={"config": self.config, "fit_args": fit_args},
            generators={"fit": [generator]},
            global_rng=False,
        )
        checkpoint.remove_temporaries()
        start_epoch, losses = 0, []
        if resume and checkpoint.exists():
            state = checkpoint.load()
            checkpoint.restore_rng(state)
            try:
                start_epoch, losses = int(state["epoch"]), [float(v) for v in state["history"]]
            except (TypeError, ValueError) as error:
                raise ArtifactError(f"checkpoint {checkpoint.path} holds no decoder loss history: {error}") from error
        self.network_ = network
        network.train()
        for epoch in progress(range(start_epoch, epochs), enabled=show_progress, desc="training decoder"):
            losses.append(self._train_epoch(images, labels, scheduler, optimizer, generator, batch_size))
            checkpoint.save(epoch + 1, losses)
        network.eval()
        self.epochs_trained_ = max(start_epoch, epochs)
        self.loss_history_ = losses
        return self

    def _train_epoch(
        self,
        images: Tensor,
        labels: Tensor,
        scheduler: Any,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        batch_size: int,
    ) -> float:
        network = self.network_
        order = torch.randperm(images.shape[0], generator=generator)
        total, count = 0.0, 0
        for start in range(0, images.shape[0], batch_size):
            index = order[start : start + batch_size]
            clean = images[index]
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, self.num_train_timesteps, (len(index),), generator=generator)
            drop = torch.rand(len(index), generator=generator) < self.p_uncond
            clean, noise, timesteps, drop = (t.to(self.device) for t in (clean, noise, timesteps, drop))
            classes = network.class_embeddings[labels[index].to(self.device)]
            condition = torch.where(drop[:, None], network.null_embedding.expand_as(classes), classes)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(network(noisy, timesteps, condition), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            value = float(loss.detach())
            if value != value or value in (float("inf"), float("-inf")):
                raise NonFiniteError(
                    f"training loss became {value}; try a lower lr (now {optimizer.param_groups[0]['lr']})"
                )
            total += value * len(index)
            count += len(index)
        return total / count

    def _training_tensors(self, data: Any) -> tuple[Tensor, Tensor]:
        """Validate ``data`` and return images in ``[-1, 1]`` ``(N, C, S, S)`` and labels ``(N,)`` on CPU."""
        if isinstance(data, Tensor) or hasattr(data, "__array__"):
            raise TypeError(f"data must be an (images, labels) tuple or a dataset of pairs, got {type(data).__name__}")
        if isinstance(data, tuple) and len(data) == 2:
            images, labels = as_tensor(data[0], "images"), as_tensor(data[1], "labels")
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            if len(data) == 0:
                raise ValueError("data is an empty dataset")
            pairs = [data[i] for i in range(len(data))]
            images = torch.stack([as_tensor(p[0], f"data[{i}][0]") for i, p in enumerate(pairs)])
            labels = as_tensor([int(p[1]) for p in pairs], "labels")
        else:
            raise TypeError(f"data must be an (images, labels) tuple or a dataset of pairs, got {type(data).__name__}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        check_floating(images, "images")
        if images.dim() == 3:
            images = images[:, None]
        check_rank(images, 4, "images", "(N, C, H, W)")
        check_finite(images, "images")
        if images.shape[0] == 0:
            raise ValueError("images is empty")
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"images has {images.shape[1]} channels, the decoder expects in_channels={self.in_channels}"
            )
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        check_rank(labels, 1, "labels", "(N,)")
        if labels.is_floating_point():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but there are {images.shape[0]} images")
        self._check_labels(labels)
        images = images.detach().to("cpu", torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            if max(images.shape[-2:]) > self.image_size:
                warnings.warn(
                    f"the training images are {images.shape[-2]}x{images.shape[-1]} but the decoder's image_size is "
                    f"{self.image_size}: they are shrunk to {self.image_size}x{self.image_size} for training, and "
                    f"the decoder renders images of that size (build it with image_size={max(images.shape[-2:])} "
                    "to keep their detail)",
                    stacklevel=3,
                )
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0.0, 1.0) * 2.0 - 1.0, labels.detach().to("cpu", torch.long)

    def _check_labels(self, labels: Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self._class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self._class_names) - 1}], got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    def _new_network(self) -> _ClassConditionalUNet:
        """Build the denoiser with weights drawn from ``seed``, leaving the global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = _ClassConditionalUNet(self.config)
        return network.to(self.device).eval()

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def decode(
        self,
        vectors: Tensor,
        labels: Tensor,
        seeds: Sequence[int],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """Draw one image per condition vector with guided DDIM sampling.

        Each image's initial noise comes from its own ``torch.Generator`` seeded with its seed, and DDIM runs
        deterministically (``eta = 0``), so an image depends only on ``(vector, seed)``, not on the rest of
        the batch (up to float rounding differences between batch sizes in the convolution kernels).

        Args:
            vectors: Condition vectors ``(B, m)``, for example rows of :attr:`token_embeddings` or sampled
                outlier embeddings; they replace the class token.
            labels: Classes ``(B,)`` the vectors belong to; checked for range only, the vector alone
                conditions the model.
            seeds: One integer seed per image.
            num_inference_steps: DDIM steps (default: the constructor's value).
            guidance_scale: Classifier-free guidance scale, ``eps_null + s * (eps_vector - eps_null)``
                (default: the constructor's value; 1 turns guidance off).

        Returns:
            Images in ``[0, 1]``, shape ``(B, 3, image_size, image_size)``, on the decoder's device
            (grayscale models repeat their channel three times).

        Raises:
            ValueError: Shapes, labels or seeds do not match.
            TypeError: Wrong dtypes.
            NonFiniteError: ``vectors`` contains NaN or infinity.
        """
        from diffusers import DDIMScheduler

        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        check_positive_int(steps, "num_inference_steps")
        check_positive(scale, "guidance_scale")
        conditions = as_tensor(vectors, "vectors")
        check_rank(conditions, 2, "vectors", "(batch, embedding_dim)")
        check_floating(conditions, "vectors")
        check_finite(conditions, "vectors")
        batch = int(conditions.shape[0])
        if conditions.shape[1] != self._embedding_dim:
            raise ValueError(f"vectors has dimension {conditions.shape[1]}, the decoder expects {self._embedding_dim}")
        targets = as_tensor(labels, "labels")
        check_rank(targets, 1, "labels", "(batch,)")
        if targets.is_floating_point():
            raise TypeError(f"labels must be an integer tensor, got {targets.dtype}")
        if targets.shape[0] != batch:
            raise ValueError(f"labels has {targets.shape[0]} entries but vectors has {batch} rows")
        self._check_labels(targets)
        seed_list = [int(s) for s in seeds]
        if len(seed_list) != batch:
            raise ValueError(f"seeds has {len(seed_list)} entries but vectors has {batch} rows")
        if batch == 0:
            return torch.zeros(0, 3, self.image_size, self.image_size, device=self.device)

        network = self.network_.eval()
        dtype = network.null_embedding.dtype
        conditions = conditions.to(self.device, dtype)
        shape = (1, self.in_channels, self.image_size, self.image_size)
        sample = torch.cat(
            [
                torch.randn(shape, generator=torch.Generator(self.device).manual_seed(s), device=self.device)
                for s in seed_list
            ]
        ).to(dtype)
        scheduler: Any = DDIMScheduler(  # type: ignore[no-untyped-call]
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            clip_sample=False,
            # "trailing" would start at t = T - 1, where the cosine schedule's alpha_bar is ~1e-9: without
            # clipping, the x0 estimate is amplified ~1e4 times and every image saturates to black and white.
            timestep_spacing="leading",
        )
        scheduler.set_timesteps(steps, device=self.device)
        guided = scale != 1.0
        if guided:
            conditions = torch.cat([network.null_embedding.expand(batch, -1), conditions])
        for timestep in scheduler.timesteps:
            model_input = torch.cat([sample, sample]) if guided else sample
            noise = network(model_input, timestep.expand(model_input.shape[0]), conditions)
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + scale * (conditional - unconditional)
            sample = scheduler.step(noise, timestep, sample).prev_sample
        images = ((sample.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        return images.expand(-1, 3, -1, -1).contiguous() if self.in_channels == 1 else images

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Save the weights (safetensors) and the configuration (JSON) into ``directory``, atomically.

        Args:
            directory: Target folder (created when missing).

        Returns:
            The path of the weights file ``directory/decoder.safetensors`` (its sidecar is ``decoder.json``).
        """
        metadata = {"config": self.config, "epochs_trained": self.epochs_trained_, "loss_history": self.loss_history_}
        return save_artifact(
            Path(directory) / _WEIGHTS_FILE, self.network_.state_dict(), metadata, kind="InDomainDiffusionDecoder"
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: DeviceLike = None) -> InDomainDiffusionDecoder:
        """Load a decoder written by :meth:`save_pretrained` (safetensors + JSON; nothing is unpickled).

        Args:
            directory: The folder given to :meth:`save_pretrained`.
            device: Where to put the networks (``None``/``"auto"``: CUDA when available, else CPU).

        Returns:
            The decoder, in evaluation mode.

        Raises:
            ModelNotFoundError: ``directory`` holds no saved decoder.
            ArtifactError: The files are corrupt or inconsistent with each other.
        """
        path = Path(directory) / _WEIGHTS_FILE
        try:
            tensors, metadata = load_artifact(path, kind="InDomainDiffusionDecoder")
        except FileNotFoundError as error:
            raise ModelNotFoundError(
                f"no InDomainDiffusionDecoder in {directory}: {error}. Train one with fit() and save it with "
                "save_pretrained(directory)"
            ) from error
        try:
            decoder = cls(**metadata["config"], device=device)
            decoder.network_.load_state_dict(tensors, strict=True)
            decoder.epochs_trained_ = int(metadata.get("epochs_trained", 0))
            decoder.loss_history_ = [float(v) for v in metadata.get("loss_history", [])]
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ArtifactError(f"saved decoder in {directory} is inconsistent: {error}") from error
        decoder.network_.eval()
        return decoder
