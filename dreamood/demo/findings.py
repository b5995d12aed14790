"""The numbers and sentences of the demo's report: statistics over seeds, table rows, findings.

Everything here is computed from ``metrics.json`` alone; :mod:`dreamood.demo.report` lays it out.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from dreamood.demo.labels import GENERALIZATION, LABELS, METHODS, OOD_BASELINES, set_groups

__all__ = [
    "LEGEND",
    "METRIC_NAMES",
    "aggregate",
    "aggregate_accuracy",
    "findings",
    "generalization_findings",
    "generalization_rows",
    "percent",
    "summary_rows",
]

#: The metrics shown in tables, with their headers (fractions are shown as percentages).
METRIC_NAMES = {"fpr95": "FPR95 (ID+)", "fpr95_ood_positive": "FPR95 (OOD+)", "auroc": "AUROC"}
_GROUP_TITLES = {"near": "near-OOD", "far": "far-OOD", "far_matched": "far-OOD, matched"}
_GROUP_COLUMNS = {"near": "near", "far": "far", "far_matched": "matched"}
#: What the group columns of the summary table mean.
LEGEND = (
    "near = the digits outside the ID classes; far = textures, faces and photos (mean over the three sets); "
    "matched = the same far-OOD images with the pixel values of ID digits."
)
_TRAINED = (*METHODS, *OOD_BASELINES)


# ---------------------------------------------------------------------------------------------------- numbers


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(reports: Sequence[dict[str, Any]], groups: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every metric of every OOD set, of group means and of accuracy.

    Args:
        reports: One :meth:`~dreamood.evaluation.OODReport.to_dict` per seed, with the same OOD sets.
        groups: OOD set names by group; each group's metric is the mean over its sets, computed per seed
            before the statistics over seeds. Defaults to the demo's groups.

    Returns:
        ``{"sets": {set: {metric: {"mean", "std"}}}, "groups": {group: {metric: {"mean", "std"}}},
        "id_accuracy": {"mean", "std"} or None, "seeds": n}``; fractions in ``[0, 1]``.

    Raises:
        ValueError: ``reports`` is empty or the reports name different OOD sets.
    """
    if not reports:
        raise ValueError("reports is empty: nothing to aggregate")
    if groups is None:
        groups = set_groups()
    per_seed = [{row["name"]: row["metrics"] for row in report["rows"]} for report in reports]
    names = list(per_seed[0])
    if any(list(seed) != names for seed in per_seed):
        raise ValueError(f"the reports name different OOD sets: {[list(seed) for seed in per_seed]}")
    metrics = list(per_seed[0][names[0]])
    sets = {name: {m: _mean_std([seed[name][m] for seed in per_seed]) for m in metrics} for name in names}
    group_stats = {
        group: {m: _mean_std([statistics.fmean(seed[n][m] for n in members) for seed in per_seed]) for m in metrics}
        for group, members in groups.items()
        if members and all(n in names for n in members)
    }
    accuracies = [report.get("id_accuracy") for report in reports]
    accuracy = _mean_std([float(a) for a in accuracies if a is not None]) if None not in accuracies else None
    return {"sets": sets, "groups": group_stats, "id_accuracy": accuracy, "seeds": len(reports)}


def aggregate_accuracy(per_seed: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation over seeds of every method's accuracy on every test set.

    Args:
        per_seed: For each seed, ``{method: {test set: accuracy}}``, with the same methods and sets.

    Returns:
        ``{method: {test set: {"mean", "std"}}}``, fractions in ``[0, 1]``.

    Raises:
        ValueError: ``per_seed`` is empty or the seeds hold different methods or sets.
    """
    if not per_seed:
        raise ValueError("per_seed is empty: nothing to aggregate")
    layout = {key: list(sets) for key, sets in per_seed[0].items()}
    if any({key: list(sets) for key, sets in seed.items()} != layout for seed in per_seed):
        raise ValueError("the seeds hold different methods or test sets")
    return {
        key: {name: _mean_std([seed[key][name] for seed in per_seed]) for name in names}
        for key, names in layout.items()
    }


def percent(stat: dict[str, float] | None, seeds: int) -> str:
    """A fraction's mean in % with one decimal (``"-"`` for none), with ``± std`` when there are several seeds."""
    if stat is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return text + (f" ± {100 * stat['std']:.1f}" if seeds > 1 else "")


def _accuracy(metrics: dict[str, Any], key: str) -> dict[str, float] | None:
    """ID accuracy of a row; post-hoc detectors share the cross-entropy model's."""
    found: dict[str, float] | None = metrics["aggregate"][key]["id_accuracy"]
    if found is None and key.startswith("posthoc_"):
        return metrics["aggregate"]["ce"]["id_accuracy"]  # type: ignore[no-any-return]
    return found


def summary_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table: ID accuracy and FPR95 (ID+) / AUROC per group of OOD sets.

    Args:
        metrics: The content of ``metrics.json``.

    Returns:
        ``(header, rows)`` of strings.
    """
    header = ["method", "ID acc"]
    groups = [g for g in _GROUP_TITLES if g in metrics["aggregate"]["ce"]["groups"]]
    for group in groups:
        header += [f"{_GROUP_COLUMNS[group]} FPR95", f"{_GROUP_COLUMNS[group]} AUROC"]
    rows = []
    for key, stats in metrics["aggregate"].items():
        seeds = stats["seeds"]
        row = [LABELS.get(key, key), percent(_accuracy(metrics, key), seeds)]
        for group in groups:
            row += [percent(stats["groups"][group]["fpr95"], seeds), percent(stats["groups"][group]["auroc"], seeds)]
        rows.append(row)
    return header, rows


def findings(metrics: dict[str, Any]) -> list[str]:
    """Plain sentences comparing DREAM-OOD with the baselines, written from the measured numbers.

    A difference counts as one only when it exceeds half a point and, with several seeds, the larger of the
    two standard deviations.

    Args:
        metrics: The content of ``metrics.json``.

    Returns:
        One sentence per finding.
    """
    stats = metrics["aggregate"]
    seeds = stats["ce"]["seeds"]
    lines = []
    for group, title in _GROUP_TITLES.items():
        if group not in stats["ce"]["groups"]:
            continue
        base, dream = stats["ce"]["groups"][group]["auroc"], stats["dream_ood"]["groups"][group]["auroc"]
        delta = 100 * (dream["mean"] - base["mean"])
        margin = max(0.5, 100 * max(base["std"], dream["std"]))
        verdict = "better than" if delta > margin else "worse than" if delta < -margin else "no clear difference from"
        trained = {key: stats[key]["groups"][group]["auroc"]["mean"] for key in _TRAINED if key in stats}
        best = max(trained, key=lambda key: trained[key])
        lines.append(
            f"{title}: DREAM-OOD reaches AUROC {100 * dream['mean']:.1f} against {100 * base['mean']:.1f} for "
            f"cross-entropy alone ({delta:+.1f} points, {verdict} the baseline); the best of the {len(trained)} "
            f"rows of trained models is {LABELS[best]} ({100 * trained[best]:.1f})."
        )
    if "godin" in stats:
        epsilons = sorted({seed["godin_epsilon"] for seed in metrics["seeds"]})
        lines.append(
            f"GODIN's criterion (largest mean score on ID training digits) chose epsilon "
            f"{', '.join(f'{e:g}' for e in epsilons)}; the row (f) with epsilon = 0 shows the score without input "
            "perturbation. Neither uses an OOD image."
        )
    if "pixel_mean" in stats and {"far", "far_matched"} <= set(stats["pixel_mean"]["groups"]):
        raw = stats["pixel_mean"]["groups"]["far"]["auroc"]["mean"]
        matched = stats["pixel_mean"]["groups"]["far_matched"]["auroc"]["mean"]
        lines.append(
            f"A detector that looks only at an image's mean brightness reaches AUROC {100 * raw:.1f} on the raw "
            f"far-OOD sets and {100 * matched:.1f} on their intensity-matched versions: the matched sets remove "
            "that shortcut, so they are the more honest far-OOD test."
        )
    accuracy = {key: _accuracy(metrics, key) for key in _TRAINED if key in stats}
    if all(a is not None for a in accuracy.values()):
        base_acc = accuracy["ce"]["mean"]  # type: ignore[index]
        dream_acc = accuracy["dream_ood"]["mean"]  # type: ignore[index]
        lines.append(
            f"ID accuracy: {100 * dream_acc:.1f}% with DREAM-OOD outliers against {100 * base_acc:.1f}% with "
            "cross-entropy alone."
        )
    if seeds > 1:
        lines.append(f"Values are mean ± sample standard deviation over {seeds} seeds.")
    else:
        lines.append("One seed: differences of a few points may be noise; run --seeds 3 or more for error bars.")
    return lines


def generalization_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the generalisation table: top-1 accuracy on each version of the ID test set.

    Args:
        metrics: The content of ``metrics.json``.

    Returns:
        ``(header, rows)`` of strings, accuracies in %.
    """
    table = metrics["generalization"]
    seeds = len(metrics["seeds"])
    sizes = table["sets"]
    degrees = metrics["config"]["rotation_degrees"]
    names = {"ID test": f"ID test ({sizes['ID test']})", "rotated": f"rotated ±{degrees:g}° ({sizes['rotated']})"}
    header = ["method", *(names.get(name, name) for name in sizes), "change"]
    rows = []
    for key, accuracy in table["aggregate"].items():
        stats = [accuracy[name] for name in sizes]
        drop = 100 * (stats[-1]["mean"] - stats[0]["mean"])
        rows.append([GENERALIZATION.get(key, key), *(percent(stat, seeds) for stat in stats), f"{drop:+.1f}"])
    return header, rows


def generalization_findings(metrics: dict[str, Any]) -> list[str]:
    """Plain sentences comparing each generalisation method with cross-entropy alone on the rotated digits.

    The same rule as :func:`findings`: a difference counts when it exceeds half a point and the larger of the two
    standard deviations (and, with one seed, one test image).

    Args:
        metrics: The content of ``metrics.json``.

    Returns:
        One sentence per finding.
    """
    table = metrics["generalization"]["aggregate"]
    size = metrics["generalization"]["sets"]["rotated"]
    base = table["ce"]["rotated"]
    better: list[str] = []
    worse: list[str] = []
    same: list[str] = []
    for key, accuracy in table.items():
        if key == "ce":
            continue
        stat = accuracy["rotated"]
        delta = 100 * (stat["mean"] - base["mean"])
        margin = max(0.5, 100 / size, 100 * max(base["std"], stat["std"]))
        entry = f"{GENERALIZATION.get(key, key)} ({delta:+.1f})"
        (better if delta > margin else worse if delta < -margin else same).append(entry)
    lines = [
        f"Rotated digits: cross-entropy alone reaches {100 * base['mean']:.1f}% (one test image is "
        f"{100 / size:.2f} points). Better: {', '.join(better) or 'none'}. Worse: {', '.join(worse) or 'none'}. "
        f"No clear difference: {', '.join(same) or 'none'}."
    ]
    clean = [accuracy["ID test"]["mean"] for accuracy in table.values()]
    saturated = "; this close to 100% it leaves little room to separate them" if min(clean) >= 0.97 else ""
    lines.append(
        f"ID test digits: accuracy from {100 * min(clean):.1f}% to {100 * max(clean):.1f}% over the methods{saturated}."
    )
    return lines
