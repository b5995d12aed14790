"""The two example pipelines (smoke runs), resuming, determinism, and a run from a config file on real folders."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from dreamood.anchors import TokenEmbeddings
from dreamood.cli import main as cli_main
from dreamood.config import PipelineConfig, load_config
from dreamood.errors import ArtifactError
from dreamood.evaluation import OODReport
from dreamood.pipeline import (
    GENERALIZATION_BASELINES,
    OOD_BASELINES,
    SMOKE_BASELINES,
    STAGES,
    BaselineConfig,
    Pipeline,
    accuracy_table,
    baselines_of,
    build_backbone,
    build_data,
    class_names_of,
    ood_table,
    parse_baselines,
)
from dreamood.testing import smoke_setup

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.getbasetemp() / "dreamood-tiny-sd"
    smoke_setup(PipelineConfig(), tmp_path_factory.mktemp("unused"), model_dir=model)
    return model


def _run_dir(root: Path, tiny_sd: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny-stable-diffusion").symlink_to(tiny_sd, target_is_directory=True)
    return root


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_example(name: str, *argv: str) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert _example(name).main(list(argv)) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> tuple[Path, str]:
    out = _run_dir(tmp_path_factory.mktemp("cifar") / "run", tiny_sd)
    return out, _run_example("cifar100_pipeline", "--smoke", "--baselines", "all", "--out", str(out), "--no-progress")


def _smoke_pipeline(out: Path, name: str = "cifar100", **force: object) -> Pipeline:
    config, data = smoke_setup(load_config(name, {"progress": False}), out)
    return Pipeline(config, data, baselines=SMOKE_BASELINES, **force)  # type: ignore[arg-type]


def test_cifar100_smoke_writes_every_artefact_and_prints_the_report(cifar_run: tuple[Path, str]) -> None:
    out, printed = cifar_run
    smoke = _smoke_pipeline(out)
    for stage in STAGES:
        assert smoke.is_done(stage), stage.name
    assert not Pipeline(load_config("cifar100", {"output_dir": str(out)})).is_done("anchors")  # other settings
    report = OODReport.from_json(out / "report.json")
    assert report.to_markdown() in printed
    assert set(json.loads((out / "timings.json").read_text())) == {stage.name for stage in STAGES}
    # The four random classes are easy: the classifier must have learnt them (chance is 25%).
    assert report.id_accuracy is not None and report.id_accuracy > 0.6
    history = json.loads((out / "classifier" / "metrics.json").read_text())["history"]
    assert all(epoch["ood_steps"] == epoch["steps"] > 0 for epoch in history)  # DREAM-OOD: outliers every step


def test_anchors_are_the_rows_of_the_token_embedding_table(cifar_run: tuple[Path, str], tiny_sd: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    out, _ = cifar_run
    anchors = TokenEmbeddings.load(out / "anchors.safetensors")
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"), local_files_only=True)
    table = CLIPTextModel.from_pretrained(str(tiny_sd / "text_encoder"), local_files_only=True).get_input_embeddings()
    for name, vector in zip(anchors.class_names, anchors.vectors):
        (token,) = tokenizer(name, add_special_tokens=False)["input_ids"]
        assert torch.equal(vector, table.weight[token].detach())


def test_bank_and_samples_follow_the_configuration(cifar_run: tuple[Path, str]) -> None:
    out, _ = cifar_run
    pipe = _smoke_pipeline(out)
    encoder, bank, samples = pipe.load("encoder"), pipe.load("bank"), pipe.load("samples")
    anchors = pipe.load("anchors")
    per_class, classes = pipe.config.bank.per_class, len(pipe.class_names)
    assert bank.class_counts.tolist() == [per_class] * classes
    # The bank holds the first per_class training images of each class, embedded without augmentation.
    images, labels = pipe.data.bank.tensors  # type: ignore[attr-defined]
    rows = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encoder.embed(images[rows]).double(), dim=1)
    order = torch.argsort(bank.labels, stable=True)
    assert torch.allclose(bank.embeddings[order].double(), expected, atol=1e-5)
    assert torch.allclose(bank.embeddings.double().norm(dim=1), torch.ones(len(bank), dtype=torch.float64), atol=1e-6)
    assert len(samples) == classes * pipe.config.sampler.num_per_class
    assert samples.config["mode"] == "outlier" and samples.config["sigma"] == pipe.config.sampler.sigma
    norms = samples.vectors.double().norm(dim=1)
    assert torch.allclose(norms, anchors.norms.double()[samples.labels], rtol=1e-5)


def test_generated_images_are_per_class_at_the_saved_size(cifar_run: tuple[Path, str]) -> None:
    out, _ = cifar_run
    config = load_config("cifar100")
    records = [json.loads(line) for line in (out / "images" / "manifest.jsonl").read_text().splitlines()]
    counts = np.bincount([r["class_index"] for r in records])
    assert counts.tolist() == [4, 4, 4, 4]
    assert len({r["seed"] for r in records}) == len(records)
    for record in records:
        with Image.open(out / "images" / record["path"]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert config.generation.save_size == 256  # the paper's size; the smoke run saves at the ID size


def test_a_second_run_skips_every_stage(cifar_run: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    out, printed = cifar_run
    files = [p for p in out.rglob("*") if p.is_file() and "tiny-stable-diffusion" not in p.parts]
    files = [p for p in files if p.name not in ("timings.json", "config.json")]
    before = {p: p.stat().st_mtime_ns for p in files}
    with caplog.at_level(logging.INFO, logger="dreamood"):
        again = _run_example("cifar100_pipeline", "--smoke", "--baselines", "all", "--out", str(out), "--no-progress")
    assert again == printed
    messages = [record.getMessage() for record in caplog.records]
    skipped = [f"[{stage.name}]" for stage in STAGES] + [f"[baseline {name}]" for name in OOD_BASELINES]
    assert [m.split("]")[0] + "]" for m in messages if "skipped" in m] == skipped
    assert not [m for m in messages if "running" in m]
    assert before == {p: p.stat().st_mtime_ns for p in files}


def test_same_seed_same_artefacts_through_the_cli(cifar_run: tuple[Path, str], tmp_path: Path, tiny_sd: Path) -> None:
    out, _ = cifar_run
    other = _run_dir(tmp_path / "cli", tiny_sd)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["run", "--smoke", "--output-dir", str(other), "--no-progress", "-q"]) == 0
    assert (other / "report.json").read_text() == (out / "report.json").read_text()
    for name in ("anchors.safetensors", "feature_bank.safetensors", "samples.safetensors", "images/manifest.jsonl"):
        assert (other / name).read_bytes() == (out / name).read_bytes(), name


def test_force_and_config_changes(cifar_run: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    out, _ = cifar_run
    with pytest.raises(ValueError, match="force names unknown stages"):
        _smoke_pipeline(out, force=["sampling"])
    pipe = _smoke_pipeline(out, force=["report"])
    anchors_time = (out / "anchors.safetensors").stat().st_mtime_ns
    report = (out / "report.json").read_text()
    with caplog.at_level(logging.INFO, logger="dreamood"):
        pipe.run()
    assert "[report] running" in caplog.text and "[anchors] skipped" in caplog.text
    assert (out / "anchors.safetensors").stat().st_mtime_ns == anchors_time
    assert (out / "report.json").read_text() == report
    caplog.clear()
    changed = Pipeline(pipe.config.replace(**{"sampler.sigma": 0.5, "progress": True}))
    with caplog.at_level(logging.WARNING, logger="dreamood"):
        changed.write_config()
    assert "differs" in caplog.text and "sampler.sigma" in caplog.text and "progress" not in caplog.text


def test_missing_artefacts_and_data_give_clear_errors(tmp_path: Path) -> None:
    pipe = Pipeline(load_config("cifar100", {"output_dir": str(tmp_path), "data.root": str(tmp_path / "nothing")}))
    with pytest.raises(FileNotFoundError, match=r"feature_bank.safetensors does not exist.*`dreamood fit-encoder`"):
        pipe.load("bank")
    assert len(pipe.class_names) == 100  # read without touching the data
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        _ = pipe.data
    with pytest.raises(ValueError, match="stage must be one of"):
        pipe.path("bogus")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "classifier.pt")
    with pytest.raises(ArtifactError, match="holds no 'model' state dict"):
        pipe.load("classifier")


def test_imagenet100_dream_id_smoke(tmp_path: Path, tiny_sd: Path) -> None:
    out = _run_dir(tmp_path / "run", tiny_sd)
    printed = _run_example(
        "imagenet100_pipeline", "--smoke", "--method", "dream-id", "--baselines", "all", "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    pipe = _smoke_pipeline(out, "imagenet100-dream-id")
    samples = pipe.load("samples")
    assert samples.config["mode"] == "inlier" and samples.config["keep_per_anchor"] == 1
    history = json.loads((out / "classifier" / "metrics.json").read_text())["history"]
    assert all(epoch["ood_steps"] == 0 for epoch in history)  # DREAM-ID: no outlier loss
    accuracy = json.loads((out / "generalization.json").read_text())
    report = OODReport.from_json(out / "report.json")
    assert accuracy["ID test"] == pytest.approx(report.id_accuracy)
    assert f"ID test: top-1 accuracy {100 * accuracy['ID test']:.2f}%" in printed
    _check_generalization_baselines(out, pipe, printed)
    # A resumed run reads the accuracies back instead of evaluating every set again; forcing the report redoes them.
    written = (out / "generalization.json").stat().st_mtime_ns
    assert pipe.run() == report and (out / "generalization.json").stat().st_mtime_ns == written
    forced = _smoke_pipeline(out, "imagenet100-dream-id", force=["report"])
    forced.run()
    assert (out / "generalization.json").stat().st_mtime_ns != written
    assert json.loads((out / "generalization.json").read_text()) == pytest.approx(accuracy)


def test_imagenet100_dream_ood_smoke_pretrains_then_fine_tunes(tmp_path: Path, tiny_sd: Path) -> None:
    out = _run_dir(tmp_path / "run", tiny_sd)
    _run_example("imagenet100_pipeline", "--smoke", "--out", str(out), "--no-progress")
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["head"] == "mlp" and config["training"]["pretrain_epochs"] == 1
    assert (out / "pretrained.pt").is_file()
    pretrain = json.loads((out / "pretrain" / "metrics.json").read_text())
    assert pretrain["config"]["lr"] == config["training"]["pretrain_lr"]
    assert all(epoch["ood_steps"] == 0 for epoch in pretrain["history"])
    finetune = json.loads((out / "classifier" / "metrics.json").read_text())
    assert finetune["config"]["init_checkpoint"] == str(out / "pretrained.pt")
    assert finetune["config"]["lr"] == config["training"]["lr"] == 0.001


def _png(path: Path, seed: int, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_run_from_a_config_file_on_class_folders(tmp_path: Path, tiny_sd: Path) -> None:
    data = tmp_path / "data"
    for split, count in (("train", 12), ("test", 5)):
        for label, name in enumerate(("cat", "dog")):
            for i in range(count):
                _png(data / split / name / f"{i}.png", seed=100 * label + i + (0 if split == "train" else 50))
    for i in range(6):
        _png(tmp_path / "noise" / "nested" / f"{i}.jpg", seed=1000 + i, size=20)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"""
benchmark: folder
output_dir: {tmp_path / "run"}
device: cpu
progress: false
data: {{root: {data}, ood_paths: {{Noise: {tmp_path / "noise"}}}, num_workers: 0}}
anchors: {{model: {tiny_sd}}}
encoder: {{backbone: small, epochs: 1, batch_size: 8}}
bank: {{per_class: 10}}
sampler: {{k: 3, boundary: 4, anchors_per_round: 2, candidates_per_anchor: 16, keep: 1, num_per_class: 3}}
generation: {{model: {tiny_sd}, steps: 1, height: 64, width: 64, save_size: 32, images_per_class: 2, dtype: fp32}}
training: {{backbone: small, epochs: 1, batch_size: 8, outlier_batch_size: 4}}
evaluation: {{protocol: full}}
"""
    )
    config = load_config(config_file)
    assert class_names_of(config) == ["cat", "dog"]
    datasets = build_data(config)
    assert len(datasets.train) == 24 and len(datasets.test) == 10 and len(datasets.ood["Noise"]) == 6
    assert datasets.test[0][0].shape == (3, 32, 32)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(["run", "--config", str(config_file), "-q"]) == 0
    report = OODReport.from_json(tmp_path / "run" / "report.json")
    assert report.names == ["Noise"] and report.n_id == 10 and report["Noise"].n_ood == 6
    assert "Noise" in stdout.getvalue()
    assert len(list((tmp_path / "run" / "images").rglob("*.png"))) == 4


# ---- interrupted writes and library progress bars ----------------------------------------------------------


def test_every_stage_removes_the_temporaries_of_its_killed_writes(cifar_run: tuple[Path, str]) -> None:
    out, _ = cifar_run
    own = [
        ".anchors.safetensors.k1.tmp",
        ".anchors.json.k2.tmp",
        ".encoder.pt.k3.tmp",
        ".feature_bank.safetensors.k4.tmp",
        ".samples.json.k5.tmp",
        "images/.manifest.jsonl.k6.tmp",
        ".classifier.pt.k7.tmp",
        ".report.json.k8.tmp",
        ".report.md.k9.tmp",
        ".config.json.k10.tmp",
        "baselines/godin/.report.json.k11.tmp",
        "baselines/gan/.classifier.pt.k12.tmp",
    ]
    others = [".notes.txt.k13.tmp", ".anchors.safetensors.k14", "images/000/.other.k15.tmp"]
    artefacts = [p for p in out.rglob("*") if p.is_file() and "tiny-stable-diffusion" not in p.parts]
    artefacts = {p: p.read_bytes() for p in artefacts if p.name not in ("config.json", "timings.json")}
    for name in own + others:
        (out / name).write_bytes(b"half-written")
    try:
        pipe = _smoke_pipeline(out)
        pipe.run()  # every stage is done: each only cleans up, then skips
        for name in OOD_BASELINES:
            pipe.ood_baseline(name)
        assert [name for name in own if (out / name).exists()] == []
        assert [name for name in others if not (out / name).exists()] == []
        assert {p: p.read_bytes() for p in artefacts} == artefacts
    finally:
        for name in others:
            (out / name).unlink(missing_ok=True)


def test_model_loading_progress_bars_follow_the_progress_setting(
    tmp_path: Path, tiny_sd: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import transformers.utils.logging as bars

    for progress in (True, False):
        out = _run_dir(tmp_path / str(progress), tiny_sd)
        config, data = smoke_setup(load_config("cifar100", {"progress": progress}), out)
        capfd.readouterr()
        pipe = Pipeline(config, data)
        pipe.anchors()
        pipe.decoder(torch.device("cpu"))
        err = capfd.readouterr().err
        for bar in ("Loading weights", "Loading pipeline components"):
            assert (bar in err) == progress, (bar, progress, err)
        assert bars.is_progress_bar_enabled()  # restored after the stage


def test_library_progress_bars_restores_every_switch() -> None:
    import diffusers.utils.logging as diffusers_bars
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_bars

    from dreamood._utils import library_progress_bars

    with pytest.raises(ValueError, match="libraries must be among transformers, diffusers"):
        library_progress_bars(["tqdm"], enabled=False).__enter__()
    hub.disable_progress_bars("huggingface_hub.lfs")
    diffusers_bars.disable_progress_bar()
    try:
        with library_progress_bars(["transformers", "diffusers"], enabled=False):
            assert not transformers_bars.is_progress_bar_enabled() and not diffusers_bars.is_progress_bar_enabled()
            assert hub.are_progress_bars_disabled()
        assert transformers_bars.is_progress_bar_enabled() and not diffusers_bars.is_progress_bar_enabled()
        assert hub.are_progress_bars_disabled("huggingface_hub.lfs") and not hub.are_progress_bars_disabled()
        with pytest.raises(KeyError), library_progress_bars(["transformers"], enabled=False):
            raise KeyError("restored on errors too")
        assert transformers_bars.is_progress_bar_enabled()
        with library_progress_bars(["transformers"], enabled=True):  # enabled: nothing changes
            assert transformers_bars.is_progress_bar_enabled()
    finally:
        hub.enable_progress_bars()
        diffusers_bars.enable_progress_bar()


# ---- baselines ----------------------------------------------------------------------------------------------


def _paper_protocol_auroc(id_scores: np.ndarray, ood_scores: np.ndarray, repeats: int, seed: int) -> float:
    """The evaluator's "paper" protocol from its documentation: mean AUROC over seeded OOD subsamples."""
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(seed)
    size = len(id_scores) // 5
    values = []
    for _ in range(repeats):
        chosen = ood_scores[torch.randperm(len(ood_scores), generator=generator)[:size].numpy()]
        truth = np.r_[np.ones(len(id_scores)), np.zeros(len(chosen))]
        values.append(roc_auc_score(truth, np.r_[id_scores, chosen]))
    return float(np.mean(values))


def test_ood_baselines_of_the_cifar100_smoke(cifar_run: tuple[Path, str]) -> None:
    from dreamood.baselines import GodinClassifier
    from dreamood.models import Classifier

    out, printed = cifar_run
    pipe = _smoke_pipeline(out)
    reports = {name: OODReport.from_json(out / "baselines" / name / "report.json") for name in OOD_BASELINES}
    main = OODReport.from_json(out / "report.json")
    assert ood_table({"DREAM-OOD": main, **reports}) in printed
    images, labels = pipe.data.test.tensors  # type: ignore[attr-defined]
    ood = {name: dataset.tensors[0] for name, dataset in pipe.data.ood.items()}  # type: ignore[attr-defined]
    evaluation = pipe.config.evaluation

    # GAN: the classifier trained with an outlier loss at every step, scored with MSP (recomputed here in float64).
    history = json.loads((out / "baselines" / "gan" / "training" / "metrics.json").read_text())
    assert history["config"]["beta"] == SMOKE_BASELINES.gan_beta
    assert all(epoch["ood_steps"] == epoch["steps"] > 0 for epoch in history["history"])
    dcgan = torch.load(out / "baselines" / "gan" / "dcgan.pt", weights_only=True)["model"]
    assert set(dcgan["_extra_state"]) == {"generator_optimizer", "discriminator_optimizer", "noise_generator"}
    model = Classifier(build_backbone("small", small_input=True), 4)
    model.load_state_dict(torch.load(out / "baselines" / "gan" / "classifier.pt", weights_only=True)["model"])
    model.eval()

    def msp(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(batch).double(), dim=1).amax(dim=1).numpy()

    with torch.no_grad():
        accuracy = float((model(images).argmax(dim=1) == labels).double().mean())
    assert reports["gan"].id_accuracy == pytest.approx(accuracy)
    for name, batch in ood.items():
        expected = _paper_protocol_auroc(msp(images), msp(batch), evaluation.repeats, pipe.config.seed)
        assert reports["gan"][name].metrics["auroc"] == pytest.approx(expected, abs=1e-6)

    # GODIN: accuracy of argmax h; epsilon = the grid value with the largest mean score on ID training images.
    godin = GodinClassifier(build_backbone("small", small_input=True), 4)
    godin.load_state_dict(torch.load(out / "baselines" / "godin" / "classifier.pt", weights_only=True)["model"])
    godin.eval()
    with torch.no_grad():
        accuracy = float((godin.similarities(images).argmax(dim=1) == labels).double().mean())
    assert reports["godin"].id_accuracy == pytest.approx(accuracy)
    choice = json.loads((out / "baselines" / "godin" / "godin.json").read_text())
    scores = {float(epsilon): value for epsilon, value in choice["validation_scores"].items()}
    assert len(scores) == 7 and choice["epsilon"] == max(scores, key=lambda epsilon: scores[epsilon])
    assert [row.name for row in reports["godin"].rows] == list(pipe.data.ood)
    _check_baseline_resumes(pipe, "godin", pipe.ood_baseline)
    # The GAN baseline's checkpoints hold the GAN, so a resumed run continues (here: restores) it too.
    from dreamood.io import load_checkpoint

    assert set(load_checkpoint(out / "baselines" / "gan" / "training" / "checkpoint.pt")["extra_state"]) == {"gan"}
    _check_baseline_resumes(pipe, "gan", pipe.ood_baseline, outliers=True)
    resumed = torch.load(out / "baselines" / "gan" / "dcgan.pt", weights_only=True)["model"]
    assert [k for k in dcgan if k != "_extra_state"] == [k for k in resumed if k != "_extra_state"]
    assert all(torch.equal(dcgan[k], resumed[k]) for k in dcgan if k != "_extra_state")
    saved_noise, resumed_noise = (state["_extra_state"]["noise_generator"] for state in (dcgan, resumed))
    assert torch.equal(saved_noise, resumed_noise)


def _check_baseline_resumes(pipe: Pipeline, name: str, rerun: Callable[[str], object], outliers: bool = False) -> None:
    """The baseline trained with the shared loop: a run killed after its last epoch resumes, trains nothing more."""
    from dreamood.io import load_checkpoint

    folder = pipe.baseline_dir(name)
    checkpoint = folder / "training" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == state["epochs"] > 0
    assert all(
        (epoch["ood_steps"] == epoch["steps"]) if outliers else epoch["ood_steps"] == 0 for epoch in state["history"]
    )
    result, classifier = pipe.baseline_path(name), folder / "classifier.pt"
    saved, weights = result.read_text(), torch.load(classifier, weights_only=True)["model"]
    written = checkpoint.stat().st_mtime_ns
    for file in (result, classifier, folder / "godin.json"):
        file.unlink(missing_ok=True)  # killed once the loop had finished, before the classifier was saved
    rerun(name)
    assert checkpoint.stat().st_mtime_ns == written  # resumed from the last epoch: no epoch trained again
    assert result.read_text() == saved
    for key, value in torch.load(classifier, weights_only=True)["model"].items():
        assert torch.equal(value, weights[key]), key


def _check_generalization_baselines(out: Path, pipe: Pipeline, printed: str) -> None:
    from dreamood.models import Classifier

    tables = {name: json.loads((out / "baselines" / name / "generalization.json").read_text()) for name in
              GENERALIZATION_BASELINES}  # fmt: skip
    main = json.loads((out / "generalization.json").read_text())
    assert accuracy_table({"DREAM-ID": main, **tables}) in printed
    assert all(list(table) == ["ID test", "ID test, rotated"] for table in tables.values())
    # The cross-entropy reference, recomputed from its weights on both test sets.
    model = Classifier(build_backbone("small", small_input=True), 4)
    model.load_state_dict(torch.load(out / "baselines" / "cross-entropy" / "classifier.pt", weights_only=True)["model"])
    model.eval()
    for name, dataset in (
        ("ID test", pipe.data.test),
        ("ID test, rotated", pipe.data.generalization["ID test, rotated"]),
    ):
        images, labels = dataset.tensors  # type: ignore[attr-defined]
        with torch.no_grad():
            assert tables["cross-entropy"][name] == pytest.approx(
                float((model(images).argmax(1) == labels).double().mean())
            )
    # Generic prompts: as many images per class as DREAM-ID generates, each with its own seed.
    per_class = pipe.config.generation.images_per_class
    records = [
        json.loads(line)
        for line in (out / "baselines" / "generic-prompts" / "images" / "manifest.jsonl").read_text().splitlines()
    ]
    assert np.bincount([r["class_index"] for r in records]).tolist() == [per_class] * 4
    assert len({r["seed"] for r in records}) == len(records)
    # The augmentation baselines appended per_class copies per class at every step of the shared loop.
    for name in ("randaugment", "autoaugment", "augmix", "cutmix", "cross-entropy", "generic-prompts"):
        history = json.loads((out / "baselines" / name / "training" / "metrics.json").read_text())["history"]
        assert all(epoch["ood_steps"] == 0 for epoch in history)
    # CutMix's mixed labels train with the shared loop too, which checkpoints every epoch and resumes.
    _check_baseline_resumes(pipe, "cutmix", pipe.generalization_baseline)


def test_baseline_names_and_settings(tmp_path: Path) -> None:
    assert baselines_of("dream-ood") == OOD_BASELINES == ("godin", "gan")
    assert parse_baselines("all", "dream-id") == GENERALIZATION_BASELINES
    assert parse_baselines("", "dream-ood") == ()
    assert parse_baselines(" gan, godin,gan ", "dream-ood") == ("gan", "godin")
    with pytest.raises(ValueError, match="unknown baseline.*memo.*for dream-ood"):
        parse_baselines("godin,memo", "dream-ood")
    with pytest.raises(ValueError, match="method"):
        baselines_of("vos")
    with pytest.raises(ValueError, match="godin_similarity"):
        BaselineConfig(godin_similarity="angle")
    with pytest.raises(ValueError, match="memo_augmentations"):
        BaselineConfig(memo_augmentations=0)
    with pytest.raises(SystemExit):
        _example("cifar100_pipeline").main(["--smoke", "--baselines", "memo", "--out", str(tmp_path)])
    pipe = Pipeline(load_config("imagenet100", {"output_dir": str(tmp_path), "training.backbone": "small"}))
    with pytest.raises(ValueError, match="power-of-two"):  # 224x224: before any data is read
        pipe.ood_baseline("gan")
    with pytest.raises(ValueError, match="OOD baselines"):
        pipe.ood_baseline("memo")
    with pytest.raises(ValueError, match="generalisation baselines"):
        pipe.generalization_baseline("godin")


def test_comparison_tables() -> None:
    from dreamood.evaluation import OODReportRow

    metrics = {"fpr95": 0.25, "fpr95_ood_positive": 0.5, "auroc": 0.875, "aupr_in": 0.9, "aupr_out": 0.8}
    row = OODReportRow("A", metrics, n_ood=3)
    report = OODReport(rows=(row,), mean=OODReportRow("Mean", metrics), n_id=10, id_accuracy=0.5)
    lines = ood_table({"x": report, "y": OODReport(rows=(row,), mean=row, n_id=10)}).splitlines()
    assert lines[2:] == ["| x | 25.00 | 87.50 | 50.00 |", "| y | 25.00 | 87.50 | - |"]
    table = accuracy_table({"a": {"ID test": 0.5, "shift": 0.125}, "b": {"ID test": 1.0, "shift": 0.0}})
    assert table.splitlines() == [
        "| method | ID test | shift |",
        "|---|---|---|",
        "| a | 50.00 | 12.50 |",
        "| b | 100.00 | 0.00 |",
    ]


def test_generation_speed_settings_reach_the_decoder_and_the_writer(
    tmp_path: Path, tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dreamood.decoding.generation as generation
    from dreamood.decoding.stable_diffusion import StableDiffusionDecoder

    speedups: list[dict[str, object]] = []
    enable = StableDiffusionDecoder.enable_speedups

    def record(self: StableDiffusionDecoder, **options: object) -> StableDiffusionDecoder:
        speedups.append(options)
        return enable(self, **{**options, "compile_backend": "eager"})  # type: ignore[arg-type]

    writers: list[object] = []
    generate = generation.generate_images

    def record_generate(*args: object, **options: object) -> object:
        writers.append(options["writer_threads"])
        return generate(*args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(StableDiffusionDecoder, "enable_speedups", record)
    monkeypatch.setattr(generation, "generate_images", record_generate)
    settings = {"channels_last": False, "compile": True, "compile_mode": "max-autotune", "writer_threads": 0}
    overrides = {"progress": False, **{f"generation.{key}": value for key, value in settings.items()}}
    config, data = smoke_setup(load_config("cifar100", overrides), _run_dir(tmp_path / "run", tiny_sd))
    pipeline = Pipeline(config, data)
    anchors = pipeline.anchors()
    pipeline.generate(pipeline.sample(pipeline.feature_bank(pipeline.fit_encoder(anchors)), anchors))
    assert speedups == [
        {
            "sdpa": True,
            "channels_last": False,
            "fuse_qkv_projections": True,
            "compile": True,
            "compile_vae": False,
            "compile_mode": "max-autotune",
            "compile_backend": "inductor",
        }
    ]
    assert writers == [0]
    assert len(list((tmp_path / "run").rglob("*.png"))) > 0


def test_training_speed_settings_reach_the_training_loop(
    tmp_path: Path, tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dreamood.training as training

    calls: list[object] = []
    train = training.train_classifier

    def record(model: object, loader: object, config: object, **options: object) -> object:
        calls.append(config)
        quick = dataclasses.replace(config, compile=False, compile_mode=None)  # type: ignore[type-var]
        return train(model, loader, quick, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "train_classifier", record)
    settings = {"channels_last": True, "compile": True, "compile_mode": "reduce-overhead", "cudnn_benchmark": True}
    overrides = {"progress": False, **{f"training.{key}": value for key, value in settings.items()}}
    config, data = smoke_setup(load_config("cifar100", overrides), _run_dir(tmp_path / "run", tiny_sd))
    pipeline = Pipeline(config, data)
    anchors = pipeline.anchors()
    pipeline.train(pipeline.generate(pipeline.sample(pipeline.feature_bank(pipeline.fit_encoder(anchors)), anchors)))
    assert len(calls) == 1
    assert {key: getattr(calls[0], key) for key in settings} == settings
