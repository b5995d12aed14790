"""The whole DREAM-OOD method as a sequence of stages, each writing its artefact and skipped when it exists.

Du, Sun, Zhu, Li, "Dream the Impossible: Outlier Imagination with Diffusion Models", NeurIPS 2023:

============  ================================  =====================================================
stage         artefact in ``output_dir``        what it does
============  ================================  =====================================================
anchors       ``anchors.safetensors``           class token embeddings T(y) of the text encoder
encoder       ``encoder.pt``                    Phase 1: image encoder aligned with T(y) (Eq. 2)
bank          ``feature_bank.safetensors``      L2-normalised training embeddings of the encoder
samples       ``samples.safetensors``           Phase 2: k-NN boundary outliers (DREAM-ID: inliers)
images        ``images/``                       Stable Diffusion renders the sampled embeddings (Eq. 6)
classifier    ``classifier.pt``                 Phase 3: CE + beta * energy loss on the outliers (Eq. 7)
report        ``report.json``, ``report.md``    FPR95, AUROC, AUPR, ID accuracy on the OOD test sets
============  ================================  =====================================================

A stage whose artefact exists is skipped and its artefact loaded, so an interrupted run resumes where it
stopped (Phase 1, generation and Phase 3 also resume inside the stage, from their per-epoch checkpoints or
the images already written). Every artefact is written atomically, and each stage (each baseline too) first
deletes the temporary files that a process killed while writing its artefacts left behind. A stage is redone
when it is named in ``force``; the artefacts after it are not touched, so force those too when an earlier
stage changed. With ``progress = false`` no progress bar is drawn, transformers' and diffusers' model-loading
bars included.

The paper's baselines run on the same data, each in ``output_dir/baselines/<name>/`` and skipped when its
result exists unless it is named in ``force`` (then it is retrained from scratch): GODIN and GAN-based
outlier synthesis for OOD detection (:meth:`Pipeline.ood_baseline`, paper Tables 1 and 3), and for DREAM-ID's
generalisation (:meth:`Pipeline.generalization_baseline`, Table 4) a cross-entropy model, RandAugment,
AutoAugment, AugMix and CutMix copies and generic-prompt images appended in DREAM-ID's number, and MEMO on
the cross-entropy model. Their settings are in :class:`BaselineConfig`;
``dreamood run --baselines`` runs them after the stages and prints one comparison table.

The layout: :mod:`~dreamood.pipeline.stages` holds one record per stage (:class:`Stage`: artefact, inputs,
settings, how to make, load and summarise it), :mod:`~dreamood.pipeline.runner` the :class:`Pipeline` that runs
them with its components (anchor source, sampler, decoder, backbone), :mod:`~dreamood.pipeline.data` the datasets
and backbones of a configuration, :mod:`~dreamood.pipeline.baselines` the paper's baselines and
:mod:`~dreamood.pipeline.tables` the comparison tables. :func:`dreamood.testing.smoke_setup` shrinks a
configuration to tiny random models and data, so the whole wiring runs on a CPU in seconds.
"""

from dreamood.pipeline.baselines import (
    BASELINES,
    GENERALIZATION_BASELINES,
    OOD_BASELINES,
    SMOKE_BASELINES,
    BaselineConfig,
    BaselineRunner,
    baselines_of,
    parse_baselines,
)
from dreamood.pipeline.data import PipelineData, build_backbone, build_data, class_names_of
from dreamood.pipeline.runner import BackboneFactory, DecoderFactory, Pipeline
from dreamood.pipeline.stages import STAGES, Stage, stage_named
from dreamood.pipeline.tables import accuracy_table, ood_table

__all__ = [
    "BASELINES",
    "GENERALIZATION_BASELINES",
    "OOD_BASELINES",
    "SMOKE_BASELINES",
    "STAGES",
    "BackboneFactory",
    "BaselineConfig",
    "BaselineRunner",
    "DecoderFactory",
    "Pipeline",
    "PipelineData",
    "Stage",
    "accuracy_table",
    "baselines_of",
    "build_backbone",
    "build_data",
    "class_names_of",
    "ood_table",
    "parse_baselines",
    "stage_named",
]
