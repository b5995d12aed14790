"""Phase 1 of DREAM-OOD: an image encoder whose embeddings align with the class token embeddings.

Du, Sun, Zhu and Li, "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023, Eq. 2:
``L = CE(cos(z, T(y_j)) / t, y)`` with ``z = h(x) / ||h(x)||`` and the anchors ``T(y)`` frozen. The
L2-normalised training embeddings of the trained encoder form the feature bank of Phase 2.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamood._utils import DeviceLike, resolve_device
from dreamood._validation import (
    as_tensor,
    check_finite,
    check_floating,
    check_positive,
    check_positive_int,
    check_rank,
)
from dreamood.anchors import TokenEmbeddings
from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.hub import DreamoodHubMixin, backbone_config
from dreamood.training.checkpoint import TrainingCheckpoint
from dreamood.training.precision import autocast, autocast_dtype, grad_scaler
from dreamood.training.rng import loader_generators, seed_everything
from dreamood.training.schedule import cosine_schedule

__all__ = ["CHECKPOINT_NAME", "EncoderHistory", "TextConditionedEncoder", "fit_encoder"]

#: File name of the checkpoint :func:`fit_encoder` writes in ``checkpoint_dir`` after every epoch.
CHECKPOINT_NAME = "encoder_checkpoint.pt"
# The learning rate the cosine schedule reaches after the last step.
_MIN_LR = 1e-6


class TextConditionedEncoder(nn.Module, DreamoodHubMixin):
    """Backbone + linear projection to the anchor dimension, trained to align with frozen class anchors.

    ``embed(x)`` gives ``z = h(x) / ||h(x)||`` with ``h`` the backbone followed by a linear layer to ``m``
    dimensions; ``forward(x)`` gives the logits ``cos(z, T(y_j)) / t`` over the ``C`` classes; ``loss(x, y)``
    is the paper's Eq. 2 (Du et al., NeurIPS 2023). The anchors are a buffer: saved in the state dict, moved
    by ``.to(device)``, never trained. Satisfies :class:`dreamood.protocols.Embedder`.

    Args:
        backbone: Any module mapping a batch of images to features of shape ``(N, feature_dim)``.
        feature_dim: Dimension of the backbone's features.
        anchors: The class anchors ``T(y)``, a :class:`~dreamood.anchors.TokenEmbeddings` or a ``(C, m)``
            tensor.
        temperature: The temperature ``t`` of Eq. 2 (the paper uses 0.1).
        embedding_dim: Dimension of the projection; defaults to the anchors' dimension ``m`` and must
            equal it when given.

    Save and load it the Hugging Face way (``config.json`` + ``model.safetensors``, anchors and class names
    included, see :mod:`dreamood.hub`)::

        encoder.save_pretrained("runs/x/encoder")
        encoder = TextConditionedEncoder.from_pretrained("runs/x/encoder")

    Attributes:
        anchors: The ``(C, m)`` anchor buffer (float32).
        class_names: The class names when ``anchors`` was a ``TokenEmbeddings``, else ``None``.
        projection: The ``nn.Linear(feature_dim, m)`` projection.

    Raises:
        ValueError: A bad ``feature_dim`` or ``temperature``, anchors that are not a finite ``(C, m)``
            floating-point table without zero rows, or ``embedding_dim`` different from ``m``.
    """

    anchors: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        anchors: TokenEmbeddings | Tensor,
        temperature: float = 0.1,
        *,
        embedding_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(feature_dim, "feature_dim")
        check_positive(temperature, "temperature")
        if isinstance(anchors, TokenEmbeddings):
            vectors, names = anchors.vectors, list(anchors.class_names)
        else:
            vectors, names = as_tensor(anchors, "anchors"), None
            check_rank(vectors, 2, "anchors", "(num_classes, embedding_dim)")
            check_floating(vectors, "anchors")
            check_finite(vectors, "anchors")
        if vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise ValueError(
                f"anchors must be a non-empty (num_classes, embedding_dim) table, got {tuple(vectors.shape)}"
            )
        zero_rows = torch.nonzero(vectors.norm(dim=1) == 0).flatten().tolist()
        if zero_rows:
            raise ValueError(f"anchors rows {zero_rows[:10]} are zero vectors: their cosine similarity is undefined")
        dim = int(vectors.shape[1])
        if embedding_dim is not None and embedding_dim != dim:
            raise ValueError(
                f"the anchors have dimension {dim} but embedding_dim (the projection's output) is {embedding_dim}"
            )
        self.backbone = backbone
        self.projection = nn.Linear(feature_dim, dim)
        self.register_buffer("anchors", vectors.detach().to(dtype=torch.float32).clone())
        self.feature_dim = feature_dim
        self.temperature = float(temperature)
        self.class_names: list[str] | None = names

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.anchors.shape[0])

    @property
    def embedding_dim(self) -> int:
        """Dimension ``m`` of the embeddings and anchors."""
        return int(self.anchors.shape[1])

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings ``z`` of ``images``, shape ``(N, m)``, float32.

        Raises:
            ValueError: The backbone's output does not have shape ``(N, feature_dim)``.
            NonFiniteError: The backbone's features contain NaN or infinity.
        """
        features: Tensor = self.backbone(images)
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"the backbone must return features of shape (N, {self.feature_dim}), got {tuple(features.shape)}"
            )
        check_finite(features, "backbone features")
        return F.normalize(self.projection(features).float(), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``cos(z, T(y_j)) / t`` of ``images``, shape ``(N, C)``, float32."""
        z = self.embed(images)
        # Cosines are computed in float32 even under autocast: dividing by t = 0.1 magnifies rounding.
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits: Tensor = z @ F.normalize(self.anchors, dim=1).T / self.temperature
        return logits

    def loss_from_logits(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Eq. 2 from precomputed logits: the mean cross-entropy of ``logits`` ``(N, C)`` against ``labels``.

        Raises:
            ValueError: ``labels`` is not an integer ``(N,)`` tensor with values in ``[0, C)``.
        """
        targets = _check_labels(labels, int(logits.shape[0]), self.num_classes)
        return F.cross_entropy(logits.float(), targets.to(logits.device))

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """The alignment loss of the paper's Eq. 2 on a batch, averaged over the batch.

        Args:
            images: A batch of images.
            labels: Their class labels, integers in ``[0, C)``, shape ``(N,)``.

        Returns:
            A scalar tensor.
        """
        return self.loss_from_logits(self(images), labels)

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}"
        )

    def _dreamood_config(self) -> dict[str, Any]:
        return {
            "backbone": backbone_config(self.backbone),
            "backbone_class": type(self.backbone).__name__,
            "feature_dim": self.feature_dim,
            "embedding_dim": self.embedding_dim,
            "num_classes": self.num_classes,
            "temperature": self.temperature,
            "class_names": self.class_names,
        }

    @classmethod
    def _from_dreamood_config(cls, config: dict[str, Any], backbone: nn.Module) -> TextConditionedEncoder:
        # Placeholder anchors of the saved shape; the saved anchor buffer replaces them when the weights load.
        anchors = torch.ones(int(config["num_classes"]), int(config["embedding_dim"]))
        names = config.get("class_names")
        table: TokenEmbeddings | Tensor = anchors
        if isinstance(names, list):
            table = TokenEmbeddings([str(name) for name in names], anchors)
        return cls(backbone, int(config["feature_dim"]), table, float(config["temperature"]))


def _check_labels(labels: Tensor, num_samples: int, num_classes: int) -> Tensor:
    targets = as_tensor(labels, "labels")
    check_rank(targets, 1, "labels", "(num_samples,)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {targets.dtype}")
    if targets.shape[0] != num_samples:
        raise ValueError(f"labels has {targets.shape[0]} entries but there are {num_samples} samples")
    outside = (targets < 0) | (targets >= num_classes)
    if bool(outside.any()):
        bad = targets[outside][:5].tolist()
        raise ValueError(f"labels must lie in [0, {num_classes}), got values {bad}")
    return targets.long()


@dataclass
class EncoderHistory:
    """Per-epoch training record of :func:`fit_encoder`.

    Attributes:
        loss: Mean training loss of each epoch.
        accuracy: Training accuracy of each epoch (nearest anchor = label), in ``[0, 1]``.
        lr: Learning rate at the end of each epoch.
    """

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    def as_dict(self) -> dict[str, list[float]]:
        """The record as a plain dict of lists."""
        return {"loss": list(self.loss), "accuracy": list(self.accuracy), "lr": list(self.lr)}


def fit_encoder(
    encoder: TextConditionedEncoder,
    train_loader: Any,
    epochs: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    device: DeviceLike = None,
    amp_dtype: torch.dtype | str | None = None,
    channels_last: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    seed: int | None = 0,
    fingerprint: str | None = None,
) -> EncoderHistory:
    """Train ``encoder`` with the paper's Phase 1 recipe (Du et al., NeurIPS 2023, Eq. 2).

    SGD with Nesterov momentum 0.9 and weight decay 5e-4; the learning rate follows a cosine decay updated
    every step, from ``lr`` down to 1e-6, over ``epochs * len(train_loader)`` steps. After every epoch a
    checkpoint (model, optimiser, scheduler, gradient scaler, RNG states including the loader's shuffling
    generator, epoch, history) is written atomically to ``checkpoint_dir``; with ``resume=True`` training
    continues from it and ends with the same weights as an uninterrupted run (same device, same seed).
    The encoder is left in eval mode.

    Args:
        encoder: The encoder to train in place.
        train_loader: A sized iterable of ``(images, labels)`` batches, e.g. a ``DataLoader``. For
            reproducible shuffling give the ``DataLoader`` a seeded ``generator``.
        epochs: Total number of epochs (when resuming, the run continues up to this many).
        lr: Initial learning rate.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 weight decay.
        device: Device to train on (default: CUDA when available).
        amp_dtype: ``torch.bfloat16``/``"bf16"`` or ``torch.float16``/``"fp16"`` to train under autocast
            (fp16 with gradient scaling), or ``None`` for full precision.
        channels_last: Use the channels-last memory format for the model and 4-D inputs.
        checkpoint_dir: Folder for the per-epoch checkpoint (``encoder_checkpoint.pt``); ``None`` to skip.
        resume: Continue from the checkpoint in ``checkpoint_dir`` when there is one (else start afresh).
        show_progress: Show a progress bar with the running loss and accuracy.
        seed: Seeds Python's, NumPy's and torch's global RNGs before training (``None``: leave them).
            When resuming, the RNG states saved in the checkpoint replace them.
        fingerprint: What identifies the data and settings of this training beyond the arguments (the pipeline
            passes its stage's fingerprint). Stored in the checkpoint; a checkpoint is resumed only when it was
            written with the same fingerprint, learning rate, momentum, weight decay, precision and seed.

    Returns:
        The per-epoch loss, accuracy and learning rate of all epochs, resumed ones included.

    Raises:
        ValueError: A bad hyper-parameter, an unsized or empty loader, ``resume`` without
            ``checkpoint_dir``, or a checkpoint made with another loader length, other settings, another
            fingerprint or more epochs.
        NonFiniteError: The loss or the backbone's features became NaN or infinite (the message names
            the epoch and step).
        ArtifactError: The checkpoint is not a checkpoint of this version of fit_encoder, or does not match the
            encoder.
    """
    check_positive_int(epochs, "epochs")
    check_positive(lr, "lr")
    check_positive(momentum, "momentum", allow_zero=True)
    check_positive(weight_decay, "weight_decay", allow_zero=True)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir, got None")
    dtype = autocast_dtype(amp_dtype, "amp_dtype")
    try:
        steps_per_epoch = len(train_loader)
    except TypeError as error:
        raise ValueError(
            f"train_loader must have a length (the cosine schedule needs the number of steps), "
            f"got {type(train_loader).__name__}"
        ) from error
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    run_device = resolve_device(device)
    if seed is not None:
        seed_everything(seed)

    encoder.to(run_device)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in encoder.parameters() if p.requires_grad],
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    scheduler = cosine_schedule(optimizer, epochs * steps_per_epoch, _MIN_LR)
    scaler = grad_scaler(run_device, dtype)
    checkpoint = TrainingCheckpoint(
        None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME,
        "fit_encoder",
        objects={"model": encoder, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
        run={
            "steps_per_epoch": steps_per_epoch,
            "settings": {
                "lr": lr,
                "momentum": momentum,
                "nesterov": nesterov,
                "weight_decay": weight_decay,
                "amp": None if dtype is None else str(dtype),
                "seed": seed,
            },
            "fingerprint": fingerprint,
        },
        generators={"train_loader": loader_generators(train_loader)},
    )
    checkpoint.remove_temporaries()  # left by a process killed while writing the checkpoint
    history = EncoderHistory()
    start_epoch = 0
    if resume and checkpoint.exists():
        state = checkpoint.load()
        start_epoch = int(state["epoch"])
        if start_epoch > epochs:
            raise ValueError(
                f"checkpoint {checkpoint.path} has already trained {start_epoch} epochs, more than epochs={epochs}"
            )
        try:
            for name in ("loss", "accuracy", "lr"):
                getattr(history, name).extend(float(v) for v in state["history"][name])
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"checkpoint {checkpoint.path} holds no encoder history: {error}") from error
        checkpoint.restore_rng(state)

    from tqdm.auto import tqdm

    for epoch in range(start_epoch, epochs):
        encoder.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            train_loader,
            total=steps_per_epoch,
            desc=f"encoder epoch {epoch + 1}/{epochs}",
            disable=None if show_progress else True,  # None: no bar when stderr is not a terminal
            leave=False,
            dynamic_ncols=True,
        )
        for step, batch in enumerate(bar, start=1):
            images, labels = batch[0].to(run_device, non_blocking=True), torch.as_tensor(batch[1]).to(run_device)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            try:
                with autocast(run_device, dtype):
                    logits = encoder(images)
                loss = encoder.loss_from_logits(logits, labels)
            except NonFiniteError as error:
                raise NonFiniteError(f"epoch {epoch + 1}, step {step}: {error}") from error
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"the loss became {value} at epoch {epoch + 1}, step {step} "
                    f"(global step {epoch * steps_per_epoch + step}); lower lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():
                # fp16: the scaler skips a step whose gradients overflowed; the schedule still counts it.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            count = int(labels.shape[0])
            loss_sum += value * count
            correct += int((logits.detach().argmax(dim=1) == labels).sum())
            seen += count
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        if seen == 0:
            raise ValueError(f"train_loader yielded no batch in epoch {epoch + 1}")
        history.loss.append(loss_sum / seen)
        history.accuracy.append(correct / seen)
        history.lr.append(float(optimizer.param_groups[0]["lr"]))
        checkpoint.save(epoch + 1, history.as_dict())
    encoder.eval()
    return history
