"""Markdown tables comparing a run with its baselines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dreamood.evaluation import OODReport

__all__ = ["accuracy_table", "ood_table"]


def ood_table(reports: Mapping[str, OODReport]) -> str:
    """A markdown table comparing methods by their mean over the OOD sets.

    Args:
        reports: One report per method, by method name.

    Returns:
        The table: mean FPR95 (ID positive, the paper's), mean AUROC and ID accuracy, in %.
    """
    lines = ["| method | mean FPR95 (ID+) | mean AUROC | ID accuracy |", "|---|---|---|---|"]
    for name, report in reports.items():
        mean = report.mean.metrics
        accuracy = "-" if report.id_accuracy is None else f"{100 * report.id_accuracy:.2f}"
        lines.append(f"| {name} | {100 * mean['fpr95']:.2f} | {100 * mean['auroc']:.2f} | {accuracy} |")
    return "\n".join(lines)


def accuracy_table(accuracies: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of top-1 accuracy by method and test set.

    Args:
        accuracies: ``{method: {test set: accuracy}}``, every method with the same test sets.

    Returns:
        The table, accuracies in %.
    """
    sets = list(next(iter(accuracies.values()), {}))
    lines = ["| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, row in accuracies.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[key]:.2f}" for key in sets) + " |")
    return "\n".join(lines)
