"""dreamood: DREAM-OOD outlier imagination with diffusion models for out-of-distribution detection.

The public API is importable from the top level (``from dreamood import KNNBoundarySampler``). Names are
resolved lazily, so ``import dreamood`` is fast and loads neither torch nor any model library until a
name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    # Anchors and Phase 1
    "TokenEmbeddings": "dreamood.anchors",
    "TextConditionedEncoder": "dreamood.encoder",
    "fit_encoder": "dreamood.encoder",
    "FeatureBank": "dreamood.feature_bank",
    # Phase 2
    "EmbeddingSamples": "dreamood.sampling.samples",
    "KNNBoundarySampler": "dreamood.sampling.knn_boundary",
    "ExactNearestNeighbors": "dreamood.knn",
    "knn_search": "dreamood.knn",
    "kth_neighbor_distance": "dreamood.knn",
    # Decoding
    "StableDiffusionDecoder": "dreamood.decoding.stable_diffusion",
    "StableDiffusionXLDecoder": "dreamood.decoding.sdxl",
    "load_decoder": "dreamood.decoding.backends",
    "load_anchors": "dreamood.decoding.backends",
    "InDomainDiffusionDecoder": "dreamood.decoding.in_domain",
    "generate_images": "dreamood.decoding.generation",
    "GeneratedImageFolder": "dreamood.data.generated",
    # Phase 3
    "EnergyOODRegularizer": "dreamood.training",
    "train_classifier": "dreamood.training",
    "TrainingConfig": "dreamood.training",
    # Alternatives and baselines in latent or feature space
    "GaussianTokenNoiseSampler": "dreamood.sampling.token_samplers",
    "LearnableNoiseSampler": "dreamood.sampling.token_samplers",
    "TokenInterpolationSampler": "dreamood.sampling.token_samplers",
    "DisjointClassSampler": "dreamood.sampling.token_samplers",
    "VOSSampler": "dreamood.sampling.feature_samplers",
    "NPOSSampler": "dreamood.sampling.feature_samplers",
    # Whole pipelines
    "Pipeline": "dreamood.pipeline",
    "PipelineConfig": "dreamood.config",
    "load_config": "dreamood.config",
    # Evaluation
    "OODEvaluator": "dreamood.evaluation",
    "OODReport": "dreamood.evaluation",
    "OODMetrics": "dreamood.evaluation",
    "ood_metrics": "dreamood.evaluation",
    "energy_score": "dreamood.evaluation",
    # Protocols
    "Embedder": "dreamood.protocols",
    "EmbeddingSampler": "dreamood.protocols",
    "EmbeddingDecoder": "dreamood.protocols",
    "FeatureOutlierSampler": "dreamood.protocols",
    "Scorer": "dreamood.protocols",
    # Errors
    "DreamoodError": "dreamood.errors",
    "ModelNotFoundError": "dreamood.errors",
    "ArtifactError": "dreamood.errors",
    "NonFiniteError": "dreamood.errors",
    "NotFittedError": "dreamood.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.config import PipelineConfig, load_config
    from dreamood.data.generated import GeneratedImageFolder
    from dreamood.decoding.backends import load_anchors, load_decoder
    from dreamood.decoding.generation import generate_images
    from dreamood.decoding.in_domain import InDomainDiffusionDecoder
    from dreamood.decoding.sdxl import StableDiffusionXLDecoder
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder
    from dreamood.encoder import TextConditionedEncoder, fit_encoder
    from dreamood.errors import ArtifactError, DreamoodError, ModelNotFoundError, NonFiniteError, NotFittedError
    from dreamood.evaluation import OODEvaluator, OODMetrics, OODReport, energy_score, ood_metrics
    from dreamood.feature_bank import FeatureBank
    from dreamood.knn import ExactNearestNeighbors, knn_search, kth_neighbor_distance
    from dreamood.pipeline import Pipeline
    from dreamood.protocols import (
        Embedder,
        EmbeddingDecoder,
        EmbeddingSampler,
        FeatureOutlierSampler,
        Scorer,
    )
    from dreamood.sampling.feature_samplers import NPOSSampler, VOSSampler
    from dreamood.sampling.knn_boundary import KNNBoundarySampler
    from dreamood.sampling.samples import EmbeddingSamples
    from dreamood.sampling.token_samplers import (
        DisjointClassSampler,
        GaussianTokenNoiseSampler,
        LearnableNoiseSampler,
        TokenInterpolationSampler,
    )
    from dreamood.training import EnergyOODRegularizer, TrainingConfig, train_classifier


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dreamood' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
