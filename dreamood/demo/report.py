"""The demo's report: ``report.md``, a self-contained ``report.html``, the summary table.

Both documents are rendered from one list of blocks (headings, paragraphs, tables, figures, lists), so they
always say the same thing. The HTML embeds the figures as base64 PNG, so it can be mailed or archived alone.
The numbers and findings come from :mod:`dreamood.demo.findings` (``aggregate`` and ``aggregate_accuracy`` are
re-exported here), the labels from :mod:`dreamood.demo.labels`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamood.demo.findings import (
    LEGEND,
    METRIC_NAMES,
    aggregate,
    aggregate_accuracy,
    findings,
    generalization_findings,
    generalization_rows,
    percent,
    summary_rows,
)
from dreamood.demo.labels import LABELS, QUICK_RUN_NOTICE, embedding_projection
from dreamood.io import atomic_write

__all__ = [
    "aggregate",
    "aggregate_accuracy",
    "build_blocks",
    "generalization_rows",
    "print_summary",
    "render_html",
    "render_markdown",
    "write_reports",
]

GENERALIZATION_LIMITS = [
    "What the table can show: with one classifier and one recipe, whether appending the decoded DREAM-ID inliers, "
    "or as many augmented copies of the training digits, changes the accuracy on the ID test digits and on a "
    "rotated copy of them, and what MEMO's test-time adaptation does to model (a).",
    "What it cannot show: DREAM-ID's claim that inliers rendered by Stable Diffusion improve accuracy on ImageNet-A "
    "and ImageNet-V2. The demo's decoder was trained on the same training digits, so its inliers hold no knowledge "
    "the training set lacks; any gain can only come from their variety. The rotated copy is a synthetic shift "
    "chosen here, not a natural one, and RandAugment and AutoAugment draw rotations and shears among their "
    "operations, so for them it lies partly inside the training distribution. The test sets are small: read the "
    "size of one test image and, with one seed, treat a difference of a point or two as noise.",
    "Every setting comes from the papers (see Settings) and was fixed before the test digits or their rotated copy "
    "were scored; the rotation range was chosen as a small shift before any model was evaluated on it.",
]


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
        rows.append([LABELS.get(key, key), *(percent(stats["sets"][name][metric], stats["seeds"]) for name in names)])
    return _table(header, rows, f"{METRIC_NAMES[metric]} per OOD set, in % (number of images in brackets)")


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
        [
            "GODIN (f)",
            f"{config['godin_similarity']} h, no weight decay on h; epsilon {_epsilons(metrics)} of the grid 0-0.08",
            "Hsu et al.: the paper's best h and its epsilon grid (plus 0); epsilon = the value with the largest mean "
            "score on ID data, here the training digits (no validation split, no OOD image); the perturbation is "
            "applied to the model's inputs, here raw [0, 1] pixels",
        ],
        [
            "GAN outliers (g)",
            f"DCGAN width {config['gan_width']}, beta {config['gan_beta']:g}, Adam 2e-4 (0.5, 0.999), one D and "
            "one G step per classifier step",
            "Lee et al.'s public code (beta 1 except for CIFAR-10, 0.1); scored with MSP as in the paper",
        ],
        [
            "DREAM-ID inliers",
            f"k / anchor set / anchors per round {_inlier_settings(seed0)}, sigma "
            f"{seed0['inlier_sampler']['sigma']:.3g}, keep 1, {config['inliers_per_class']} per class",
            "packaged imagenet100-dream-id (k 300, anchor set 1,000 of 1,000, 100 per round, sigma 0.01, keep 1), "
            "scaled like Phase 2",
        ],
        [
            "augmentation baselines",
            f"RandAugment, AutoAugment, AugMix, CutMix: {config['inliers_per_class']} fixed copies per class appended",
            "torchvision with the paper's settings (2 ops of magnitude 9; ImageNet policy; 3 chains, alpha 1; "
            "alpha 1), as many images as DREAM-ID appends (Table 4)",
        ],
        [
            "MEMO",
            f"{config['memo_augmentations']} AugMix copies, one SGD step of lr {config['memo_lr']:g}, BatchNorm "
            f"prior {config['memo_prior_strength']}",
            "MEMO's CIFAR-10 code (32 copies, lr 0.005); prior 16 from its ImageNet code",
        ],
        [
            "rotated test digits",
            f"each ID test digit rotated by a uniform angle in ±{config['rotation_degrees']:g}°, bilinear, seeded",
            "a small shift fixed before any model was scored on it",
        ],
        ["post-hoc detectors", "fitted on model (a)'s training features", "KNN k scaled from 50 of 50,000"],
        ["seeds", ", ".join(str(s["seed"]) for s in metrics["seeds"]), "--seeds N: mean ± sample std"],
    ]


def _epsilons(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{s['godin_epsilon']:g}" for s in metrics["seeds"])


def _inlier_settings(seed: dict[str, Any]) -> str:
    sampler = seed["inlier_sampler"]
    return f"{sampler['k']} / {sampler['boundary_size']} / {sampler['anchors_per_round']}"


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
    ]
    if metrics["config"]["quick"]:
        blocks += [Block("h2", "Quick run: these numbers mean nothing"), Block("p", QUICK_RUN_NOTICE)]
    blocks.append(Block("h2", "Summary"))
    header, rows = summary_rows(metrics)
    blocks.append(
        _table(
            header,
            rows,
            "Energy score for models (a)-(e); GODIN's score for (f) (with its chosen input perturbation, and "
            "without); maximum softmax probability for (g); post-hoc scores on model (a). FPR95 (ID+) = fraction of "
            "OOD images accepted when 95% of ID test images are (lower is better); AUROC higher is better; in %. "
            + LEGEND,
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
            f"{embedding_projection(metrics['config']['quick'])[1]} of the ID embeddings (dots), anchors T(y) (stars) "
            "and sampled outlier embeddings (crosses), by class (the paper's Fig. 4).",
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

    blocks += _generalization_blocks(metrics)

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
                (
                    "seed-*/: the DREAM-OOD run folder of dreamood.pipeline.Pipeline: anchors, encoder (and encoder/ "
                    "checkpoints), feature bank, outlier embeddings (samples), the decoded outliers (images/), the "
                    "classifier (and classifier/ checkpoint and history), its report and the stage records (stages/)",
                ),
                ("seed-*/artifacts/: the noise-on-T(y) and the DREAM-ID inlier embeddings",),
                ("seed-*/outliers/token-noise/, seed-*/inliers/dream-id/: their decoded images with manifests",),
                (
                    "seed-*/classifiers/: checkpoint and training history of every other classifier (the GAN's "
                    "DCGAN: gan/dcgan.pt)",
                ),
                ("seed-*/reports/: one OOD report (JSON) per method",),
            ),
        )
    )
    return blocks


def _generalization_blocks(metrics: dict[str, Any]) -> list[Block]:
    """The generalisation section: what was compared, the table, the findings, what it can and cannot show."""
    table = metrics["generalization"]
    intensity = table["mean_intensity"]
    header, rows = generalization_rows(metrics)
    blocks = [
        Block("h2", "Generalisation: DREAM-ID and its baselines"),
        Block(
            "p",
            "DREAM-ID (the paper's Sec. 5) samples inlier embeddings around the densest points of each class, "
            "decodes them and appends them, with their labels, to the training set. Here the classifier of model "
            "(a) is trained from scratch, with the same recipe, on the training digits plus the decoded inliers, or "
            "plus as many fixed augmented copies of the training digits (RandAugment, AutoAugment, AugMix, "
            "CutMix: the paper's Table 4); MEMO adapts model (a) to each test image on its own (Zhang et al., "
            "NeurIPS 2022). The shifted test set rotates every ID test digit by a random small angle "
            f"(mean pixel value {intensity['rotated']:.2f} against {intensity['ID test']:.2f}).",
        ),
        _table(
            header,
            rows,
            "Top-1 accuracy in % (number of test images in brackets); change = rotated minus ID test, in points.",
        ),
        Block("list", rows=tuple((line,) for line in generalization_findings(metrics))),
    ]
    if "generalization" in metrics["figures"]:
        blocks.append(
            Block(
                "figure",
                "One class in every version used here: test digits, their rotated copies, training digits, DREAM-ID "
                "inliers and the augmented copies of each baseline.",
                path=metrics["figures"]["generalization"],
            )
        )
    blocks += [Block("p", text) for text in GENERALIZATION_LIMITS]
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
    timings = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in metrics["timings_s"].items())
    notice = [_wrap(QUICK_RUN_NOTICE, indent=""), ""] if metrics["config"]["quick"] else []
    text = "\n".join(
        [
            "",
            *notice,
            "DREAM-OOD demo: energy score for (a)-(e), GODIN's score for (f), MSP for (g), post-hoc rows on model (a); "
            "FPR95 (ID+) and AUROC in %",
            *_columns(*summary_rows(metrics)),
            _wrap(LEGEND, indent=""),
            "",
            *(_wrap(f"* {sentence}") for sentence in findings(metrics)),
            "",
            "Generalisation: top-1 accuracy in % on the ID test digits and on a rotated copy",
            *_columns(*generalization_rows(metrics)),
            "",
            *(_wrap(f"* {sentence}") for sentence in generalization_findings(metrics)),
            "",
            f"time: {metrics['total_s']:.0f}s ({timings})",
            f"report: {out_dir / 'report.html'}  (also report.md, metrics.json, figures/)",
        ]
    )
    if enabled:
        print(text)
    return text


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the others right-aligned, a dashed rule."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _wrap(text: str, width: int = 110, indent: str = "  ") -> str:
    import textwrap

    return textwrap.fill(text, width=width, subsequent_indent=indent)
