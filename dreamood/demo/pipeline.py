"""The DREAM-OOD pipeline of ``dreamood demo``, stage by stage, on the library's :class:`~dreamood.pipeline.Pipeline`.

Du, Sun, Zhu, Li. "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023. The
stand-in for Stable Diffusion is an :class:`~dreamood.decoding.in_domain.InDomainDiffusionDecoder` trained on
the ID digits; its learned class embeddings are the anchors ``T(y)``. Stages:

1. data: ID digits, near-OOD digits, far-OOD photographs in two versions (raw, intensity-matched);
2. decoder: train (or load from the cache) the diffusion decoder, decode ``T(y)``;
3. per seed, DREAM-OOD as a :class:`~dreamood.pipeline.Pipeline` (:mod:`dreamood.demo.dream_ood`): anchors,
   Phase 1 encoder and feature bank, Phase 2 outlier embeddings, their decoding, the classifier and its report;
4. the demo's own experiments (:mod:`dreamood.demo.experiments`): the Table 2 (I) outliers (Gaussian noise on
   ``T(y)``), the same classifier trained with cross-entropy only, with them, with VOS and with NPOS; GODIN
   (Hsu et al., CVPR 2020) and GAN-based outliers (Lee et al., ICLR 2018); post-hoc detectors on the
   cross-entropy model; every model evaluated on every OOD set;
5. generalisation (:mod:`dreamood.demo.generalization`, DREAM-ID, Sec. 5): inliers sampled around the densest
   embeddings and decoded, the augmentation baselines (RandAugment, AutoAugment, AugMix, CutMix) appended in
   the same number, and MEMO (Zhang et al., NeurIPS 2022) on the cross-entropy model; top-1 accuracy on the
   ID test digits and on a rotated copy of them;
6. the report (:mod:`dreamood.demo.report`), which owns the method labels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreamood._utils import resolve_device
from dreamood.demo.config import (
    PAPER_ANCHORS_PER_ROUND,
    PAPER_BANK_PER_CLASS,
    PAPER_BOUNDARY,
    PAPER_K,
    DemoConfig,
)
from dreamood.demo.context import DemoRun, SeedRun, StageTimer, read_digits
from dreamood.demo.data import DigitsData, far_ood_sets, load_digits_data, match_intensity
from dreamood.demo.decoder import decoder_fidelity, trained_decoder
from dreamood.demo.dream_ood import DigitsPipeline
from dreamood.demo.experiments import evaluate, token_noise_outliers, train_classifiers, train_ood_baselines
from dreamood.demo.figures import (
    figure_data,
    figure_embeddings,
    figure_generalization,
    figure_outliers,
    figure_sigmas,
)
from dreamood.demo.generalization import appended_images, decode_inliers, generalization, train_generalization
from dreamood.demo.labels import GENERALIZATION, METHODS, NEAR_OOD, ROTATED, set_groups
from dreamood.demo.report import aggregate, aggregate_accuracy, print_summary, write_reports
from dreamood.io import atomic_write

__all__ = ["DemoResult", "StageTimer", "run_demo"]

logger = logging.getLogger("dreamood.demo")


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


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the whole demo and write its report; see the module documentation for the stages.

    Stage headers and notes go to the ``dreamood.demo`` logger; the summary is printed to standard output.

    Args:
        config: What to run.

    Returns:
        The output folder, the metrics and the paths of the reports.

    Raises:
        ValueError: An invalid setting (for example ``id_classes``).
    """
    out_dir = _output_dir(config.out_dir)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = _load_average()
    with _torch_threads(config.threads):
        demo = _prepare(config, out_dir)
        seed_runs = [_run_seed(SeedRun(demo, seed)) for seed in range(config.seed, config.seed + config.seeds)]
        torch_threads = torch.get_num_threads()
    environment = _environment(demo.device, torch_threads, started, load_before)
    metrics = _metrics(demo, seed_runs, environment)
    with atomic_write(out_dir / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2, allow_nan=False)
    report_md, report_html = write_reports(metrics, out_dir)
    logger.info("report written: %s", report_html)
    summary = print_summary(metrics, out_dir, enabled=True)
    return DemoResult(out_dir=out_dir, metrics=metrics, report_md=report_md, report_html=report_html, summary=summary)


def _prepare(config: DemoConfig, out_dir: Path) -> DemoRun:
    """The stages every seed shares: the data and the trained decoder (with its fidelity check)."""
    timer = StageTimer()
    figures: dict[str, str] = {}
    device = resolve_device(config.device)
    with timer.stage("data"):
        data = load_digits_data(config.id_classes, test_fraction=config.test_fraction, seed=config.seed)
        test_sets = _ood_test_sets(data, config)
        rotated = _rotated_test_images(data, config)
        figures["data"] = figure_data(data, test_sets, out_dir)
    with timer.stage("decoder"):
        decoder, decoder_info = trained_decoder(config, data, device, out_dir)
        decoder.token_embeddings.save(out_dir / "artifacts" / "anchors")
        decoder_info["class_fidelity"] = decoder_fidelity(decoder, data, config, out_dir, figures)
    return DemoRun(config, data, test_sets, rotated, decoder, decoder_info, device, out_dir, timer, figures)


def _run_seed(run: SeedRun) -> SeedRun:
    """DREAM-OOD through the pipeline, the demo's own experiments, evaluation and generalisation for one seed."""
    timer, figures = run.demo.timer, run.demo.figures
    pipe = DigitsPipeline(run)
    dream = pipe.outliers(run)
    with timer.stage("phase 2: outlier embeddings", f"seed {run.seed}: Table 2 (I), noise on T(y)"):
        noisy = token_noise_outliers(run, dream.bank)
        if run.first:
            figures["embeddings"] = figure_embeddings(run, dream.bank, dream.outliers)
    with timer.stage("decoding outliers", f"seed {run.seed}: Table 2 (I)"):
        noise_images, _ = run.decode(noisy, run.folder / "outliers" / "token-noise")
        if run.first:
            dream_images, _ = read_digits(dream.images, int(run.demo.decoder.image_size))
            figures["sigmas"] = figure_sigmas(run, dream.bank)
            figures["outliers"] = figure_outliers(
                dream_images, noise_images, dream.outliers, run.data, run.demo.out_dir
            )
    with timer.stage("phase 3: classifiers", f"seed {run.seed}: {', '.join(METHODS.values())}"):
        models = train_classifiers(run, noise_images, lambda: pipe.classifier(run, dream.images))
    with timer.stage("OOD baselines: GODIN, GAN", f"seed {run.seed}"):
        baselines = train_ood_baselines(run)
    with timer.stage("evaluation", f"seed {run.seed}"):
        evaluate(run, models, baselines, pipe.evaluate(models["dream_ood"]))
    with timer.stage("generalisation: DREAM-ID inliers", f"seed {run.seed}"):
        inliers = decode_inliers(run, dream.bank)
    with timer.stage("generalisation: classifiers", f"seed {run.seed}: {', '.join(list(GENERALIZATION)[1:-1])}"):
        extra = appended_images(run, inliers)
        generalists = train_generalization(run, extra)
        if run.first:
            figures["generalization"] = figure_generalization(run.data, extra, run.demo.rotated, run.demo.out_dir)
    generalization(run, {"ce": models["ce"], **generalists})
    return run


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


# ---------------------------------------------------------------------------------------------------- results


def _metrics(demo: DemoRun, seed_runs: list[SeedRun], environment: dict[str, Any]) -> dict[str, Any]:
    """Everything ``metrics.json`` holds: settings, data, per-seed reports, aggregates, timings."""
    config, data, test_sets, rotated, timer = demo.config, demo.data, demo.test_sets, demo.rotated, demo.timer
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
        "decoder": demo.decoder_info,
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
        "figures": demo.figures,
        "paper_reference": {
            "bank_per_class": PAPER_BANK_PER_CLASS,
            "k": PAPER_K,
            "boundary": PAPER_BOUNDARY,
            "anchors_per_round": PAPER_ANCHORS_PER_ROUND,
        },
    }


# ---------------------------------------------------------------------------------------------------- helpers


def _output_dir(out_dir: str | None) -> Path:
    """The demo's output folder, with the temporary files of a run killed while writing a figure removed."""
    path = Path(out_dir) if out_dir else Path.cwd() / time.strftime("dreamood-demo-%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    (path / "figures").mkdir(exist_ok=True)
    for folder in (path, path / "figures"):
        for stale in folder.glob(".*.tmp"):  # atomic_write's temporaries: ".<name>.<random>.tmp"
            stale.unlink(missing_ok=True)
    return path


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
