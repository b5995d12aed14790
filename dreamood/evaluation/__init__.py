"""OOD evaluation: metrics (FPR95 in both conventions, AUROC, AUPR), logit scores, the evaluator and its report."""

from dreamood.evaluation.evaluator import PROTOCOLS, OODEvaluator, SupportsScore
from dreamood.evaluation.metrics import METRIC_NAMES, OODMetricAccumulator, OODMetrics, ood_metrics
from dreamood.evaluation.report import OODReport, OODReportRow, metric_headers
from dreamood.evaluation.scores import (
    TEMPERATURE_FORMS,
    energy_score,
    max_logit_score,
    msp_score,
    outlier_class_score,
)

__all__ = [
    "METRIC_NAMES",
    "PROTOCOLS",
    "TEMPERATURE_FORMS",
    "OODEvaluator",
    "OODMetricAccumulator",
    "OODMetrics",
    "OODReport",
    "OODReportRow",
    "SupportsScore",
    "energy_score",
    "max_logit_score",
    "metric_headers",
    "msp_score",
    "ood_metrics",
    "outlier_class_score",
]
