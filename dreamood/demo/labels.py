"""The names the demo's report shows: methods, baselines, generalisation rows and OOD test-set groups.

The report owns these labels; the runner imports them to name what it trains, so both always agree.
"""

from __future__ import annotations

from typing import Literal

from dreamood.demo.data import FAR_OOD_SETS

__all__ = [
    "GENERALIZATION",
    "LABELS",
    "METHODS",
    "NEAR_OOD",
    "OOD_BASELINES",
    "POSTHOC",
    "QUICK_RUN_NOTICE",
    "ROTATED",
    "embedding_projection",
    "set_groups",
]

#: The classifiers of Phase 3, in report order: key -> label.
METHODS: dict[str, str] = {
    "ce": "(a) cross-entropy only",
    "dream_ood": "(b) DREAM-OOD",
    "token_noise": "(c) noise on T(y) (Table 2, I)",
    "vos": "(d) VOS",
    "npos": "(e) NPOS",
}

#: The OOD-detection baselines, each with its own score, in report order: key -> label.
OOD_BASELINES: dict[str, str] = {
    "godin": "(f) GODIN",
    "godin_eps0": "(f) GODIN, epsilon = 0",
    "gan": "(g) GAN outliers, MSP",
}

#: The post-hoc detectors on model (a) and the network-free pixel-mean score, in report order: key -> label.
POSTHOC: dict[str, str] = {
    "posthoc_msp": "(a) + MSP",
    "posthoc_maxlogit": "(a) + MaxLogit",
    "posthoc_mahalanobis": "(a) + Mahalanobis",
    "posthoc_knn": "(a) + KNN",
    "posthoc_vim": "(a) + ViM",
    "posthoc_react": "(a) + ReAct",
    "pixel_mean": "pixel mean (no network)",
}

#: Every row of the OOD table: key -> label.
LABELS: dict[str, str] = {**METHODS, **OOD_BASELINES, **POSTHOC}

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

#: The name of the near-OOD test set (the digits outside the ID classes).
NEAR_OOD = "near-OOD digits"
#: The name of the shifted ID test set of the generalisation table.
ROTATED = "rotated"


def set_groups() -> dict[str, list[str]]:
    """The OOD test sets of the demo by group: near-OOD, far-OOD raw and far-OOD intensity-matched."""
    return {
        "near": [NEAR_OOD],
        "far": list(FAR_OOD_SETS),
        "far_matched": [f"{name}, matched" for name in FAR_OOD_SETS],
    }


def embedding_projection(quick: bool) -> tuple[Literal["tsne", "pca"], str]:
    """How the embedding figure projects to 2-d: PCA in a quick run (fast), t-SNE otherwise (the paper's Fig. 4).

    Returns:
        The method for :func:`~dreamood.viz.plot_embeddings` and its name in text.
    """
    return ("pca", "PCA") if quick else ("tsne", "t-SNE")


#: The notice a quick run's report and summary carry.
QUICK_RUN_NOTICE = (
    "QUICK RUN (--quick): tiny networks, one or two epochs and a few images. It checks that every stage runs; its "
    "numbers mean nothing, and the findings below are read off these numbers, not conclusions."
)
