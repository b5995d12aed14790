"""The demo's report: aggregates over seeds, ``report.md``, a self-contained ``report.html``, the summary table.

Both documents are rendered from one list of blocks (headings, paragraphs, tables, figures, lists), so they
always say the same thing. The HTML embeds the figures as base64 PNG, so it can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamood.io import atomic_write

__all__ = ["aggregate", "build_blocks", "print_summary", "render_html", "render_markdown", "write_reports"]

# The metrics shown in tables, with their headers (fractions are shown as percentages).
_METRICS = {"fpr95": "FPR95 (ID+)", "fpr95_ood_positive": "FPR95 (OOD+)", "auroc": "AUROC"}
_GROUP_TITLES = {"near": "near-OOD", "far": "far-OOD", "far_matched": "far-OOD, matched"}
_GROUP_COLUMNS = {"near": "near", "far": "far", "far_matched": "matched"}
_LEGEND = (
    "near = the digits outside the ID classes; far = textures, faces and photos (mean over the three sets); "
    "matched = the same far-OOD images with the pixel values of ID digits."
)
_LABELS = {
    "ce": "(a) cross-entropy only",
    "dream_ood": "(b) DREAM-OOD",
    "token_noise": "(c) noise on T(y) (Table 2, I)",
    "vos": "(d) VOS",
    "npos": "(e) NPOS",
    "posthoc_msp": "(a) + MSP",
    "posthoc_maxlogit": "(a) + MaxLogit",
    "posthoc_mahalanobis": "(a) + Mahalanobis",
    "posthoc_knn": "(a) + KNN",
    "posthoc_vim": "(a) + ViM",
    "posthoc_react": "(a) + ReAct",
    "pixel_mean": "pixel mean (no network)",
}
_TRAINED = ("ce", "dream_ood", "token_noise", "vos", "npos")


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
        from dreamood.demo.pipeline import set_groups

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


def _pct(stat: dict[str, float] | None, seeds: int) -> str:
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
        row = [_LABELS.get(key, key), _pct(_accuracy(metrics, key), seeds)]
        for group in groups:
            row += [_pct(stats["groups"][group]["fpr95"], seeds), _pct(stats["groups"][group]["auroc"], seeds)]
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
        trained = {key: stats[key]["groups"][group]["auroc"]["mean"] for key in _TRAINED}
        best = max(trained, key=lambda key: trained[key])
        lines.append(
            f"{title}: DREAM-OOD reaches AUROC {100 * dream['mean']:.1f} against {100 * base['mean']:.1f} for "
            f"cross-entropy alone ({delta:+.1f} points, {verdict} the baseline); the best of the five trained "
            f"models is {_LABELS[best]} ({100 * trained[best]:.1f})."
        )
    if "pixel_mean" in stats and {"far", "far_matched"} <= set(stats["pixel_mean"]["groups"]):
        raw = stats["pixel_mean"]["groups"]["far"]["auroc"]["mean"]
        matched = stats["pixel_mean"]["groups"]["far_matched"]["auroc"]["mean"]
        lines.append(
            f"A detector that looks only at an image's mean brightness reaches AUROC {100 * raw:.1f} on the raw "
            f"far-OOD sets and {100 * matched:.1f} on their intensity-matched versions: the matched sets remove "
            "that shortcut, so they are the more honest far-OOD test."
        )
    accuracy = {key: _accuracy(metrics, key) for key in _TRAINED}
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


LIMITS = [
    "The paper's claim rests on Stable Diffusion: a text-to-image model pretrained on billions of images, "
    "whose decoder can render a point of its token space that lies beyond the ID classes as a plausible new "
    "image. Here the decoder is a small diffusion model trained on a few hundred 8x8 digits of the ID classes "
    "only. It has never seen anything else, so an 'outlier' embedding can only be rendered as some blend of "
    "the ID digits (see the figures). This benchmark therefore tests the pipeline, not the paper's claim.",
    "What it can show: every stage runs end to end on real images with the library's public API; the decoder "
    "reproduces its classes from T(y); Phase 2 places outlier embeddings at the low-density boundary of each "
    "class; and how the outlier sources (decoded boundary embeddings, noise on T(y), VOS and NPOS feature "
    "outliers) compare under an identical classifier and training recipe on this small problem.",
    "What it cannot show: whether DREAM-OOD beats the baselines on CIFAR-100 or ImageNet-100 (use the "
    "examples/ pipelines with Stable Diffusion for that); differences of a point or two with one seed (run "
    "--seeds 3 or more and read the standard deviations); anything about far-OOD detection that survives only "
    "on the raw far-OOD sets, whose brightness alone separates them from the digits.",
    "Hyper-parameters were fixed from the paper's settings scaled to this data (see Settings) before any OOD "
    "test set was scored; none was tuned on them. The numbers are reported as measured, including where "
    "DREAM-OOD does not beat the baseline.",
]


# ---------------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One element of the report: ``kind`` is heading, paragraph, table, figure or list.

    Attributes:
        kind: ``"h1"``, ``"h2"``, ``"p"``, ``"table"``, ``"figure"`` or ``"list"``.
        text: The heading or paragraph text, or a figure's caption.
        header: Table header cells.
        rows: Table rows, or the items of a list (one-cell rows).
        path: A figure's path relative to the report.
    """

    kind: str
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: str = ""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> Block:
    return Block("table", caption, tuple(header), tuple(tuple(r) for r in rows))


def _set_table(metrics: dict[str, Any], metric: str) -> Block:
    names = list(metrics["data"]["ood_sets"])
    sizes = metrics["data"]["ood_sets"]
    header = ["method", *(f"{name} ({sizes[name]})" for name in names)]
    rows = []
    for key, stats in metrics["aggregate"].items():
        rows.append([_LABELS.get(key, key), *(_pct(stats["sets"][name][metric], stats["seeds"]) for name in names)])
    return _table(header, rows, f"{_METRICS[metric]} per OOD set, in % (number of images in brackets)")


def _settings_rows(metrics: dict[str, Any]) -> list[list[str]]:
    config = metrics["config"]
    seed0 = metrics["seeds"][0]
    sampler = seed0["sampler"]
    decoder = metrics["decoder"]["config"]
    bank = metrics["paper_reference"]
    return [
        ["ID classes", ", ".join(metrics["data"]["class_names"]), "any subset with --id-classes"],
        ["split", f"{metrics['data']['train']} train / {metrics['data']['test']} test, stratified", "seeded"],
        [
            "decoder",
            f"UNet {decoder['block_out_channels']}, m = {decoder['embedding_dim']}, {decoder['beta_schedule']} "
            f"betas, {metrics['decoder']['epochs_trained']} epochs; DDIM {decoder['num_inference_steps']} steps, "
            f"guidance {decoder['guidance_scale']}, clip_sample=False",
            "chosen on ID data only (class fidelity of decoded T(y), grey levels); clip_sample=True would "
            "destroy class identity under guidance",
        ],
        [
            "Phase 1",
            f"SmallConvNet(width {config['encoder_width']}), {config['encoder_epochs']} epochs, lr "
            f"{config['encoder_lr']}, t = 0.1",
            "paper Eq. 2 recipe (SGD Nesterov, cosine)",
        ],
        [
            "Phase 2 k / boundary / anchors per round",
            f"{sampler['k']} / {sampler['boundary_size']} / {sampler['anchors_per_round']}",
            f"paper {bank['k']} / {bank['boundary']} / {bank['anchors_per_round']} of {bank['bank_per_class']} "
            "per class, scaled to the bank's smallest class",
        ],
        [
            "Phase 2 sigma",
            f"{sampler['sigma']:.4g}",
            "paper 0.03 in 768 dims, same expected noise norm in m dims: 0.03 * sqrt(768 / m)",
        ],
        [
            "candidates / kept per anchor",
            f"{sampler['candidates_per_anchor']} / {sampler['keep_per_anchor']}",
            "paper 1500 / 2",
        ],
        ["outliers decoded per class", str(config["outliers_per_class"]), "about one per ID training image"],
        [
            "Table 2 (I) noise std",
            f"{seed0['token_noise_std']:.4g}",
            "paper 0.03 in 768 dims on tokens of norm 0.38, same noise-to-token-norm ratio here",
        ],
        [
            "Phase 3",
            f"SmallConvNet(width {config['classifier_width']}), {config['classifier_epochs']} epochs, lr "
            f"{config['classifier_lr']}, batch {config['classifier_batch_size']} ID + "
            f"{config['classifier_batch_size']} outliers, beta {config['beta']}, {config['ood_head']} head",
            "paper CIFAR-100 setting (from scratch, beta 2.5, Linear(1, 2)); same for every outlier source",
        ],
        [
            "VOS / NPOS",
            f"queue {config['feature_queue_size']} per class, start at {config['feature_ood_start']:.0%} of the "
            f"epochs; NPOS sigma {seed0['npos_sigma']:.3g}",
            "VOS: 10,000 draws, keep 1, start 40/100; NPOS: k and boundary as 10% and 5% of the queue, sigma 0.1 "
            "times the mean feature norm of model (a) (NPOS uses unit-norm features)",
        ],
        ["post-hoc detectors", "fitted on model (a)'s training features", "KNN k scaled from 50 of 50,000"],
        ["seeds", ", ".join(str(s["seed"]) for s in metrics["seeds"]), "--seeds N: mean ± sample std"],
    ]


def build_blocks(metrics: dict[str, Any]) -> list[Block]:
    """The report as a list of blocks (see :class:`Block`).

    Args:
        metrics: The content of ``metrics.json``.

    Returns:
        The blocks in reading order.
    """
    env = metrics["environment"]
    data = metrics["data"]
    fidelity = metrics["decoder"]["class_fidelity"]
    blocks = [
        Block("h1", "DREAM-OOD demo: handwritten digits, offline"),
        Block(
            "p",
            f"Run of {env['started']} on {env['platform']} ({env['device']}, {env['torch_threads']} torch threads, "
            f"{env['cpu_count']} CPUs, load average before/after {env['load_average_before']} / "
            f"{env['load_average_after']}); total {metrics['total_s']:.0f} s. dreamood {env['dreamood']}, "
            f"torch {env['torch']}.",
        ),
        Block("p", "Du, Sun, Zhu, Li. Dream the Impossible: Outlier Imagination with Diffusion Models. NeurIPS 2023."),
        Block("h2", "Summary"),
    ]
    header, rows = summary_rows(metrics)
    blocks.append(
        _table(
            header,
            rows,
            "Energy score for models (a)-(e); post-hoc scores on model (a). FPR95 (ID+) = fraction of OOD images "
            "accepted when 95% of ID test images are (lower is better); AUROC higher is better; in %. " + _LEGEND,
        )
    )
    blocks.append(Block("list", rows=tuple((line,) for line in findings(metrics))))
    blocks.append(Block("h2", "What this benchmark can and cannot show"))
    blocks += [Block("p", text) for text in LIMITS]

    blocks.append(Block("h2", "Data"))
    sets = ", ".join(f"{name} ({count})" for name, count in data["ood_sets"].items())
    blocks.append(
        Block(
            "p",
            f"ID: scikit-learn's 8x8 digits {', '.join(data['class_names'])}: {data['train']} training and "
            f"{data['test']} test images. OOD test sets: {sets}. Far-OOD images are crops of scikit-image's brick, "
            "grass and gravel textures, the faces of its LFW subset, and scikit-learn's and scikit-image's "
            "photographs, area-averaged to 8x8 and stretched to [0, 1] in 17 levels like the digits. A 'matched' "
            "set gives each of those images the exact pixel values of a random ID training image, keeping only "
            "the rank order of its own pixels.",
        )
    )
    intensities = ", ".join(f"{name} {value:.2f}" for name, value in data["mean_intensity"].items())
    blocks.append(Block("p", f"Mean pixel value: {intensities}."))
    blocks.append(
        Block(
            "figure",
            "Rows: ID training digits, then the first images of every OOD test set.",
            path=metrics["figures"]["data"],
        )
    )

    blocks.append(Block("h2", "Stage 1: the in-domain diffusion decoder and T(y)"))
    cached = " (loaded from the cache)" if metrics["decoder"]["from_cache"] else ""
    blocks.append(
        Block(
            "p",
            f"A class-conditional diffusion model ({metrics['decoder']['parameters']:,} parameters) trained on the "
            f"ID training digits{cached}; its learned class embeddings are the anchors T(y). A logistic regression "
            "on the pixels of the real training digits recognises the class of "
            f"{100 * fidelity['pixel_classifier_accuracy_on_decoded']:.0f}% of the images decoded from T(y) (it "
            f"scores {100 * fidelity['pixel_classifier_accuracy_on_real_test']:.0f}% on the real test digits). "
            f"Mean pixel value: decoded {fidelity['mean_intensity_decoded']:.2f}, real "
            f"{fidelity['mean_intensity_real']:.2f}.",
        )
    )
    blocks.append(Block("figure", "Images decoded from T(y), one row per class.", path=metrics["figures"]["decoder"]))

    seeds = metrics["seeds"]
    encoder_accuracy = ", ".join(f"{100 * s['encoder_test_accuracy']:.1f}%" for s in seeds)
    blocks.append(Block("h2", "Stage 2: Phase 1 encoder and Phase 2 outlier embeddings"))
    blocks.append(
        Block(
            "p",
            f"The text-conditioned encoder classifies the ID test digits by their nearest anchor with accuracy "
            f"{encoder_accuracy}. Its L2-normalised training embeddings form the feature bank; KNNBoundarySampler "
            "draws outlier embeddings around the boundary points of each class and keeps the candidates farthest "
            "from the bank.",
        )
    )
    blocks.append(
        Block(
            "figure",
            "ID embeddings (dots), anchors T(y) (stars) and sampled outlier embeddings (crosses), by class (the "
            "paper's Fig. 4).",
            path=metrics["figures"]["embeddings"],
        )
    )
    blocks.append(
        Block(
            "figure",
            "Decoded outliers for several noise levels sigma, two per class (the paper's Fig. 5).",
            path=metrics["figures"]["sigmas"],
        )
    )
    blocks.append(
        Block(
            "figure",
            "For every class: real digits, decoded DREAM-OOD outliers, decoded Table 2 (I) outliers (noise on "
            "T(y)). The n-th DREAM-OOD and the n-th noise image of a class start from the same initial noise, so "
            "they differ only by their embedding.",
            path=metrics["figures"]["outliers"],
        )
    )

    blocks.append(Block("h2", "Stage 3: results per OOD set"))
    for metric in ("auroc", "fpr95", "fpr95_ood_positive"):
        blocks.append(_set_table(metrics, metric))
    blocks.append(
        Block(
            "p",
            "FPR95 (ID+) is the paper's convention (ID is the positive class); FPR95 (OOD+) is OpenOOD v1.5's "
            "(fraction of ID images rejected when 95% of the OOD images are caught). Per-seed reports with AUPR "
            "are in seed-*/reports/ and metrics.json.",
        )
    )

    blocks.append(Block("h2", "Settings"))
    blocks.append(_table(["setting", "value", "where it comes from"], _settings_rows(metrics)))
    blocks.append(Block("h2", "Time per stage"))
    cpu = metrics["cpu_timings_s"]
    timing_rows = [[name, f"{seconds:.1f}", f"{cpu[name]:.1f}"] for name, seconds in metrics["timings_s"].items()]
    timing_rows.append(["total", f"{metrics['total_s']:.1f}", f"{metrics['total_cpu_s']:.1f}"])
    blocks.append(
        _table(
            ["stage", "wall-clock s", "CPU s (this process)"],
            timing_rows,
            f"Summed over {len(seeds)} seed(s). On a busy machine the wall-clock time exceeds the CPU time; the "
            "load average in the first paragraph says how busy it was.",
        )
    )
    blocks.append(Block("h2", "Files"))
    blocks.append(
        Block(
            "list",
            rows=(
                ("metrics.json: settings, environment, per-seed reports, aggregates, timings",),
                ("figures/: the PNG figures of this report",),
                ("artifacts/: the decoder (safetensors + JSON), anchors T(y), images decoded from T(y)",),
                ("seed-*/artifacts/: encoder checkpoint, feature bank, outlier and noise embeddings",),
                ("seed-*/outliers/: the decoded outlier images with their manifest",),
                ("seed-*/classifiers/: checkpoint and training history of each classifier",),
                ("seed-*/reports/: one OOD report (JSON) per method",),
            ),
        )
    )
    return blocks


# ---------------------------------------------------------------------------------------------------- rendering


def render_markdown(blocks: Sequence[Block]) -> str:
    """Render blocks as GitHub-flavoured markdown; figures are linked by relative path.

    Args:
        blocks: The report's blocks.

    Returns:
        The markdown text.
    """
    lines: list[str] = []
    for block in blocks:
        if block.kind == "h1":
            lines += [f"# {block.text}", ""]
        elif block.kind == "h2":
            lines += [f"## {block.text}", ""]
        elif block.kind == "p":
            lines += [block.text, ""]
        elif block.kind == "list":
            lines += [f"- {row[0]}" for row in block.rows] + [""]
        elif block.kind == "figure":
            lines += [f"![{block.text}]({block.path})", "", f"*{block.text}*", ""]
        elif block.kind == "table":
            cells = [[c.replace("|", "\\|") for c in row] for row in (block.header, *block.rows)]
            lines.append("| " + " | ".join(cells[0]) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
            lines.append("")
            if block.text:
                lines += [block.text, ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
caption { caption-side: bottom; text-align: left; font-size: 0.85em; color: #555; padding-top: 0.3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
"""


def render_html(blocks: Sequence[Block], base_dir: Path) -> str:
    """Render blocks as one self-contained HTML page, figures embedded as base64 PNG.

    Args:
        blocks: The report's blocks.
        base_dir: The folder that figure paths are relative to.

    Returns:
        The HTML text.
    """
    title = next((b.text for b in blocks if b.kind == "h1"), "dreamood demo")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
    ]
    for block in blocks:
        text = html.escape(block.text)
        if block.kind in ("h1", "h2"):
            parts.append(f"<{block.kind}>{text}</{block.kind}>")
        elif block.kind == "p":
            parts.append(f"<p>{text}</p>")
        elif block.kind == "list":
            parts.append("<ul>" + "".join(f"<li>{html.escape(row[0])}</li>" for row in block.rows) + "</ul>")
        elif block.kind == "figure":
            data = base64.b64encode((base_dir / block.path).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{text}"><figcaption>{text}</figcaption></figure>'
            )
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            caption = f"<caption>{text}</caption>" if block.text else ""
            parts.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_reports(metrics: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (atomically).

    Args:
        metrics: The content of ``metrics.json``.
        out_dir: The demo's output folder (figure paths are relative to it).

    Returns:
        The paths of the markdown and HTML reports.
    """
    blocks = build_blocks(metrics)
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    with atomic_write(markdown, "w") as handle:
        handle.write(render_markdown(blocks))
    with atomic_write(page, "w") as handle:
        handle.write(render_html(blocks, out_dir))
    return markdown, page


def print_summary(metrics: dict[str, Any], out_dir: Path, *, enabled: bool = True) -> str:
    """Format (and print, when ``enabled``) the one-screen summary: the table, the findings, timings, files.

    Args:
        metrics: The content of ``metrics.json``.
        out_dir: The demo's output folder.
        enabled: Print the text.

    Returns:
        The text.
    """
    header, rows = summary_rows(metrics)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    timings = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in metrics["timings_s"].items())
    text = "\n".join(
        [
            "",
            "DREAM-OOD demo: energy score (post-hoc rows on model (a)); FPR95 (ID+) and AUROC in %",
            line(header),
            "  ".join("-" * w for w in widths),
            *(line(r) for r in rows),
            _wrap(_LEGEND, indent=""),
            "",
            *(_wrap(f"* {sentence}") for sentence in findings(metrics)),
            "",
            f"time: {metrics['total_s']:.0f}s ({timings})",
            f"report: {out_dir / 'report.html'}  (also report.md, metrics.json, figures/)",
        ]
    )
    if enabled:
        print(text)
    return text


def _wrap(text: str, width: int = 110, indent: str = "  ") -> str:
    import textwrap

    return textwrap.fill(text, width=width, subsequent_indent=indent)
