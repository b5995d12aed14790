"""The documentation's code runs and says what it claims.

* Every ``examples/howto_*.py`` runs (each on tiny random data, in seconds), and its results are checked against
  independent computations.
* Every ```python block of a docs page marked ``<!-- runnable -->`` runs; when a ```text block follows it, the
  block's printed output must equal that text.
* Every snippet include of the docs names an existing file (and section), and every how-to script is included
  by a page.
* The other ```python blocks of every page (which may need real data or weights) compile, and every name they
  import from dreamood exists.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import math
import re
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
HOWTO_SCRIPTS = sorted(p.name for p in EXAMPLES.glob("howto_*.py"))
# Every page's other python blocks (real data, real weights) are compiled and import-checked.
CHECKED_PAGES = sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_RUNNABLE = "<!-- runnable -->"
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$', re.MULTILINE)


# ---- helpers ---------------------------------------------------------------------------------------------------


def _load(script: str) -> dict[str, Any]:
    """The namespace of an example script, executed as a module (its ``main`` is not called)."""
    return runpy.run_path(str(EXAMPLES / script), run_name=f"docs_example_{Path(script).stem}")


def _run_main(script: str) -> tuple[dict[str, Any], Any, str]:
    """Load a script, call its ``main()`` and return (namespace, result, printed output)."""
    namespace = _load(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = namespace["main"]()
    return namespace, result, out.getvalue()


def _fences(text: str) -> list[tuple[int, int, str, str]]:
    """Every fenced block of a markdown page: (start offset, end offset, language, body)."""
    return [(m.start(), m.end(), m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def _runnable_blocks(page: Path) -> list[tuple[str, str | None]]:
    """The python blocks marked runnable on ``page``, each with the text block right after it (or ``None``)."""
    text = page.read_text()
    fences = _fences(text)
    blocks = []
    for marker in (m.end() for m in re.finditer(re.escape(_RUNNABLE), text)):
        following = [f for f in fences if f[0] >= marker]
        assert following and following[0][2] == "python", f"{page}: {_RUNNABLE} must precede a ```python block"
        start, end, _, code = following[0]
        assert not text[marker:start].strip(), f"{page}: only blank lines may separate {_RUNNABLE} and its block"
        expected = None
        if len(following) > 1 and following[1][2] == "text" and not text[end : following[1][0]].strip():
            expected = following[1][3]
        blocks.append((code, expected))
    return blocks


def _all_runnable() -> Iterator[Any]:
    for page in sorted(DOCS.rglob("*.md")):
        for index, (code, expected) in enumerate(_runnable_blocks(page)):
            yield pytest.param(code, expected, id=f"{page.relative_to(DOCS)}[{index}]")


# ---- documentation structure -----------------------------------------------------------------------------------


def test_every_howto_script_is_tested_and_included_by_a_page() -> None:
    assert HOWTO_SCRIPTS == [
        "howto_custom_decoder.py",
        "howto_custom_detector.py",
        "howto_custom_sampler.py",
        "howto_feature_sampler_loop.py",
        "howto_only_outliers.py",
    ], "a new how-to script needs its checks in this file"
    included = {path for page in DOCS.rglob("*.md") for path in _SNIPPET.findall(page.read_text())}
    for script in HOWTO_SCRIPTS:
        assert f"examples/{script}" in included, f"{script} is not included by any docs page"
        source = (EXAMPLES / script).read_text()
        assert 'if __name__ == "__main__":\n    main()' in source, f"{script} must run main() as a script"


def test_snippet_includes_name_existing_files_and_sections() -> None:
    found = 0
    for page in DOCS.rglob("*.md"):
        for target in _SNIPPET.findall(page.read_text()):
            path, _, section = target.partition(":")
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} includes missing file {path}"
            if section:
                text = (ROOT / path).read_text()
                assert f"--8<-- [start:{section}]" in text and f"--8<-- [end:{section}]" in text, target
            found += 1
    assert found >= 5


def test_runnable_marker_is_used() -> None:
    assert len(list(_all_runnable())) >= 3


@pytest.mark.parametrize("code,expected", list(_all_runnable()))
def test_runnable_docs_block(code: str, expected: str | None) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs block>", "exec"), {"__name__": "__docs__"})
    if expected is not None:
        printed = [line.rstrip() for line in out.getvalue().rstrip("\n").splitlines()]
        assert printed == [line.rstrip() for line in expected.rstrip("\n").splitlines()]


@pytest.mark.parametrize("page", CHECKED_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_compile_and_import_existing_names(page: Path) -> None:
    for _, _, language, code in _fences(page.read_text()):
        if language != "python" or code.lstrip().startswith("--8<--"):
            continue
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dreamood":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "dreamood":
                        importlib.import_module(alias.name)


def test_concepts_numbers_follow_from_the_formulas() -> None:
    # The sigma table of the concepts page, from the closed form instead of sampling.
    text = (DOCS / "concepts.md").read_text()
    for sigma, angle, distance in ((0.01, 15.5, 0.269), (0.03, 39.7, 0.680), (0.07, 62.7, 1.041)):
        norm = sigma * math.sqrt(768)
        assert math.degrees(math.atan(norm)) == pytest.approx(angle, abs=0.15)
        assert math.sqrt(2 - 2 / math.sqrt(1 + norm**2)) == pytest.approx(distance, abs=0.005)
        assert f"{angle:9.1f} deg" in text
    assert math.sqrt(0.03 * 768) == pytest.approx(4.8, abs=0.01)
    assert "sqrt{0.03 \\cdot 768} = 4.8" in text


# ---- examples/howto_custom_sampler.py --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_run() -> tuple[dict[str, Any], Any, str]:
    return _run_main("howto_custom_sampler.py")


def test_custom_sampler_output_and_protocol(sampler_run: tuple[dict[str, Any], Any, str]) -> None:
    namespace, result, printed = sampler_run
    from dreamood import EmbeddingSampler

    assert isinstance(namespace["ShellSampler"](), EmbeddingSampler)
    for row in ("bank itself", "ShellSampler", "KNNBoundarySampler", "saved and reloaded"):
        assert row in printed
    samples, anchors = result["samples"], result["anchors"]
    assert len(samples) == 50 * anchors.num_classes
    assert samples.labels.tolist() == [c for c in range(anchors.num_classes) for _ in range(50)]
    # Every vector has the norm of its class token.
    torch.testing.assert_close(samples.vectors.norm(dim=1), anchors.norms[samples.labels], rtol=1e-5, atol=1e-6)


def test_custom_sampler_angles_match_an_independent_computation(sampler_run: tuple[dict[str, Any], Any, str]) -> None:
    namespace, result, _ = sampler_run
    bank, samples = result["bank"], result["samples"]
    shell = namespace["ShellSampler"](quantile=0.95, margin=1.25)
    for c in range(bank.num_classes):
        members = bank.per_class(c).double().numpy()
        centre = members.mean(axis=0)
        centre /= np.linalg.norm(centre)
        theta = min(1.25 * np.quantile(np.arccos(np.clip(members @ centre, -1, 1)), 0.95), np.pi)
        unit = samples.for_class(c).vectors.double().numpy()
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        np.testing.assert_allclose(np.arccos(np.clip(unit @ centre, -1, 1)), theta, atol=1e-4)
        assert shell.shell_angle(torch.from_numpy(members))[1] == pytest.approx(theta, abs=1e-9)


def test_custom_sampler_is_seeded_and_checks_its_input(sampler_run: tuple[dict[str, Any], Any, str]) -> None:
    namespace, result, _ = sampler_run
    bank, anchors = result["bank"], result["anchors"]
    shell = namespace["ShellSampler"]()
    first = shell.sample(bank, anchors, 5, generator=torch.Generator().manual_seed(3))
    again = shell.sample(bank, anchors, 5, generator=torch.Generator().manual_seed(3))
    other = shell.sample(bank, anchors, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.vectors, again.vectors) and not torch.equal(first.vectors, other.vectors)
    from dreamood import FeatureBank

    with pytest.raises(ValueError, match="normalised"):
        shell.sample(FeatureBank(2 * bank.embeddings, bank.labels), anchors, 5)


def test_custom_sampler_distances_are_brute_force_knn(sampler_run: tuple[dict[str, Any], Any, str]) -> None:
    _, result, _ = sampler_run
    bank, samples, distances = result["bank"], result["samples"], result["distances"]
    k = 10
    for c in range(bank.num_classes):
        members = bank.per_class(c).double().numpy()
        unit = samples.for_class(c).vectors.double().numpy()
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        pairwise = np.linalg.norm(unit[:, None, :] - members[None, :, :], axis=2)
        assert distances["ShellSampler"][c] == pytest.approx(np.sort(pairwise, axis=1)[:, k - 1].mean(), abs=1e-5)
        own = np.linalg.norm(members[:, None, :] - members[None, :, :], axis=2)
        np.fill_diagonal(own, np.inf)  # a point is not its own neighbour
        assert distances["bank itself"][c] == pytest.approx(np.sort(own, axis=1)[:, k - 1].mean(), abs=1e-5)
        # Both samplers place their vectors farther from the class than its own points are from each other.
        assert distances["ShellSampler"][c] > distances["bank itself"][c]
        assert distances["KNNBoundarySampler"][c] > distances["bank itself"][c]


# ---- examples/howto_custom_decoder.py --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_run() -> tuple[dict[str, Any], Any, str]:
    return _run_main("howto_custom_decoder.py")


def test_custom_decoder_keeps_the_protocol(decoder_run: tuple[dict[str, Any], Any, str]) -> None:
    _, result, printed = decoder_run
    from dreamood import EmbeddingDecoder

    decoder, together, alone = result["decoder"], result["together"], result["alone"]
    assert isinstance(decoder, EmbeddingDecoder)
    assert together.shape == (4, 3, 32, 32)
    assert float(together.min()) >= 0.0 and float(together.max()) <= 1.0
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    samples = result["samples"]
    # The same seed gives the same image; another seed another image.
    vectors, labels = samples.vectors[:1], samples.labels[:1]
    assert torch.equal(decoder.decode(vectors, labels, [5]), decoder.decode(vectors, labels, [5]))
    assert not torch.equal(decoder.decode(vectors, labels, [5]), decoder.decode(vectors, labels, [6]))
    with pytest.raises(ValueError, match="one label and one seed"):
        decoder.decode(vectors, labels, [1, 2])
    assert "wrote 12 images; the re-run skipped 12" in printed


def test_custom_decoder_images_read_back_with_their_labels(decoder_run: tuple[dict[str, Any], Any, str]) -> None:
    _, result, printed = decoder_run
    # generate_images renders the first 4 rows of each class in class order.
    assert result["labels"] == [0] * 4 + [1] * 4 + [2] * 4
    assert "read back 12 images, the first (3, 32, 32) of class 'cat'" in printed


# ---- examples/howto_custom_detector.py -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector_run() -> tuple[dict[str, Any], Any, str]:
    return _run_main("howto_custom_detector.py")


def test_custom_detector_matches_a_float64_computation(detector_run: tuple[dict[str, Any], Any, str]) -> None:
    _, result, _ = detector_run
    she, data, head = result["she"], result["data"], result["head"]
    weight = head.weight.detach().double().numpy()
    bias = head.bias.detach().double().numpy()
    train, labels = data["train"].double().numpy(), data["train_labels"].numpy()
    predicted = (train @ weight.T + bias).argmax(axis=1)
    patterns = np.stack([train[(labels == c) & (predicted == c)].mean(axis=0) for c in range(weight.shape[0])])
    for name in ("test", "near", "far"):
        features = data[name].double().numpy()
        expected = (features * patterns[(features @ weight.T + bias).argmax(axis=1)]).sum(axis=1)
        np.testing.assert_allclose(she.score(data[name]).double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_custom_detector_report_matches_sklearn(detector_run: tuple[dict[str, Any], Any, str]) -> None:
    from sklearn.metrics import roc_auc_score

    _, result, printed = detector_run
    she, data, report = result["she"], result["data"], result["reports"]["SHE"]
    id_scores = she.score(data["test"]).numpy()
    for name in ("near", "far"):
        ood_scores = she.score(data[name]).numpy()
        truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        assert report[name].metrics["auroc"] == pytest.approx(roc_auc_score(truth, np.r_[id_scores, ood_scores]))
    assert report["far"].metrics["auroc"] > report["near"].metrics["auroc"]
    assert "Zhang et al." in printed and "| far |" in printed


def test_custom_detector_follows_the_detector_conventions(detector_run: tuple[dict[str, Any], Any, str]) -> None:
    namespace, result, _ = detector_run
    from dreamood.detectors import Detector
    from dreamood.errors import NotFittedError

    she = namespace["SHE"](result["head"])
    assert isinstance(she, Detector)
    with pytest.raises(NotFittedError):
        she.score(result["data"]["test"])
    assert she.fit(result["data"]["train"], result["data"]["train_labels"]) is she
    with pytest.raises(ValueError, match="labels"):
        she.fit(result["data"]["train"])


# ---- examples/howto_feature_sampler_loop.py --------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_run() -> tuple[dict[str, Any], Any, str]:
    return _run_main("howto_feature_sampler_loop.py")


def test_feature_sampler_loop_trains_all_three(loop_run: tuple[dict[str, Any], Any, str]) -> None:
    _, result, printed = loop_run
    assert list(result["metrics"]) == ["cross-entropy only", "VOS, own loop", "NPOS, train_classifier"]
    for name, metrics in result["metrics"].items():
        assert name in printed
        assert metrics["accuracy"] > 0.9  # three well separated blobs
        assert 0.0 <= metrics["fpr95"] <= 1.0 and 0.0 <= metrics["auroc"] <= 1.0
    # The samplers filled their queues and were drawn from.
    assert result["samplers"]["VOS"].ready and result["samplers"]["NPOS"].ready


def test_feature_sampler_loop_metrics_match_an_independent_computation(
    loop_run: tuple[dict[str, Any], Any, str],
) -> None:
    from sklearn.metrics import roc_auc_score

    _, result, _ = loop_run
    data = result["data"]
    for name, model in result["models"].items():
        with torch.no_grad():
            id_logits = model(data["test_x"]).double().numpy()
            ood_logits = model(data["ood_x"]).double().numpy()

        def negative_energy(logits: np.ndarray) -> np.ndarray:
            top = logits.max(axis=1, keepdims=True)
            return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]

        scores = np.r_[negative_energy(id_logits), negative_energy(ood_logits)]
        truth = np.r_[np.ones(len(id_logits)), np.zeros(len(ood_logits))]
        assert result["metrics"][name]["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
        labels = np.repeat(np.arange(3), 64)
        assert result["metrics"][name]["accuracy"] == pytest.approx((id_logits.argmax(axis=1) == labels).mean())


# ---- examples/howto_only_outliers.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outliers_run() -> tuple[dict[str, Any], Any, str]:
    pytest.importorskip("pytorch_ood")
    return _run_main("howto_only_outliers.py")


def test_only_outliers_openood_list_reads_as_openood_does(outliers_run: tuple[dict[str, Any], Any, str]) -> None:
    _, result, printed = outliers_run
    lines = result["imglist_lines"]
    assert len(lines) == 96  # 32 outliers for each of the 3 classes
    for line in lines:
        name, label = line.split(" ", 1)  # OpenOOD's ImglistDataset splits at the first space
        assert int(label) == -1 and not name.startswith("/")
        assert re.fullmatch(r"00[0-2]_(low|middle|high)/\d{6}\.png", name)
    assert "B. OpenOOD image list: 96 lines" in printed


def test_only_outliers_training_moves_the_energy_score(outliers_run: tuple[dict[str, Any], Any, str]) -> None:
    from sklearn.metrics import roc_auc_score

    namespace, result, printed = outliers_run
    results, models, test = result["results"], result["models"], result["test"]
    assert list(results) == ["cross-entropy only", "A. own loop + energy", "C. pytorch-ood loss"]
    images, labels = test.tensors
    ood = namespace["ToyOutlierDecoder"]().decode(torch.zeros(len(labels), 4), labels, list(range(10_000, 10_192)))
    for name, model in models.items():
        with torch.no_grad():
            scores = [torch.logsumexp(model(x).double(), dim=1) for x in (images, ood)]  # negative energy, T = 1
        expected = roc_auc_score([1] * len(images) + [0] * len(ood), torch.cat(scores).numpy())
        assert results[name]["auroc"] == pytest.approx(expected, abs=1e-6)
        assert results[name]["accuracy"] >= 0.95
        assert f"{name:<24}" in printed
    baseline = results["cross-entropy only"]["auroc"]
    assert results["A. own loop + energy"]["auroc"] > baseline + 0.05
    assert results["C. pytorch-ood loss"]["auroc"] > baseline + 0.05
