"""The demo's stand-in for Stable Diffusion: a diffusion decoder trained on the ID digits, cached, and checked.

Its learned class embeddings are the anchors ``T(y)``. A trained decoder is cached under a key of everything
that determines it (its settings and the training digits), so later runs load it instead of training it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dreamood.decoding.in_domain import InDomainDiffusionDecoder
from dreamood.demo.config import DemoConfig, default_cache_dir
from dreamood.demo.context import decode
from dreamood.demo.data import DigitsData
from dreamood.demo.figures import save_rows
from dreamood.errors import ArtifactError, ModelNotFoundError
from dreamood.sampling.samples import EmbeddingSamples

__all__ = ["decoder_fidelity", "trained_decoder"]


def _settings(config: DemoConfig, data: DigitsData) -> dict[str, Any]:
    return {
        "class_names": list(data.class_names),
        "image_size": int(data.train_images.shape[-1]),
        "embedding_dim": config.decoder_embedding_dim,
        "block_out_channels": list(config.decoder_block_channels),
        "norm_num_groups": min(8, *config.decoder_block_channels),
        "beta_schedule": config.decoder_beta_schedule,
        "num_inference_steps": config.ddim_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "fit": {"epochs": config.decoder_epochs, "batch_size": config.decoder_batch_size, "lr": config.decoder_lr},
    }


def _cache_key(config: DemoConfig, data: DigitsData) -> str:
    """SHA-256 of everything that determines the trained decoder: its settings and the training data."""
    import dreamood

    digest = hashlib.sha256()
    digest.update(f"dreamood {dreamood.__version__}".encode())
    digest.update(json.dumps(_settings(config, data), sort_keys=True).encode())
    digest.update(data.train_images.numpy().tobytes())
    digest.update(data.train_labels.numpy().tobytes())
    return digest.hexdigest()


def trained_decoder(
    config: DemoConfig, data: DigitsData, device: torch.device, out_dir: Path
) -> tuple[InDomainDiffusionDecoder, dict[str, Any]]:
    """Load the decoder from the cache, or train it (and cache it); save a copy among the run's artefacts.

    Returns:
        The decoder and what the report says about it (cache, configuration, training).
    """
    settings = _settings(config, data)
    cache = (Path(config.cache_dir) if config.cache_dir else default_cache_dir()) / "demo-decoders"
    cache = cache / _cache_key(config, data)[:24]
    decoder: InDomainDiffusionDecoder | None = None
    if config.use_cache:
        with contextlib.suppress(ModelNotFoundError, ArtifactError):
            decoder = InDomainDiffusionDecoder.from_pretrained(cache, device=device)
    from_cache = decoder is not None
    if decoder is None:
        fit = settings.pop("fit")
        decoder = InDomainDiffusionDecoder(device=device, **settings)
        decoder.fit(
            (data.train_images, data.train_labels),
            fit["epochs"],
            batch_size=fit["batch_size"],
            lr=fit["lr"],
            show_progress=config.progress,
            seed=config.seed,
        )
        if config.use_cache:
            _save(decoder, cache)
    decoder.save_pretrained(out_dir / "artifacts" / "decoder")
    info: dict[str, Any] = {
        "from_cache": from_cache,
        "cache_dir": str(cache) if config.use_cache else None,
        "config": decoder.config,
        "epochs_trained": decoder.epochs_trained_,
        "final_loss": decoder.loss_history_[-1] if decoder.loss_history_ else None,
        "parameters": sum(p.numel() for p in decoder.network_.parameters()),
    }
    return decoder, info


def _save(decoder: InDomainDiffusionDecoder, cache: Path) -> None:
    """Write the decoder into a temporary folder, then move it into place, so a cache entry is never partial."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        decoder.save_pretrained(staging)
        with contextlib.suppress(OSError):  # another run may have cached the same decoder meanwhile
            os.replace(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def decoder_fidelity(
    decoder: InDomainDiffusionDecoder, data: DigitsData, config: DemoConfig, out_dir: Path, figures: dict[str, str]
) -> dict[str, Any]:
    """Decode T(y) and measure how often a pixel classifier trained on real digits recognises the class."""
    from sklearn.linear_model import LogisticRegression

    anchors = decoder.token_embeddings
    per_class = 4 if config.quick else 20
    labels = torch.arange(anchors.num_classes).repeat_interleave(per_class)
    samples = EmbeddingSamples(anchors.vectors[labels], labels, config={"sampler": "anchors T(y)"})
    folder = out_dir / "artifacts" / "decoded_anchors"
    images, _ = decode(decoder, samples, folder, config, seed=config.seed, progress=config.progress)
    pixels = LogisticRegression(max_iter=2000).fit(data.train_images.flatten(1).numpy(), data.train_labels.numpy())
    accuracy = float(pixels.score(images.flatten(1).numpy(), labels.numpy()))
    real_accuracy = float(pixels.score(data.test_images.flatten(1).numpy(), data.test_labels.numpy()))
    rows = [data.train_images[data.train_labels == c] for c in range(anchors.num_classes)]
    rows = [part for c, real in enumerate(rows) for part in (real, images[labels == c])]
    names = [text for name in anchors.class_names for text in (f"{name}: real digits", f"{name}: decoded T(y)")]
    figures["decoder"] = save_rows(rows, names, out_dir / "figures" / "decoded_anchors.png", 12)
    return {
        "images_per_class": per_class,
        "pixel_classifier_accuracy_on_decoded": accuracy,
        "pixel_classifier_accuracy_on_real_test": real_accuracy,
        "mean_intensity_decoded": float(images.mean()),
        "mean_intensity_real": float(data.train_images.mean()),
    }
