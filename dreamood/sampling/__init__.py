"""Phase 2 samplers: new embeddings in the low-likelihood region of the latent space, and their containers.

- :class:`KNNBoundarySampler`: DREAM-OOD's k-NN boundary sampler (outliers) and its DREAM-ID mirror (inliers).
- The paper's Table 2 alternatives: :class:`GaussianTokenNoiseSampler`, :class:`LearnableNoiseSampler`,
  :class:`TokenInterpolationSampler`, :class:`DisjointClassSampler`.
- Feature-space samplers for training-time baselines: :class:`VOSSampler`, :class:`NPOSSampler`.
- :class:`EmbeddingSamples`: what an embedding sampler returns.
"""

from dreamood.sampling.feature_samplers import ClassQueues, NPOSSampler, VOSSampler
from dreamood.sampling.knn_boundary import (
    DEFAULT_SIGMA,
    KNNBoundarySampler,
    SamplingTrace,
    candidate_knn_distance,
    select_candidates,
)
from dreamood.sampling.samples import EmbeddingSamples
from dreamood.sampling.token_samplers import (
    DisjointClassSampler,
    GaussianTokenNoiseSampler,
    LearnableNoiseSampler,
    TokenInterpolationSampler,
    disjoint_class_names,
)

__all__ = [
    "DEFAULT_SIGMA",
    "ClassQueues",
    "DisjointClassSampler",
    "EmbeddingSamples",
    "GaussianTokenNoiseSampler",
    "KNNBoundarySampler",
    "LearnableNoiseSampler",
    "NPOSSampler",
    "SamplingTrace",
    "TokenInterpolationSampler",
    "VOSSampler",
    "candidate_knn_distance",
    "disjoint_class_names",
    "select_candidates",
]
