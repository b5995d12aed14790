"""The DREAM-OOD pipeline of ``dreamood demo``, stage by stage, assembled from the library's public API.

Du, Sun, Zhu, Li. "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023. The
stand-in for Stable Diffusion is an :class:`~dreamood.decoding.in_domain.InDomainDiffusionDecoder` trained on
the ID digits; its learned class embeddings are the anchors ``T(y)``. Stages:

1. data: ID digits, near-OOD digits, far-OOD photographs in two versions (raw, intensity-matched);
2. decoder: train (or load from the cache) the diffusion decoder, decode ``T(y)``;
3. Phase 1: text-conditioned encoder aligned to ``T(y)`` (Eq. 2) and its feature bank;
4. Phase 2: outlier embeddings from :class:`~dreamood.sampling.knn_boundary.KNNBoundarySampler` and the
   Table 2 (I) variant (Gaussian noise on ``T(y)``);
5. decoding: the sampled embeddings rendered with :func:`~dreamood.decoding.generation.generate_images`;
6. Phase 3: the same classifier trained five ways (cross-entropy only, DREAM-OOD, Table 2 (I), VOS, NPOS);
7. OOD baselines: GODIN (Hsu et al., CVPR 2020) and GAN-based outliers (Lee et al., ICLR 2018), same recipe;
8. evaluation: energy scores with :class:`~dreamood.evaluation.OODEvaluator`, GODIN's and MSP scores for the
   baselines, plus post-hoc detectors on the cross-entropy model, on every OOD set;
9. generalisation (DREAM-ID, Sec. 5): inliers sampled around the densest embeddings and decoded, the
   augmentation baselines (RandAugment, AutoAugment, AugMix, CutMix) appended in the same number, and MEMO
   (Zhang et al., NeurIPS 2022) on the cross-entropy model; top-1 accuracy on the ID test digits and on a
   rotated copy of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood._utils import resolve_device
from dreamood.anchors import TokenEmbeddings
from dreamood.decoding.generation import generate_images
from dreamood.decoding.in_domain import InDomainDiffusionDecoder
from dreamood.demo.config import (
    PAPER_ANCHORS_PER_ROUND,
    PAPER_BANK_PER_CLASS,
    PAPER_BOUNDARY,
    PAPER_K,
    PAPER_KNN_DETECTOR_K,
    PAPER_KNN_DETECTOR_TRAIN,
    DemoConfig,
    default_cache_dir,
)
from dreamood.demo.data import DIGIT_LEVELS, FAR_OOD_SETS, DigitsData, far_ood_sets, load_digits_data, match_intensity
from dreamood.encoder import TextConditionedEncoder
from dreamood.errors import ArtifactError, ModelNotFoundError
from dreamood.feature_bank import FeatureBank
from dreamood.io import atomic_write, save_checkpoint
from dreamood.sampling.samples import EmbeddingSamples
from dreamood.training.config import TrainingConfig, TrainingResult

__all__ = ["GENERALIZATION", "METHODS", "OOD_BASELINES", "DemoResult", "StageTimer", "run_demo", "set_groups"]

#: The classifiers of Phase 3, in report order: key -> label.
METHODS: dict[str, str] = {
    "ce": "(a) cross-entropy only",
    "dream_ood": "(b) DREAM-OOD",
    "token_noise": "(c) Gaussian noise on T(y) (Table 2, I)",
    "vos": "(d) VOS",
    "npos": "(e) NPOS",
}

#: The OOD-detection baselines, each with its own score, in report order: key -> label.
OOD_BASELINES: dict[str, str] = {
    "godin": "(f) GODIN",
    "godin_eps0": "(f) GODIN, epsilon = 0",
    "gan": "(g) GAN outliers, MSP",
}

#: The rows of the generalisation table, in order: key -> label.
GENERALIZATION: dict[str, str] = {
    "ce": "cross-entropy only (model (a))",
    "dream_id": "DREAM-ID: + decoded inliers",
    "randaugment": "+ RandAugment copies",
    "autoaugment": "+ AutoAugment copies",
    "augmix": "+ AugMix copies",
    "cutmix": "+ CutMix copies",
    "memo": "MEMO on model (a)",
}

NEAR_OOD = "near-OOD digits"
ROTATED = "rotated"


def set_groups() -> dict[str, list[str]]:
    """The OOD test sets of the demo by group: near-OOD, far-OOD raw and far-OOD intensity-matched."""
    return {
        "near": [NEAR_OOD],
        "far": list(FAR_OOD_SETS),
        "far_matched": [f"{name}, matched" for name in FAR_OOD_SETS],
    }


class StageTimer:
    """Wall-clock and CPU seconds per named stage (a stage entered several times, e.g. per seed, adds up).

    The CPU time is this process's (all its threads); on a busy machine the wall-clock time exceeds it.

    Args:
        announce: Print the name of each stage when it starts.
    """

    def __init__(self, *, announce: bool = False) -> None:
        self.announce = announce
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        """Time the block and add its durations to ``name``; ``detail`` is only printed."""
        if self.announce:
            print(f"== {name}{f' ({detail})' if detail else ''}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - wall
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu

    @property
    def total(self) -> float:
        """Wall-clock seconds summed over the stages."""
        return sum(self.seconds.values())


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        out_dir: The output folder.
        metrics: The content of ``metrics.json``.
        report_md: Path of ``report.md``.
        report_html: Path of ``report.html``.
        summary: The one-screen summary table printed at the end.
    """

    out_dir: Path
    metrics: dict[str, Any]
    report_md: Path
    report_html: Path
    summary: str


@dataclass
class _SeedRun:
    """Everything one seed of Phases 1-3 produced that the report needs."""

    seed: int
    encoder_test_accuracy: float
    sampler_settings: dict[str, Any]
    token_noise_std: float
    npos_sigma: float
    inlier_sampler_settings: dict[str, Any] = field(default_factory=dict)
    godin_epsilon: float = float("nan")
    godin_validation_scores: dict[str, float] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_accuracy: dict[str, float] = field(default_factory=dict)
    generalization: dict[str, dict[str, float]] = field(default_factory=dict)


class _Scoring(NamedTuple):
    """How an OOD baseline is scored.

    Attributes:
        scorer: The evaluator's scorer.
        model: What the evaluator runs before the scorer (``None``: the scorer takes the images).
        classifier: The classifier whose ID accuracy the row reports when the evaluator runs no model.
    """

    scorer: Any
    model: Callable[[Tensor], Tensor] | None
    classifier: nn.Module | None


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the whole demo and write its report; see the module documentation for the stages.

    Args:
        config: What to run.

    Returns:
        The output folder, the metrics and the paths of the reports.

    Raises:
        ValueError: An invalid setting (for example ``id_classes``).
    """
    from dreamood.demo.report import print_summary, write_reports

    out_dir = _output_dir(config.out_dir)
    device = resolve_device(config.device)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = _load_average()
    with _torch_threads(config.threads):
        timer = StageTimer(announce=config.progress)
        figures: dict[str, str] = {}
        with timer.stage("data"):
            data = load_digits_data(config.id_classes, test_fraction=config.test_fraction, seed=config.seed)
            test_sets = _ood_test_sets(data, config)
            rotated = _rotated_test_images(data, config)
            figures["data"] = _figure_data(data, test_sets, out_dir)
        with timer.stage("decoder"):
            decoder, decoder_info = _trained_decoder(config, data, device, out_dir)
            anchors = decoder.token_embeddings
            anchors.save(out_dir / "artifacts" / "anchors")
            decoder_info["class_fidelity"] = _decoder_fidelity(decoder, anchors, data, config, out_dir, figures)
        seed_runs = []
        for seed in range(config.seed, config.seed + config.seeds):
            seed_runs.append(
                _run_seed(seed, config, data, decoder, anchors, test_sets, rotated, device, out_dir, timer, figures)
            )
        torch_threads = torch.get_num_threads()
    environment = _environment(device, torch_threads, started, load_before)
    metrics = _metrics(config, data, test_sets, rotated, decoder_info, seed_runs, timer, environment, figures)
    with atomic_write(out_dir / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2, allow_nan=False)
    report_md, report_html = write_reports(metrics, out_dir)
    summary = print_summary(metrics, out_dir, enabled=True)
    return DemoResult(out_dir=out_dir, metrics=metrics, report_md=report_md, report_html=report_html, summary=summary)


# ---------------------------------------------------------------------------------------------------- stages


def _ood_test_sets(data: DigitsData, config: DemoConfig) -> dict[str, Tensor]:
    """Near-OOD digits, the far-OOD sets and their intensity-matched versions, in report order."""
    far = far_ood_sets(config.far_ood_per_set, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    matched = {
        f"{name}, matched": match_intensity(images, data.train_images, generator=generator)
        for name, images in far.items()
    }
    return {NEAR_OOD: data.near_ood_images, **far, **matched}


def _rotated_test_images(data: DigitsData, config: DemoConfig) -> Tensor:
    """The shifted ID test set of the generalisation table: every test digit rotated by a seeded random angle."""
    from dreamood.baselines import rotate_images

    return rotate_images(data.test_images, config.rotation_degrees, seed=config.seed)


def _decoder_cache_key(config: DemoConfig, data: DigitsData) -> str:
    """SHA-256 of everything that determines the trained decoder: its settings and the training data."""
    import dreamood

    digest = hashlib.sha256()
    digest.update(f"dreamood {dreamood.__version__}".encode())
    digest.update(json.dumps(_decoder_settings(config, data), sort_keys=True).encode())
    digest.update(data.train_images.numpy().tobytes())
    digest.update(data.train_labels.numpy().tobytes())
    return digest.hexdigest()


def _decoder_settings(config: DemoConfig, data: DigitsData) -> dict[str, Any]:
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


def _trained_decoder(
    config: DemoConfig, data: DigitsData, device: torch.device, out_dir: Path
) -> tuple[InDomainDiffusionDecoder, dict[str, Any]]:
    """Load the decoder from the cache, or train it (and cache it); save a copy among the run's artefacts."""
    settings = _decoder_settings(config, data)
    key = _decoder_cache_key(config, data)
    cache = (Path(config.cache_dir) if config.cache_dir else default_cache_dir()) / "demo-decoders" / key[:24]
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
            _save_decoder(decoder, cache)
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


def _save_decoder(decoder: InDomainDiffusionDecoder, cache: Path) -> None:
    """Write the decoder into a temporary folder, then move it into place, so a cache entry is never partial."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        decoder.save_pretrained(staging)
        with contextlib.suppress(OSError):  # another run may have cached the same decoder meanwhile
            os.replace(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _decoder_fidelity(
    decoder: InDomainDiffusionDecoder,
    anchors: TokenEmbeddings,
    data: DigitsData,
    config: DemoConfig,
    out_dir: Path,
    figures: dict[str, str],
) -> dict[str, Any]:
    """Decode T(y) and measure how often a pixel classifier trained on real digits recognises the class."""
    from sklearn.linear_model import LogisticRegression

    per_class = 4 if config.quick else 20
    labels = torch.arange(anchors.num_classes).repeat_interleave(per_class)
    samples = EmbeddingSamples(anchors.vectors[labels], labels, config={"sampler": "anchors T(y)"})
    images, _ = _decode(decoder, samples, out_dir / "artifacts" / "decoded_anchors", config, seed=config.seed)
    pixels = LogisticRegression(max_iter=2000).fit(data.train_images.flatten(1).numpy(), data.train_labels.numpy())
    accuracy = float(pixels.score(images.flatten(1).numpy(), labels.numpy()))
    real_accuracy = float(pixels.score(data.test_images.flatten(1).numpy(), data.test_labels.numpy()))
    rows = [data.train_images[data.train_labels == c] for c in range(anchors.num_classes)]
    rows = [part for c, real in enumerate(rows) for part in (real, images[labels == c])]
    names = [text for name in anchors.class_names for text in (f"{name}: real digits", f"{name}: decoded T(y)")]
    figures["decoder"] = _save_rows(rows, names, out_dir / "figures" / "decoded_anchors.png", 12)
    return {
        "images_per_class": per_class,
        "pixel_classifier_accuracy_on_decoded": accuracy,
        "pixel_classifier_accuracy_on_real_test": real_accuracy,
        "mean_intensity_decoded": float(images.mean()),
        "mean_intensity_real": float(data.train_images.mean()),
    }


def _run_seed(
    seed: int,
    config: DemoConfig,
    data: DigitsData,
    decoder: InDomainDiffusionDecoder,
    anchors: TokenEmbeddings,
    test_sets: Mapping[str, Tensor],
    rotated: Tensor,
    device: torch.device,
    out_dir: Path,
    timer: StageTimer,
    figures: dict[str, str],
) -> _SeedRun:
    """Phases 1-3, the baselines, the OOD evaluation and the generalisation table for one seed."""
    from dreamood.sampling.knn_boundary import KNNBoundarySampler
    from dreamood.sampling.token_samplers import GaussianTokenNoiseSampler

    seed_dir = out_dir / f"seed-{seed}"
    first = seed == config.seed
    with timer.stage("phase 1: encoder + feature bank", f"seed {seed}"):
        encoder, encoder_accuracy = _train_encoder(seed, config, data, anchors, device, seed_dir)
        bank = FeatureBank.from_encoder(
            encoder, _loader(data.train_images, data.train_labels, 256), num_classes=data.num_classes,
            device=device, show_progress=config.progress,
        )  # fmt: skip
        bank.save(seed_dir / "artifacts" / "feature_bank")
    with timer.stage("phase 2: outlier embeddings", f"seed {seed}"):
        smallest = int(bank.class_counts.min())
        sigma = config.effective_sigma(anchors.dim)
        sampler_kwargs = _sampler_settings(config, smallest)
        sampler = KNNBoundarySampler(
            **sampler_kwargs, sigma=sigma, seed=seed, device=device, show_progress=config.progress
        )
        outliers = sampler.sample(bank, anchors, config.outliers_per_class)
        outliers.save(seed_dir / "artifacts" / "outlier_embeddings")
        noise_std = config.effective_token_noise_std(anchors.dim, float(anchors.norms.mean()))
        noisy = GaussianTokenNoiseSampler(noise_std, seed=seed, device=device).sample(
            bank, anchors, config.outliers_per_class
        )
        noisy.save(seed_dir / "artifacts" / "token_noise_embeddings")
        if first:
            from dreamood.viz import plot_embeddings

            path = out_dir / "figures" / "embeddings.png"
            method: Literal["tsne", "pca"] = "pca" if config.quick else "tsne"
            plot_embeddings(
                bank, outliers, anchors, method=method, path=path, max_points_per_class=100, seed=seed,
                title=f"{'t-SNE' if method == 'tsne' else 'PCA'}: ID embeddings, anchors T(y), DREAM-OOD outliers",
            )  # fmt: skip
            figures["embeddings"] = str(path.relative_to(out_dir))
    with timer.stage("decoding outliers", f"seed {seed}"):
        dream_images, _ = _decode(decoder, outliers, seed_dir / "outliers" / "dream-ood", config, seed=seed)
        noise_images, _ = _decode(decoder, noisy, seed_dir / "outliers" / "token-noise", config, seed=seed)
        if first:
            figures["sigmas"] = _figure_sigmas(decoder, bank, anchors, sampler_kwargs, sigma, config, out_dir, seed)
            figures["outliers"] = _figure_outliers(dream_images, noise_images, outliers, data, out_dir)
    run = _SeedRun(
        seed=seed,
        encoder_test_accuracy=encoder_accuracy,
        sampler_settings={**sampler_kwargs, "sigma": sigma, "num_per_class": config.outliers_per_class},
        token_noise_std=noise_std,
        npos_sigma=float("nan"),
    )
    with timer.stage("phase 3: classifiers", f"seed {seed}: {', '.join(METHODS.values())}"):
        models = _train_classifiers(seed, config, data, dream_images, noise_images, device, seed_dir, run)
    with timer.stage("OOD baselines: GODIN, GAN", f"seed {seed}"):
        baselines = _train_ood_baselines(seed, config, data, device, seed_dir, run)
    with timer.stage("evaluation", f"seed {seed}"):
        _evaluate(models, baselines, config, data, test_sets, device, seed_dir, run)
    with timer.stage("generalisation: DREAM-ID inliers", f"seed {seed}"):
        inliers = _decode_inliers(seed, config, bank, anchors, decoder, device, seed_dir, run)
    with timer.stage("generalisation: classifiers", f"seed {seed}: {', '.join(list(GENERALIZATION)[1:-1])}"):
        extra = _appended_images(seed, config, data, inliers)
        generalists = _train_generalization(seed, config, data, extra, device, seed_dir, run)
        if first:
            figures["generalization"] = _figure_generalization(data, extra, rotated, out_dir)
    sets = {"ID test": data.test_images, ROTATED: rotated}
    with timer.stage("generalisation: accuracy", f"seed {seed}"):
        for key, model in {"ce": models["ce"], **generalists}.items():
            run.generalization[key] = _accuracies(model, sets, data, device)
    with timer.stage("generalisation: MEMO", f"seed {seed}: {config.memo_augmentations} copies per test image"):
        run.generalization["memo"] = _accuracies(_memo(models["ce"], seed, config, device), sets, data, device)
    return run


def _sampler_settings(config: DemoConfig, smallest_class: int, *, inlier: bool = False) -> dict[str, Any]:
    """k, anchor set and anchors per round scaled from the paper's ImageNet-100 values to the bank's class size.

    Outliers: the DREAM-OOD setting (boundary 200 of 1,000, 50 anchors per round, keep 2); inliers: the
    DREAM-ID setting (all 1,000 as anchor set, 100 anchors per round, keep 1).
    """
    boundary_fraction = config.inlier_boundary_fraction if inlier else config.boundary_fraction
    anchors_fraction = config.inlier_anchors_fraction if inlier else config.anchors_fraction
    keep = 1 if inlier else config.keep_per_anchor
    k = max(1, min(smallest_class - 1, round(config.k_fraction * smallest_class)))
    boundary = max(1, min(smallest_class, round(boundary_fraction * smallest_class)))
    anchors = max(1, min(boundary, round(anchors_fraction * boundary)))
    return {
        "k": k,
        "boundary_size": boundary,
        "anchors_per_round": anchors,
        "candidates_per_anchor": config.candidates_per_anchor,
        "keep_per_anchor": min(keep, config.candidates_per_anchor),
    }


def _train_encoder(
    seed: int, config: DemoConfig, data: DigitsData, anchors: TokenEmbeddings, device: torch.device, seed_dir: Path
) -> tuple[TextConditionedEncoder, float]:
    """Phase 1 (paper Eq. 2): a SmallConvNet + projection aligned to the frozen anchors T(y)."""
    from dreamood.encoder import fit_encoder
    from dreamood.models import SmallConvNet

    with _seeded(seed):
        backbone = SmallConvNet(1, config.encoder_feature_dim, width=config.encoder_width)
        encoder = TextConditionedEncoder(backbone, config.encoder_feature_dim, anchors, temperature=0.1)
    fit_encoder(
        encoder,
        _loader(data.train_images, data.train_labels, config.encoder_batch_size, shuffle_seed=seed),
        config.encoder_epochs,
        lr=config.encoder_lr,
        device=device,
        checkpoint_dir=seed_dir / "artifacts" / "encoder",
        show_progress=config.progress,
        seed=seed,
    )
    with torch.no_grad():
        logits = encoder(data.test_images.to(device))
    accuracy = float((logits.argmax(dim=1).cpu() == data.test_labels).float().mean())
    return encoder, accuracy


def _decode(
    decoder: InDomainDiffusionDecoder, samples: EmbeddingSamples, folder: Path, config: DemoConfig, *, seed: int
) -> tuple[Tensor, Tensor]:
    """Render ``samples`` into ``folder`` and read them back in the digits' format ``(N, 1, 8, 8)``, 17 levels.

    Returns:
        The images and their labels, in the order of ``samples``.
    """
    from dreamood.data.generated import GeneratedImageFolder

    generate_images(
        decoder,
        samples,
        folder,
        batch_size=config.decode_batch_size,
        seed=seed,
        show_progress=config.progress,
        overwrite=True,
    )
    dataset = GeneratedImageFolder(folder, image_size=int(decoder.image_size), mode="L")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    levels = DIGIT_LEVELS - 1
    return torch.round(images * levels) / levels, torch.tensor(dataset.targets, dtype=torch.int64)


def _recipe(config: DemoConfig) -> TrainingConfig:
    """The recipe every classifier of the demo is trained with: the paper's SGD, cosine schedule, weight decay."""
    return TrainingConfig(epochs=config.classifier_epochs, lr=config.classifier_lr)


def _train(
    key: str,
    model: nn.Module,
    config: DemoConfig,
    data: DigitsData,
    recipe: TrainingConfig,
    seed_dir: Path,
    run: _SeedRun,
    device: torch.device,
    train: Callable[..., TrainingResult] | None = None,
    **inputs: Any,
) -> nn.Module:
    """Train ``model`` on the ID training digits (with ``inputs``: outliers, extra images, ...), in place.

    ``train`` is the training function: :func:`~dreamood.training.train_classifier` by default, or a wrapper of
    it such as :func:`~dreamood.baselines.train_godin`. Either writes its checkpoint and history to
    ``seed_dir/classifiers/<key>/``; the loop's seed is the run's. Every model sees the same ID batches in the
    same order.

    Returns:
        The trained model, in eval mode.
    """
    from dreamood.training import train_classifier

    folder = seed_dir / "classifiers" / key
    id_loader = _loader(data.train_images, data.train_labels, config.classifier_batch_size, shuffle_seed=run.seed)
    result = (train or train_classifier)(
        model,
        id_loader,
        recipe,
        device=str(device),
        seed=run.seed,
        output_dir=folder,
        progress=config.progress,
        **inputs,
    )
    run.train_accuracy[key] = result.final.accuracy
    return model.eval()


def _train_classifiers(
    seed: int,
    config: DemoConfig,
    data: DigitsData,
    dream_images: Tensor,
    noise_images: Tensor,
    device: torch.device,
    seed_dir: Path,
    run: _SeedRun,
) -> dict[str, nn.Module]:
    """Phase 3: the same classifier (architecture, initial weights, recipe) trained five ways."""
    from dreamood.sampling.feature_samplers import NPOSSampler, VOSSampler
    from dreamood.training import EnergyOODRegularizer

    recipe = replace(_recipe(config), beta=config.beta)
    feature_start = min(config.classifier_epochs - 1, round(config.feature_ood_start * config.classifier_epochs))
    models: dict[str, nn.Module] = {}
    for key in METHODS:
        with _seeded(seed):
            model = _classifier(config, data.num_classes)
            regularizer = EnergyOODRegularizer(head=config.ood_head)
        options: dict[str, Any] = {}
        key_recipe = recipe
        if key in ("dream_ood", "token_noise"):
            images = dream_images if key == "dream_ood" else noise_images
            options["outlier_loader"] = _loader(images, None, config.classifier_batch_size, shuffle_seed=seed + 1)
            options["regularizer"] = regularizer
        elif key in ("vos", "npos"):
            queue = min(config.feature_queue_size, int(torch.bincount(data.train_labels).min()))
            sampler: VOSSampler | NPOSSampler
            if key == "vos":
                sampler = VOSSampler(data.num_classes, queue_size=queue, seed=seed)
            else:
                run.npos_sigma = 0.1 * _mean_feature_norm(models["ce"], data.train_images, device)
                sampler = NPOSSampler(
                    data.num_classes,
                    queue_size=queue,
                    k=max(1, min(queue - 1, round(0.1 * queue))),
                    num_boundary=max(2, round(0.05 * queue)),
                    num_anchors=2,
                    sigma=run.npos_sigma,
                    seed=seed,
                )
            options.update(
                feature_sampler=sampler,
                feature_extractor=model.features,
                classifier_head=model.head,
                regularizer=regularizer,
            )
            key_recipe = replace(recipe, ood_start_epoch=feature_start)
        models[key] = _train(key, model, config, data, key_recipe, seed_dir, run, device, **options)
    return models


def _train_ood_baselines(
    seed: int, config: DemoConfig, data: DigitsData, device: torch.device, seed_dir: Path, run: _SeedRun
) -> dict[str, _Scoring]:
    """GODIN and GAN-based outliers: the classifier of Phase 3 (same backbone and recipe), each scored its way.

    GODIN (Hsu et al., CVPR 2020) replaces the linear head by ``h(x) / g(x)``, trains without weight decay on
    ``h``, and scores ``max_i h_i`` of an input perturbed by the ``epsilon`` that maximises the mean score of
    ID images; the ID training digits serve as its validation data (no OOD or test image is used). The
    ``epsilon = 0`` row scores the unperturbed ``max_i h_i``. The GAN baseline (Lee et al., ICLR 2018) trains
    a DCGAN with the classifier so that its samples lie at the boundary of the ID data, and the classifier
    is pushed to a uniform prediction on them; it is scored with the maximum softmax probability.

    Returns:
        For each row of :data:`OOD_BASELINES`, the scorer, the model the evaluator runs, and the classifier whose
        accuracy the row reports when the evaluator cannot measure it.
    """
    from dreamood.baselines import GODIN, ConfidenceGAN, GodinClassifier, UniformKLRegularizer, train_godin
    from dreamood.evaluation import max_logit_score, msp_score
    from dreamood.models import SmallConvNet

    recipe = _recipe(config)
    with _seeded(seed):
        backbone = SmallConvNet(1, config.classifier_feature_dim, width=config.classifier_width)
        godin_model = GodinClassifier(backbone, data.num_classes, similarity=config.godin_similarity)
    _train("godin", godin_model, config, data, recipe, seed_dir, run, device, train=train_godin)
    detector = GODIN(godin_model, device=device).fit(data.train_images)
    run.godin_epsilon = detector.epsilon_
    run.godin_validation_scores = {f"{eps:g}": score for eps, score in detector.validation_scores_.items()}

    with _seeded(seed):
        gan_model = _classifier(config, data.num_classes)
    gan = ConfidenceGAN(
        image_size=int(data.train_images.shape[-1]),
        channels=int(data.train_images.shape[1]),
        generator_width=config.gan_width,
        discriminator_width=config.gan_width,
        beta=config.gan_beta,
        seed=seed,
        device=device,
    )
    real = _loader(data.train_images, None, config.classifier_batch_size, shuffle_seed=seed + 2)
    outliers = gan.outlier_loader(real, gan_model)
    gan_model = _train(
        "gan",
        gan_model,
        config,
        data,
        replace(recipe, beta=gan.beta),
        seed_dir,
        run,
        device,
        outlier_loader=outliers,
        regularizer=UniformKLRegularizer(),
        extra_state={"gan": outliers},
    )
    save_checkpoint(seed_dir / "classifiers" / "gan" / "dcgan.pt", {"model": gan.state_dict()})
    return {
        "godin": _Scoring(detector, None, godin_model),
        "godin_eps0": _Scoring(max_logit_score, godin_model.similarity_model(), None),
        "gan": _Scoring(msp_score, gan_model, None),
    }


def _classifier(config: DemoConfig, num_classes: int) -> Any:
    from dreamood.models import Classifier, SmallConvNet

    backbone = SmallConvNet(1, config.classifier_feature_dim, width=config.classifier_width)
    return Classifier(backbone, num_classes)


@torch.no_grad()
def _mean_feature_norm(model: nn.Module, images: Tensor, device: torch.device) -> float:
    features = model.features(images.to(device))  # type: ignore[operator]
    return float(features.norm(dim=1).mean())


def _evaluate(
    models: Mapping[str, nn.Module],
    baselines: Mapping[str, _Scoring],
    config: DemoConfig,
    data: DigitsData,
    test_sets: Mapping[str, Tensor],
    device: torch.device,
    seed_dir: Path,
    run: _SeedRun,
) -> None:
    """Energy scores of models (a)-(e), the baselines' own scores, post-hoc detectors on model (a), pixel mean."""
    from dreamood.baselines import classification_accuracy
    from dreamood.detectors import KNN, MSP, Mahalanobis, MaxLogit, ReAct, ViM
    from dreamood.evaluation import OODEvaluator, energy_score

    id_loader = _loader(data.test_images, data.test_labels, 512)
    ood_loaders = {name: _loader(images, None, 512) for name, images in test_sets.items()}

    def evaluate(
        key: str,
        scorer: Any,
        model: Callable[[Tensor], Tensor] | None,
        accuracy: bool = True,
        accuracy_of: nn.Module | None = None,
    ) -> None:
        evaluator = OODEvaluator(scorer, model=model, accuracy=accuracy, device=device, progress=False)
        report = evaluator.evaluate(id_loader, ood_loaders)
        if accuracy_of is not None:
            measured = classification_accuracy(accuracy_of, id_loader, device=device, progress_bar=False)
            report = replace(report, id_accuracy=measured)
        report.to_json(seed_dir / "reports" / f"{key}.json")
        run.reports[key] = report.to_dict()

    for key, model in models.items():
        evaluate(key, energy_score, model)
    for key, scoring in baselines.items():
        # A scorer of images (GODIN) gets no model; the accuracy then comes from its classifier.
        evaluate(key, scoring.scorer, scoring.model, scoring.classifier is None, scoring.classifier)

    baseline: Any = models["ce"]
    train_images = data.train_images.to(device)
    with torch.no_grad():
        train_logits, train_features = baseline.forward_with_features(train_images)
    train_labels = data.train_labels.to(device)
    knn_k = max(1, round(PAPER_KNN_DETECTOR_K * len(data.train_labels) / PAPER_KNN_DETECTOR_TRAIN))
    posthoc: dict[str, tuple[Any, bool]] = {
        "posthoc_msp": (MSP(), False),
        "posthoc_maxlogit": (MaxLogit(), False),
        "posthoc_mahalanobis": (Mahalanobis().fit(train_features, train_labels), True),
        "posthoc_knn": (KNN(k=knn_k).fit(train_features), True),
        "posthoc_vim": (ViM(baseline.head).fit(train_features), True),
        "posthoc_react": (ReAct(baseline.head).fit(train_features), True),
    }
    del train_logits
    for key, (detector, on_features) in posthoc.items():
        evaluate(key, detector, baseline.features if on_features else baseline, accuracy=not on_features)

    reference = float(data.train_images.mean(dim=(1, 2, 3)).mean())

    def pixel_mean_score(images: Tensor) -> Tensor:
        return -(images.mean(dim=(1, 2, 3)) - reference).abs()

    evaluate("pixel_mean", pixel_mean_score, None, accuracy=False)


# ---------------------------------------------------------------------------------------------------- generalisation


def _decode_inliers(
    seed: int,
    config: DemoConfig,
    bank: FeatureBank,
    anchors: TokenEmbeddings,
    decoder: InDomainDiffusionDecoder,
    device: torch.device,
    seed_dir: Path,
    run: _SeedRun,
) -> tuple[Tensor, Tensor]:
    """DREAM-ID's inliers: embeddings drawn around the densest bank points of each class, decoded, labelled."""
    from dreamood.sampling.knn_boundary import KNNBoundarySampler

    settings = _sampler_settings(config, int(bank.class_counts.min()), inlier=True)
    sigma = config.effective_inlier_sigma(anchors.dim)
    run.inlier_sampler_settings = {**settings, "sigma": sigma, "num_per_class": config.inliers_per_class}
    sampler = KNNBoundarySampler(
        **settings, sigma=sigma, mode="inlier", seed=seed, device=device, show_progress=config.progress
    )
    samples = sampler.sample(bank, anchors, config.inliers_per_class)
    samples.save(seed_dir / "artifacts" / "inlier_embeddings")
    return _decode(decoder, samples, seed_dir / "inliers" / "dream-id", config, seed=seed)


def _appended_images(
    seed: int, config: DemoConfig, data: DigitsData, inliers: tuple[Tensor, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """The labelled images each generalisation method appends to the training digits, as many for every method.

    DREAM-ID appends its decoded inliers; each augmentation baseline appends a fixed pool of augmented copies
    of the training digits (paper Table 4), ``inliers_per_class`` per class, built once (pool item ``i`` is
    always the same image). CutMix's labels are mixtures: rows of class probabilities.
    """
    from dreamood.baselines import AUGMENTATIONS, AugmentedPool

    train_set = TensorDataset(data.train_images, data.train_labels)
    extra = {"dream_id": inliers}
    for method in AUGMENTATIONS:
        pool = AugmentedPool(
            train_set, method, num_per_class=config.inliers_per_class, num_classes=data.num_classes, seed=seed
        )
        images, labels = zip(*(pool[i] for i in range(len(pool))))
        targets = torch.stack(labels) if method == "cutmix" else torch.tensor(labels, dtype=torch.int64)
        extra[method] = (torch.stack(images), targets)
    return extra


def _train_generalization(
    seed: int,
    config: DemoConfig,
    data: DigitsData,
    extra: Mapping[str, tuple[Tensor, Tensor]],
    device: torch.device,
    seed_dir: Path,
    run: _SeedRun,
) -> dict[str, nn.Module]:
    """The classifier of model (a) trained from scratch on the training digits plus each method's extra images.

    Every step adds a batch of the extra images to the ID batch, as DREAM-ID's training does (paper Sec. 5);
    CutMix's mixed labels are target distributions, which :func:`~dreamood.training.train_classifier` takes as
    they are.
    """
    recipe = _recipe(config)
    models: dict[str, nn.Module] = {}
    for key, (images, labels) in extra.items():
        with _seeded(seed):
            model = _classifier(config, data.num_classes)
        synthetic = _loader(images, labels, config.classifier_batch_size, shuffle_seed=seed + 1)
        models[key] = _train(key, model, config, data, recipe, seed_dir, run, device, synthetic_id_loader=synthetic)
    return models


def _accuracies(
    model: Callable[[Tensor], Tensor], sets: Mapping[str, Tensor], data: DigitsData, device: torch.device
) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on every version of the ID test set (all share the test labels)."""
    from dreamood.baselines import classification_accuracy

    return {
        name: classification_accuracy(model, _loader(images, data.test_labels, 512), device=device, progress_bar=False)
        for name, images in sets.items()
    }


def _memo(model: nn.Module, seed: int, config: DemoConfig, device: torch.device) -> Callable[[Tensor], Tensor]:
    """MEMO test-time adaptation (Zhang et al., NeurIPS 2022) of ``model``, restored exactly after every image."""
    from dreamood.baselines import MEMO

    return MEMO(
        model,
        num_augmentations=config.memo_augmentations,
        lr=config.memo_lr,
        prior_strength=config.memo_prior_strength,
        seed=seed,
        device=device,
        progress=config.progress,
    )


# ---------------------------------------------------------------------------------------------------- figures


def _save_rows(rows: list[Tensor], labels: list[str], path: Path, columns: int) -> str:
    """Save one labelled mosaic row per entry of ``rows`` (each cut or padded to ``columns`` images)."""
    from dreamood.demo.figures import save_mosaic

    padded = [torch.cat([r[:columns], torch.ones(max(0, columns - len(r)), *r.shape[1:])]) for r in rows]
    save_mosaic(torch.cat(padded), path, columns, labels)
    return str(Path("figures") / path.name)


def _figure_data(data: DigitsData, test_sets: Mapping[str, Tensor], out_dir: Path) -> str:
    rows = [data.train_images, *test_sets.values()]
    return _save_rows(rows, ["ID training digits", *test_sets], out_dir / "figures" / "data.png", 16)


def _figure_sigmas(
    decoder: InDomainDiffusionDecoder,
    bank: FeatureBank,
    anchors: TokenEmbeddings,
    sampler_kwargs: Mapping[str, Any],
    sigma: float,
    config: DemoConfig,
    out_dir: Path,
    seed: int,
) -> str:
    """Decoded outliers for several noise levels (the paper's Fig. 5): one row per sigma, two per class."""
    from dreamood.sampling.knn_boundary import KNNBoundarySampler

    rows, labels = [], []
    for multiplier in config.sigma_multipliers:
        value = multiplier * sigma
        sampler = KNNBoundarySampler(**sampler_kwargs, sigma=value, seed=seed, show_progress=False)
        samples = sampler.sample(bank, anchors, 2)
        folder = out_dir / "artifacts" / "sigma_grid" / f"sigma-{value:.4f}"
        rows.append(_decode(decoder, samples, folder, replace(config, progress=False), seed=seed)[0])
        labels.append(f"sigma = {value:.3g} ({multiplier:g}x)")
    return _save_rows(rows, labels, out_dir / "figures" / "outliers_by_sigma.png", len(rows[0]))


def _figure_outliers(
    dream_images: Tensor, noise_images: Tensor, outliers: EmbeddingSamples, data: DigitsData, out_dir: Path
) -> str:
    """Real ID digits, DREAM-OOD outliers and Table 2 (I) outliers of every class side by side."""
    rows, labels = [], []
    for class_index, name in enumerate(data.class_names):
        mask = outliers.labels.cpu() == class_index
        rows += [data.train_images[data.train_labels == class_index], dream_images[mask], noise_images[mask]]
        labels += [f"{name}: real digits", f"{name}: DREAM-OOD", f"{name}: noise on T(y)"]
    return _save_rows(rows, labels, out_dir / "figures" / "outliers.png", 12)


def _figure_generalization(
    data: DigitsData, extra: Mapping[str, tuple[Tensor, Tensor]], rotated: Tensor, out_dir: Path
) -> str:
    """Class 0 in every version the generalisation table uses: test, rotated test, training, appended images."""
    name = data.class_names[0]
    rows = [data.test_images[data.test_labels == 0], rotated[data.test_labels == 0]]
    rows.append(data.train_images[data.train_labels == 0])
    labels = [f"{name}: ID test digits", f"{name}: rotated test digits", f"{name}: training digits"]
    for key, (images, targets) in extra.items():
        classes = targets.argmax(dim=1) if targets.is_floating_point() else targets
        rows.append(images[classes == 0])
        labels.append(GENERALIZATION[key])
    return _save_rows(rows, labels, out_dir / "figures" / "generalization.png", 12)


# ---------------------------------------------------------------------------------------------------- results


def _metrics(
    config: DemoConfig,
    data: DigitsData,
    test_sets: Mapping[str, Tensor],
    rotated: Tensor,
    decoder_info: dict[str, Any],
    seed_runs: list[_SeedRun],
    timer: StageTimer,
    environment: dict[str, Any],
    figures: dict[str, str],
) -> dict[str, Any]:
    """Everything ``metrics.json`` holds: settings, data, per-seed reports, aggregates, timings."""
    from dreamood.demo.report import aggregate, aggregate_accuracy

    keys = list(seed_runs[0].reports)
    per_seed = {key: [run.reports[key] for run in seed_runs] for key in keys}
    return {
        "config": config.to_dict(),
        "environment": environment,
        "data": {
            "id_classes": list(data.id_classes),
            "class_names": list(data.class_names),
            "train": len(data.train_labels),
            "test": len(data.test_labels),
            "ood_sets": {name: len(images) for name, images in test_sets.items()},
            "mean_intensity": {
                "ID train": float(data.train_images.mean()),
                **{name: float(images.mean()) for name, images in test_sets.items()},
            },
            "groups": set_groups(),
        },
        "decoder": decoder_info,
        "seeds": [
            {
                "seed": run.seed,
                "encoder_test_accuracy": run.encoder_test_accuracy,
                "sampler": run.sampler_settings,
                "token_noise_std": run.token_noise_std,
                "npos_sigma": run.npos_sigma,
                "godin_epsilon": run.godin_epsilon,
                "godin_validation_scores": run.godin_validation_scores,
                "inlier_sampler": run.inlier_sampler_settings,
                "train_accuracy": run.train_accuracy,
                "generalization": run.generalization,
            }
            for run in seed_runs
        ],
        "reports": per_seed,
        "aggregate": {key: aggregate(reports) for key, reports in per_seed.items()},
        "generalization": {
            "sets": {"ID test": len(data.test_labels), ROTATED: len(rotated)},
            "mean_intensity": {"ID test": float(data.test_images.mean()), ROTATED: float(rotated.mean())},
            "aggregate": aggregate_accuracy([run.generalization for run in seed_runs]),
        },
        "timings_s": dict(timer.seconds),
        "cpu_timings_s": dict(timer.cpu_seconds),
        "total_s": timer.total,
        "total_cpu_s": sum(timer.cpu_seconds.values()),
        "figures": figures,
        "paper_reference": {
            "bank_per_class": PAPER_BANK_PER_CLASS,
            "k": PAPER_K,
            "boundary": PAPER_BOUNDARY,
            "anchors_per_round": PAPER_ANCHORS_PER_ROUND,
        },
    }


# ---------------------------------------------------------------------------------------------------- helpers


def _loader(
    images: Tensor, labels: Tensor | None, batch_size: int, *, shuffle_seed: int | None = None
) -> DataLoader[Any]:
    """A DataLoader over in-memory tensors; shuffled by a generator seeded with ``shuffle_seed`` when given."""
    dataset = TensorDataset(images) if labels is None else TensorDataset(images, labels)
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle_seed is not None, generator=generator)


def _output_dir(out_dir: str | None) -> Path:
    path = Path(out_dir) if out_dir else Path.cwd() / time.strftime("dreamood-demo-%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    (path / "figures").mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU random state seeded by ``seed``; restore the previous state afterwards.

    Modules initialise their weights from the global state; seeding it here makes every model of a seed start
    from the same weights whatever ran before (a decoder trained or loaded from the cache, for example).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _environment(device: torch.device, threads: int, started: str, load_before: list[float] | None) -> dict[str, Any]:
    import dreamood

    info: dict[str, Any] = {
        "started": started,
        "dreamood": dreamood.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
