"""OOD evaluation: metrics (FPR95 in both conventions, AUROC, AUPR), logit scores, the evaluator, its report, and
the evaluation of one classifier under many detectors."""

from dreamood.evaluation.comparison import (
    DETECTORS,
    DetectorComparison,
    DetectorSpec,
    ModelParts,
    applicable_detectors,
    evaluate_detectors,
)
from dreamood.evaluation.evaluator import PROTOCOLS, OODEvaluator, SupportsScore
from dreamood.evaluation.metrics import (
    FPR_RULES,
    METRIC_NAMES,
    OPTIONAL_METRIC_NAMES,
    OODMetricAccumulator,
    OODMetrics,
    ood_metrics,
)
from dreamood.evaluation.report import OODReport, OODReportRow, metric_headers
from dreamood.evaluation.scores import (
    TEMPERATURE_FORMS,
    energy_score,
    max_logit_score,
    msp_score,
    outlier_class_score,
)

__all__ = [
    "DETECTORS",
    "FPR_RULES",
    "METRIC_NAMES",
    "OPTIONAL_METRIC_NAMES",
    "PROTOCOLS",
    "TEMPERATURE_FORMS",
    "DetectorComparison",
    "DetectorSpec",
    "ModelParts",
    "OODEvaluator",
    "OODMetricAccumulator",
    "OODMetrics",
    "OODReport",
    "OODReportRow",
    "SupportsScore",
    "applicable_detectors",
    "energy_score",
    "evaluate_detectors",
    "max_logit_score",
    "metric_headers",
    "msp_score",
    "ood_metrics",
    "outlier_class_score",
]
