"""The result of an OOD evaluation: one row per OOD set, their mean, and the ID accuracy.

Values are stored as fractions in ``[0, 1]`` (``to_dict`` / ``to_json`` keep them so); tables
(``to_markdown``, ``to_csv``, ``str``) show percentages, with the FPR convention in the column header:
``FPR95 (ID+)`` is the paper's (ID positive), ``FPR95 (OOD+)`` is OpenOOD v1.5's (OOD positive).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamood.errors import ArtifactError
from dreamood.evaluation.metrics import FPR_RULES, METRIC_NAMES, OPTIONAL_METRIC_NAMES
from dreamood.io import atomic_write

__all__ = ["OODReport", "OODReportRow", "metric_headers"]


def metric_headers(tpr: float = 0.95) -> dict[str, str]:
    """Table column headers of the metrics, naming the FPR convention.

    Args:
        tpr: The TPR level of the FPR metrics (0.95 gives ``"FPR95 (ID+)"``).

    Returns:
        A dict from each name in :data:`~dreamood.evaluation.metrics.METRIC_NAMES` and
        :data:`~dreamood.evaluation.metrics.OPTIONAL_METRIC_NAMES` to its header.
    """
    level = f"{tpr * 100:g}"
    return {
        "fpr95": f"FPR{level} (ID+)",
        "fpr95_ood_positive": f"FPR{level} (OOD+)",
        "auroc": "AUROC",
        "aupr_in": "AUPR-In",
        "aupr_out": "AUPR-Out",
        "aupr_in_trapezoid": "AUPR-In (trapz)",
        "aupr_out_trapezoid": "AUPR-Out (trapz)",
    }


@dataclass(frozen=True)
class OODReportRow:
    """Metrics of one OOD set (or the mean over sets), as fractions in ``[0, 1]``.

    Attributes:
        name: The OOD set's name, or ``"Mean"`` for the mean row.
        metrics: Value of each metric in :data:`~dreamood.evaluation.metrics.METRIC_NAMES` (and of those of
            :data:`~dreamood.evaluation.metrics.OPTIONAL_METRIC_NAMES` that were asked for); with the ``paper``
            protocol, the mean over the repeats.
        std: Standard deviation over the repeats (population, ``ddof=0``) for the ``paper`` protocol, else ``None``.
        n_ood: Number of OOD samples in each evaluation of this set; ``None`` for the mean row.
    """

    name: str
    metrics: dict[str, float]
    std: dict[str, float] | None = None
    n_ood: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a JSON-serialisable dict.

        Returns:
            A dict with keys ``name``, ``n_ood``, ``metrics`` and ``std``.
        """
        std = None if self.std is None else dict(self.std)
        return {"name": self.name, "n_ood": self.n_ood, "metrics": dict(self.metrics), "std": std}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OODReportRow:
        """Rebuild a row from :meth:`to_dict` output.

        Args:
            data: A dict as returned by :meth:`to_dict`.

        Returns:
            The row.

        Raises:
            ArtifactError: ``data`` lacks a field or a metric.
        """
        try:
            names = METRIC_NAMES + tuple(name for name in OPTIONAL_METRIC_NAMES if name in data["metrics"])
            metrics = {name: float(data["metrics"][name]) for name in names}
            std = None if data["std"] is None else {name: float(data["std"][name]) for name in names}
            n_ood = None if data["n_ood"] is None else int(data["n_ood"])
            return cls(name=str(data["name"]), metrics=metrics, std=std, n_ood=n_ood)
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"not an OOD report row ({type(error).__name__}: {error}): {data!r}") from error


@dataclass(frozen=True)
class OODReport:
    """OOD evaluation results: one row per OOD set, their mean, and the ID accuracy when it was measured.

    Attributes:
        rows: One row per OOD set, in evaluation order.
        mean: The mean over the OOD sets (with the ``paper`` protocol: mean and std over repeats of the
            per-repeat mean over sets).
        n_id: Number of ID test samples.
        tpr: TPR level of the FPR metrics.
        protocol: ``"full"`` (every OOD sample) or ``"paper"`` (OOD sets subsampled, repeated).
        repeats: Number of repeats (1 for ``"full"``).
        seed: Seed of the subsampling (``None`` for ``"full"``).
        id_accuracy: Top-1 accuracy on the ID test set as a fraction, or ``None`` when not measured.
        fpr_rule: Threshold rule of the FPR metrics, ``"exact"`` or ``"nearest"`` (see
            :func:`~dreamood.evaluation.ood_metrics`).
    """

    rows: tuple[OODReportRow, ...]
    mean: OODReportRow
    n_id: int
    tpr: float = 0.95
    protocol: str = "full"
    repeats: int = 1
    seed: int | None = None
    id_accuracy: float | None = None
    fpr_rule: str = "exact"

    def __getitem__(self, name: str) -> OODReportRow:
        """Return the row of the OOD set ``name`` (``"Mean"`` gives the mean row).

        Args:
            name: An OOD set's name or ``"Mean"``.

        Returns:
            The row.

        Raises:
            KeyError: No OOD set has that name.
        """
        for row in self.rows:
            if row.name == name:
                return row
        if name == self.mean.name:
            return self.mean
        raise KeyError(f"no OOD set named {name!r}; the report has {[row.name for row in self.rows]}")

    @property
    def names(self) -> list[str]:
        """Names of the OOD sets, in evaluation order."""
        return [row.name for row in self.rows]

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics the report holds, in table order."""
        return METRIC_NAMES + tuple(name for name in OPTIONAL_METRIC_NAMES if name in self.mean.metrics)

    # ---- tables -------------------------------------------------------------------------------------------

    def _table(self) -> tuple[list[str], list[list[str]]]:
        """Header and body cells of the percentage table shared by markdown, CSV and ``str``."""
        headers = metric_headers(self.tpr)
        header = ["OOD set", "N OOD"] + [headers[name] for name in self.metric_names]
        body = []
        for row in (*self.rows, self.mean):
            cells = [row.name, "" if row.n_ood is None else str(row.n_ood)]
            for name in self.metric_names:
                cell = f"{100 * row.metrics[name]:.2f}"
                if row.std is not None:
                    cell += f" ± {100 * row.std[name]:.2f}"
                cells.append(cell)
            body.append(cells)
        return header, body

    def _caption(self) -> str:
        parts = [f"OOD evaluation, protocol {self.protocol!r}, {self.n_id} ID test samples"]
        if self.protocol == "paper":
            parts.append(f"mean ± std over {self.repeats} repeats (seed {self.seed})")
        parts.append("values in %")
        if self.fpr_rule != "exact":
            parts.append(f"FPR threshold rule {self.fpr_rule!r}")
        convention = "ID+: ID is the positive class (the paper); OOD+: OOD is the positive class (OpenOOD v1.5)"
        return ", ".join(parts) + ".\n" + convention

    def _accuracy_line(self) -> str:
        return "" if self.id_accuracy is None else f"ID accuracy: {100 * self.id_accuracy:.2f}%"

    def to_markdown(self) -> str:
        """Render the report as a markdown table (percentages) with a caption and the ID accuracy.

        Returns:
            The markdown text.
        """
        header, body = self._table()
        lines = [line for caption in self._caption().split("\n") for line in (caption, "")]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        accuracy = self._accuracy_line()
        if accuracy:
            lines += ["", accuracy]
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """Render the report as CSV (percentages; with the ``paper`` protocol a ``... std`` column per metric).

        The ID accuracy, when measured, is the ``ID Acc`` column of the ``Mean`` row.

        Args:
            path: When given, the CSV is also written there atomically.

        Returns:
            The CSV text.
        """
        headers = metric_headers(self.tpr)
        header = ["OOD set", "N OOD"]
        for name in self.metric_names:
            header.append(headers[name])
            if self.protocol == "paper":
                header.append(f"{headers[name]} std")
        if self.id_accuracy is not None:
            header.append("ID Acc")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for row in (*self.rows, self.mean):
            cells = [row.name, "" if row.n_ood is None else str(row.n_ood)]
            for name in self.metric_names:
                cells.append(f"{100 * row.metrics[name]:.4f}")
                if self.protocol == "paper":
                    cells.append("" if row.std is None else f"{100 * row.std[name]:.4f}")
            if self.id_accuracy is not None:
                cells.append(f"{100 * self.id_accuracy:.4f}" if row is self.mean else "")
            writer.writerow(cells)
        text = buffer.getvalue()
        if path is not None:
            with atomic_write(path, "w") as handle:
                handle.write(text)
        return text

    def __str__(self) -> str:
        """Return an aligned plain-text table (percentages) with a caption and the ID accuracy."""
        header, body = self._table()
        widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

        lines = [self._caption(), line(header), "  ".join("-" * width for width in widths)]
        lines += [line(cells) for cells in body[:-1]]
        lines += ["  ".join("-" * width for width in widths), line(body[-1])]
        accuracy = self._accuracy_line()
        if accuracy:
            lines.append(accuracy)
        return "\n".join(lines)

    # ---- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-serialisable dict (values as fractions, not percentages).

        Returns:
            A dict that :meth:`from_dict` turns back into an equal report.
        """
        return {
            "protocol": self.protocol,
            "tpr": self.tpr,
            "repeats": self.repeats,
            "seed": self.seed,
            "n_id": self.n_id,
            "id_accuracy": self.id_accuracy,
            "fpr_rule": self.fpr_rule,
            "rows": [row.to_dict() for row in self.rows],
            "mean": self.mean.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OODReport:
        """Rebuild a report from :meth:`to_dict` output.

        Args:
            data: A dict as returned by :meth:`to_dict`.

        Returns:
            The report.

        Raises:
            ArtifactError: ``data`` lacks a field or holds a value of the wrong type.
        """
        try:
            accuracy = data["id_accuracy"]
            seed = data["seed"]
            fpr_rule = str(data.get("fpr_rule", "exact"))  # absent from reports written before the option
            if fpr_rule not in FPR_RULES:
                raise ValueError(f"fpr_rule must be one of {FPR_RULES}, got {fpr_rule!r}")
            return cls(
                rows=tuple(OODReportRow.from_dict(row) for row in data["rows"]),
                mean=OODReportRow.from_dict(data["mean"]),
                n_id=int(data["n_id"]),
                tpr=float(data["tpr"]),
                protocol=str(data["protocol"]),
                repeats=int(data["repeats"]),
                seed=None if seed is None else int(seed),
                id_accuracy=None if accuracy is None else float(accuracy),
                fpr_rule=fpr_rule,
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"not an OOD report ({type(error).__name__}: {error})") from error

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Serialise the report as JSON (values as fractions), writing it atomically to ``path`` when given.

        Args:
            path: Target file, or ``None`` to only return the text.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with atomic_write(path, "w") as handle:
                handle.write(text)
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> OODReport:
        """Load a report written by :meth:`to_json`.

        Args:
            path: The JSON file.

        Returns:
            The report.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ArtifactError: The file is not valid JSON or not an OOD report.
        """
        target = Path(path)
        if not target.is_file():
            raise FileNotFoundError(f"OOD report file not found: {target}")
        try:
            data = json.loads(target.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{target} is not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise ArtifactError(f"{target} holds a JSON {type(data).__name__}, expected an OOD report object")
        return cls.from_dict(data)
