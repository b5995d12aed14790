"""Tests of ``dreamood demo``: its data (digits, far-OOD photographs, intensity matching) and the pipeline."""

from __future__ import annotations

import argparse
import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamood.demo import add_arguments, config_from_args, main, run_from_args
from dreamood.demo.config import DemoConfig
from dreamood.demo.data import (
    DIGIT_NAMES,
    FAR_OOD_SETS,
    far_ood_sets,
    load_digits_data,
    match_intensity,
    parse_id_classes,
    to_digit_format,
)
from dreamood.demo.report import Block, aggregate, aggregate_accuracy, render_html, render_markdown

# ---------------------------------------------------------------------------------------------------- digits


def _on_digit_grid(images: torch.Tensor) -> bool:
    scaled = images.double() * 16
    return bool(torch.all(scaled == scaled.round()))


def test_digits_split_is_stratified_disjoint_and_complete() -> None:
    from sklearn.datasets import load_digits

    data = load_digits_data((0, 1, 2, 3, 4, 5), test_fraction=0.3, seed=0)
    bunch = load_digits()
    assert data.train_images.shape[1:] == (1, 8, 8) and data.train_images.dtype == torch.float32
    assert data.class_names == ("zero", "one", "two", "three", "four", "five")
    for images in (data.train_images, data.test_images, data.near_ood_images):
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert _on_digit_grid(images)
    # Every ID image lands in exactly one split: compare the multisets of flattened images.
    id_rows = np.isin(bunch.target, range(6))
    expected = sorted(map(bytes, (bunch.images[id_rows] / 16.0).astype(np.float32).reshape(-1, 64)))
    found = sorted(map(bytes, torch.cat([data.train_images, data.test_images]).reshape(-1, 64).numpy()))
    assert found == expected
    # Stratified: each class's test share is within one image of 30%.
    totals = np.bincount(bunch.target[id_rows])
    test_counts = torch.bincount(data.test_labels, minlength=6).numpy()
    assert np.all(np.abs(test_counts - 0.3 * totals) <= 1.0)
    # Labels are the digits themselves for ID classes 0-5: check against pixel-identical source images.
    first = data.train_images[0, 0].numpy() * 16
    matches = [int(t) for img, t in zip(bunch.images, bunch.target) if np.array_equal(img, first)]
    assert int(data.train_labels[0]) in matches
    assert len(data.near_ood_images) == int((~id_rows).sum())
    assert set(data.near_ood_digits.tolist()) == {6, 7, 8, 9}


def test_digits_split_depends_only_on_the_seed() -> None:
    first, again = load_digits_data(seed=3), load_digits_data(seed=3)
    other = load_digits_data(seed=4)
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.test_images, other.test_images)


@pytest.mark.parametrize("classes", [(4, 5, 6, 7, 8, 9), (0, 9), (1, 3, 5, 7)])
def test_any_subset_of_digits_can_be_in_distribution(classes: tuple[int, ...]) -> None:
    from sklearn.datasets import load_digits

    data = load_digits_data(classes, seed=1)
    bunch = load_digits()
    assert data.id_classes == classes
    assert data.class_names == tuple(DIGIT_NAMES[d] for d in classes)
    assert sorted(torch.unique(data.train_labels).tolist()) == list(range(len(classes)))
    # Label i is digit classes[i]: every training image appears in the source under that digit.
    lookup: dict[bytes, set[int]] = {}
    for image, target in zip(bunch.images, bunch.target):
        lookup.setdefault((image / 16.0).astype(np.float32).tobytes(), set()).add(int(target))
    for image, label in zip(data.train_images[:50], data.train_labels[:50]):
        assert classes[int(label)] in lookup[image[0].numpy().tobytes()]
    assert set(data.near_ood_digits.tolist()) == set(range(10)) - set(classes)


def test_parse_id_classes() -> None:
    assert parse_id_classes("0,1,2,3,4,5") == (0, 1, 2, 3, 4, 5)
    assert parse_id_classes("4-9") == (4, 5, 6, 7, 8, 9)
    assert parse_id_classes(" 7, 1-2 ,2") == (1, 2, 7)
    assert parse_id_classes([3, 1]) == (1, 3)
    for bad in ("0-9", "5", "a,b", "3-1", "1,12", "1-2-3", ""):
        with pytest.raises(ValueError, match="id_classes"):
            parse_id_classes(bad)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_data(test_fraction=1.0)


# ---------------------------------------------------------------------------------------------------- far-OOD


def test_to_digit_format_is_block_mean_stretched_and_quantised() -> None:
    rng = np.random.default_rng(0)
    blocks = rng.uniform(0, 255, size=(8, 8))
    image = np.kron(blocks, np.ones((3, 3))) + rng.uniform(-1, 1, size=(24, 24))
    means = image.reshape(8, 3, 8, 3).mean(axis=(1, 3))
    expected = np.round((means - means.min()) / (means.max() - means.min()) * 16) / 16
    result = to_digit_format(image)
    assert result.shape == (1, 8, 8)
    np.testing.assert_allclose(result[0].numpy(), expected, atol=1e-7)
    colour = np.stack([image, image, image], axis=2)
    np.testing.assert_allclose(to_digit_format(colour)[0].numpy(), expected, atol=1e-6)
    assert torch.equal(to_digit_format(np.full((16, 16), 7.0)), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        to_digit_format(np.zeros((12, 16)))


def test_far_ood_sets_shapes_ranges_and_determinism() -> None:
    sets = far_ood_sets(30, seed=0)
    assert list(sets) == list(FAR_OOD_SETS)
    assert sets["textures"].shape == (30, 1, 8, 8) and sets["photos"].shape == (30, 1, 8, 8)
    assert sets["faces"].shape == (30, 1, 8, 8)
    assert far_ood_sets(150, seed=0)["faces"].shape[0] == 100
    for images in sets.values():
        assert float(images.min()) == 0.0 and float(images.max()) == 1.0
        assert _on_digit_grid(images)
        # Every image is stretched to the full range, like the digits.
        assert torch.all(images.flatten(1).amin(1) == 0) and torch.all(images.flatten(1).amax(1) == 1)
    again, other = far_ood_sets(30, seed=0), far_ood_sets(30, seed=1)
    assert all(torch.equal(sets[n], again[n]) for n in sets)
    assert not torch.equal(sets["textures"], other["textures"])


def _reference_match(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Independent float64 implementation: walk the pixels in (value, position) order."""
    flat = image.ravel().astype(np.float64)
    order = sorted(range(flat.size), key=lambda i: (flat[i], i))
    out = np.empty_like(flat)
    for rank, position in enumerate(order):
        out[position] = np.sort(reference.ravel())[rank]
    return out.reshape(image.shape)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.booleans(),
)
def test_match_intensity_keeps_the_reference_multiset_and_the_image_order(
    n_images: int, n_reference: int, seed: int, ties: bool
) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 4, size=(n_images, 1, 3, 3)) if ties else rng.uniform(size=(n_images, 1, 3, 3))
    reference = rng.integers(0, 17, size=(n_reference, 1, 3, 3)) / 16.0
    generator = torch.Generator().manual_seed(seed)
    result = match_intensity(torch.tensor(images, dtype=torch.float64), torch.tensor(reference), generator=generator)
    chosen = torch.randint(n_reference, (n_images,), generator=torch.Generator().manual_seed(seed)).numpy()
    assert result.shape == images.shape and result.dtype == torch.float64
    for index in range(n_images):
        ref = reference[chosen[index]]
        out = result[index].numpy()
        assert sorted(out.ravel()) == sorted(ref.ravel())
        np.testing.assert_array_equal(out, _reference_match(images[index], ref))
        flat_in, flat_out = images[index].ravel(), out.ravel()
        for i in range(flat_in.size):
            for j in range(flat_in.size):
                if flat_in[i] < flat_in[j]:
                    assert flat_out[i] <= flat_out[j]


def test_match_intensity_on_real_data_gives_id_pixel_multisets() -> None:
    data = load_digits_data(seed=0)
    photos = far_ood_sets(20, seed=0)["photos"]
    matched = match_intensity(photos, data.train_images, generator=torch.Generator().manual_seed(0))
    id_multisets = {bytes(np.sort(img.ravel())) for img in data.train_images.numpy()}
    assert all(bytes(np.sort(img.ravel())) in id_multisets for img in matched.numpy())
    with pytest.raises(ValueError, match="per image"):
        match_intensity(photos, torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="reference is empty"):
        match_intensity(photos, torch.zeros(0, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        match_intensity(photos, torch.zeros(3, 1, 8, 8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- report


def _report(values: dict[str, dict[str, float]], accuracy: float | None) -> dict[str, Any]:
    rows = [{"name": name, "n_ood": 10, "metrics": metrics, "std": None} for name, metrics in values.items()]
    return {"rows": rows, "id_accuracy": accuracy}


def test_aggregate_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    seeds = [{n: {"auroc": float(rng.uniform()), "fpr95": float(rng.uniform())} for n in names} for _ in range(4)]
    accuracies = [0.9, 0.8, 0.85, 0.95]
    result = aggregate([_report(s, a) for s, a in zip(seeds, accuracies)], {"g": ["a", "c"], "missing": ["z"]})
    values = np.array([[seed[n]["auroc"] for n in names] for seed in seeds])
    assert result["sets"]["b"]["auroc"]["mean"] == pytest.approx(values[:, 1].mean())
    assert result["sets"]["b"]["auroc"]["std"] == pytest.approx(values[:, 1].std(ddof=1))
    group = values[:, [0, 2]].mean(axis=1)
    assert result["groups"]["g"]["auroc"]["mean"] == pytest.approx(group.mean())
    assert result["groups"]["g"]["auroc"]["std"] == pytest.approx(group.std(ddof=1))
    assert "missing" not in result["groups"]
    assert result["id_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    single = aggregate([_report(seeds[0], None)], {"g": ["a"]})
    assert single["sets"]["a"]["auroc"]["std"] == 0.0 and single["id_accuracy"] is None
    with pytest.raises(ValueError, match="different OOD sets"):
        aggregate([_report(seeds[0], None), _report({"a": seeds[1]["a"]}, None)], {})


def test_aggregate_accuracy_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    seeds = [{m: {"ID test": rng.uniform(), "rotated": rng.uniform()} for m in ("a", "b")} for _ in range(3)]
    result = aggregate_accuracy(seeds)
    assert list(result) == ["a", "b"] and list(result["b"]) == ["ID test", "rotated"]
    values = np.array([seed["b"]["rotated"] for seed in seeds])
    assert result["b"]["rotated"]["mean"] == pytest.approx(values.mean())
    assert result["b"]["rotated"]["std"] == pytest.approx(values.std(ddof=1))
    assert aggregate_accuracy(seeds[:1])["a"]["ID test"] == {"mean": seeds[0]["a"]["ID test"], "std": 0.0}
    with pytest.raises(ValueError, match="different methods"):
        aggregate_accuracy([seeds[0], {"a": seeds[1]["a"]}])
    with pytest.raises(ValueError, match="empty"):
        aggregate_accuracy([])


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("img", "meta"):
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "td":
            self.cells.append(data)


def test_render_markdown_and_html(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "x.png").write_bytes(png)
    blocks = [
        Block("h1", "Title <&>"),
        Block("p", "text"),
        Block("table", "caption", ("a|b", "c"), (("1", "<2>"),)),
        Block("figure", "a figure", path="figures/x.png"),
        Block("list", rows=(("one",), ("two",))),
    ]
    markdown = render_markdown(blocks)
    assert "# Title <&>" in markdown and "| a\\|b | c |" in markdown and "![a figure](figures/x.png)" in markdown
    page = render_html(blocks, tmp_path)
    parser = _Collect()
    parser.feed(page)
    assert parser.stack == []
    assert parser.cells == ["1", "<2>"]
    assert parser.images == ["data:image/png;base64," + base64.b64encode(png).decode()]
    assert "Title &lt;&amp;&gt;" in page


# ---------------------------------------------------------------------------------------------------- command line


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_options() -> None:
    config = config_from_args(_parse(["--id-classes", "4-9", "--seeds", "3", "--no-cache", "--device", "cpu"]))
    assert config.id_classes == (4, 5, 6, 7, 8, 9) and config.seeds == 3 and not config.use_cache
    assert config == DemoConfig(id_classes=(4, 5, 6, 7, 8, 9), seeds=3, use_cache=False, device="cpu")
    quick = config_from_args(_parse(["--quick"]))
    assert quick.quick and quick.decoder_epochs < DemoConfig().decoder_epochs
    assert run_from_args(_parse(["--seeds", "0"])) == 2
    assert run_from_args(_parse(["--id-classes", "0-9"])) == 2
    assert main(["--threads", "0"]) == 2


# ---------------------------------------------------------------------------------------------------- pipeline


def test_demo_modules_import_each_other_without_a_cycle() -> None:
    """The report owns the labels; no demo module imports one that imports it back (even inside a function)."""
    import ast

    import dreamood.demo

    folder = Path(dreamood.demo.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dreamood.demo."):
                names.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = names - {path.stem}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for name in graph.get(start, set()):
            if name == target or (name not in seen and reaches(name, target, seen | {name})):
                return True
        return False

    assert not [name for name in graph if reaches(name, name, {name})]
    assert "pipeline" not in graph["report"] and "pipeline" not in graph["labels"]


def test_quick_demo_runs_every_stage_and_reports_what_it_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.metrics import roc_auc_score

    from dreamood.demo.labels import GENERALIZATION, METHODS, OOD_BASELINES, QUICK_RUN_NOTICE, set_groups

    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--quick", "--out", str(out), "--cache-dir", str(cache), "--id-classes", "3,5,8", "--seed", "2"]
    assert main([*argv, "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr()
    # --no-progress hides the bars only: the stage headers are logged (stderr); the summary goes to stdout.
    assert "== data" in printed.err and "== evaluation (seed 2)" in printed.err and "== data" not in printed.out
    assert QUICK_RUN_NOTICE[:40] in printed.out and "(b) DREAM-OOD" in printed.out

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["class_names"] == ["three", "five", "eight"]
    names = list(metrics["data"]["ood_sets"])
    assert names == [name for group in set_groups().values() for name in group]
    posthoc = {"posthoc_msp", "posthoc_maxlogit", "posthoc_mahalanobis", "posthoc_knn", "posthoc_vim"}
    assert set(METHODS) | set(OOD_BASELINES) | posthoc | {"posthoc_react", "pixel_mean"} == set(metrics["aggregate"])
    for key, stats in metrics["aggregate"].items():
        saved = json.loads((out / "seed-2" / "reports" / f"{key}.json").read_text())
        assert [row["name"] for row in saved["rows"]] == names
        for row in saved["rows"]:
            assert stats["sets"][row["name"]]["auroc"]["mean"] == pytest.approx(row["metrics"]["auroc"])
    for key in [*METHODS, *OOD_BASELINES]:
        assert 0.0 <= metrics["aggregate"][key]["id_accuracy"]["mean"] <= 1.0
    # Every classifier, GODIN's and CutMix's included, trains with the shared loop and writes its checkpoint.
    for key in [*METHODS, "godin", "gan", *(k for k in GENERALIZATION if k not in ("ce", "memo"))]:
        # DREAM-OOD's classifier is the pipeline's classifier stage, in the seed folder's classifier/.
        folder = out / "seed-2" / ("classifier" if key == "dream_ood" else f"classifiers/{key}")
        assert (folder / "checkpoint.pt").is_file(), key
        history = json.loads((folder / "metrics.json").read_text())["history"]
        assert len(history) == metrics["config"]["classifier_epochs"], key

    # The evaluation sets are what they claim: recompute the pixel-mean detector's AUROC from scratch.
    data = load_digits_data((3, 5, 8), seed=2)
    far = far_ood_sets(metrics["config"]["far_ood_per_set"], seed=2)
    generator = torch.Generator().manual_seed(2)
    matched = {f"{n}, matched": match_intensity(x, data.train_images, generator=generator) for n, x in far.items()}
    sets = {"near-OOD digits": data.near_ood_images, **far, **matched}
    reference = float(data.train_images.mean(dim=(1, 2, 3)).double().mean())
    id_scores = -(data.test_images.double().mean(dim=(1, 2, 3)) - reference).abs().numpy()
    for name, images in sets.items():
        ood_scores = -(images.double().mean(dim=(1, 2, 3)) - reference).abs().numpy()
        truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        expected = roc_auc_score(truth, np.r_[id_scores, ood_scores])
        assert metrics["aggregate"]["pixel_mean"]["sets"][name]["auroc"]["mean"] == pytest.approx(expected, abs=1e-4)

    _check_baselines_against_scratch(out, metrics, data, sets)

    # Artefacts of every stage, figures, both reports.
    for path in (
        "artifacts/decoder/decoder.safetensors",
        "artifacts/anchors.safetensors",
        "seed-2/anchors.safetensors",
        "seed-2/feature_bank.safetensors",
        "seed-2/samples.safetensors",
        "seed-2/encoder/encoder_checkpoint.pt",
        "seed-2/images/manifest.jsonl",
        "seed-2/classifier.pt",
        "seed-2/report.json",
        "seed-2/outliers/token-noise/manifest.jsonl",
        "seed-2/artifacts/inlier_embeddings.safetensors",
        "seed-2/classifiers/gan/dcgan.pt",
    ):
        assert (out / path).is_file(), path
    assert set(metrics["figures"]) == {"data", "decoder", "embeddings", "sigmas", "outliers", "generalization"}
    for figure in metrics["figures"].values():
        assert (out / figure).read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(page)
    assert parser.stack == [] and len(parser.images) == 6
    markdown = (out / "report.md").read_text()
    assert "What this benchmark can and cannot show" in markdown and "(b) DREAM-OOD" in markdown
    # A quick run says so at the top; its embedding figure is a PCA and the caption says so.
    assert markdown.index("Quick run: these numbers mean nothing") < markdown.index("## Summary")
    assert QUICK_RUN_NOTICE in markdown and QUICK_RUN_NOTICE in page and "PCA of the ID embeddings" in markdown
    assert "| (f) GODIN |" in markdown and "| (g) GAN outliers, MSP |" in markdown
    assert "## Generalisation: DREAM-ID and its baselines" in markdown and "What it cannot show" in markdown
    for label in GENERALIZATION.values():
        assert f"| {label} |" in markdown
    assert set(metrics["timings_s"]) >= {
        "data",
        "decoder",
        "phase 3: classifiers",
        "OOD baselines: GODIN, GAN",
        "evaluation",
        "generalisation: DREAM-ID inliers",
        "generalisation: classifiers",
        "generalisation: accuracy",
        "generalisation: MEMO",
    }

    # A second run loads the decoder from the cache and, with the same seed, reproduces every number.
    again = tmp_path / "again"
    assert main([*argv[:2], str(again), *argv[3:], "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    repeated = json.loads((again / "metrics.json").read_text())
    assert not metrics["decoder"]["from_cache"] and repeated["decoder"]["from_cache"]
    assert repeated["reports"] == metrics["reports"]
    assert repeated["seeds"][0]["generalization"] == metrics["seeds"][0]["generalization"]
    for name in ("feature_bank.safetensors", "samples.safetensors", "artifacts/token_noise_embeddings.safetensors"):
        assert (again / "seed-2" / name).read_bytes() == (out / "seed-2" / name).read_bytes()


def _check_baselines_against_scratch(
    out: Path, metrics: dict[str, Any], data: Any, sets: dict[str, torch.Tensor]
) -> None:
    """Recompute what the GODIN and generalisation rows claim from the saved weights and from scratch."""
    from sklearn.metrics import roc_auc_score

    from dreamood.baselines import GODIN, GodinClassifier
    from dreamood.demo.labels import GENERALIZATION
    from dreamood.io import load_checkpoint
    from dreamood.models import SmallConvNet

    config, seed = metrics["config"], metrics["seeds"][0]
    reports = {key: value[0] for key, value in metrics["reports"].items()}
    backbone = SmallConvNet(1, config["classifier_feature_dim"], width=config["classifier_width"])
    godin = GodinClassifier(backbone, len(data.class_names), similarity=config["godin_similarity"])
    godin.load_state_dict(load_checkpoint(out / "seed-2" / "classifiers" / "godin" / "checkpoint.pt")["model"])
    godin.eval()
    with torch.no_grad():
        h_id = godin.similarities(data.test_images).double()
        h_near = godin.similarities(sets["near-OOD digits"]).double()
    # Accuracy: argmax of h (g > 0 only rescales a row); both GODIN rows report the same classifier.
    accuracy = float((h_id.argmax(dim=1) == data.test_labels).double().mean())
    assert reports["godin"]["id_accuracy"] == pytest.approx(accuracy)
    assert reports["godin_eps0"]["id_accuracy"] == pytest.approx(accuracy)
    # epsilon = 0: the score is max_i h_i; its AUROC against the near-OOD digits, with scikit-learn.
    truth = np.r_[np.ones(len(h_id)), np.zeros(len(h_near))]
    expected = roc_auc_score(truth, np.r_[h_id.amax(dim=1).numpy(), h_near.amax(dim=1).numpy()])
    row = next(r for r in reports["godin_eps0"]["rows"] if r["name"] == "near-OOD digits")
    assert row["metrics"]["auroc"] == pytest.approx(expected, abs=1e-6)
    # The chosen epsilon is the grid value with the largest mean score on the ID training digits.
    scores = {float(eps): value for eps, value in seed["godin_validation_scores"].items()}
    assert seed["godin_epsilon"] == max(scores, key=lambda eps: scores[eps])
    detector = GODIN(godin, epsilons=[seed["godin_epsilon"], 0.0]).fit(data.train_images)
    assert detector.validation_scores_[0.0] == pytest.approx(scores[0.0], rel=1e-5)

    # Generalisation: every row, both test sets; the cross-entropy row agrees with the OOD evaluator.
    table = seed["generalization"]
    assert list(table) == list(GENERALIZATION)
    assert all(list(row) == ["ID test", "rotated"] and all(0 <= v <= 1 for v in row.values()) for row in table.values())
    assert table["ce"]["ID test"] == pytest.approx(reports["ce"]["id_accuracy"])
    assert metrics["generalization"]["sets"] == {"ID test": len(data.test_labels), "rotated": len(data.test_labels)}
    # DREAM-ID decoded exactly inliers_per_class labelled inliers per class.
    records = (out / "seed-2" / "inliers" / "dream-id" / "manifest.jsonl").read_text().splitlines()
    counts = np.bincount([json.loads(line)["class_index"] for line in records], minlength=len(data.class_names))
    assert counts.tolist() == [config["inliers_per_class"]] * len(data.class_names)


def test_a_killed_runs_figure_temporaries_are_removed(tmp_path: Path) -> None:
    from dreamood.demo.pipeline import _output_dir

    (tmp_path / "figures").mkdir()
    stale = [tmp_path / "figures" / ".embeddings.png.k2j3h.tmp", tmp_path / ".metrics.json.a8d7f.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    (tmp_path / "figures" / "data.png").write_bytes(b"a figure")
    assert _output_dir(str(tmp_path)) == tmp_path
    assert not any(path.exists() for path in stale) and (tmp_path / "figures" / "data.png").exists()
