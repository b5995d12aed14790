"""A run folder that cannot lie: the lock, stage fingerprints and downstream redo, verified artefacts, `verify`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dreamood.cli import main as cli_main
from dreamood.config import PipelineConfig, load_config
from dreamood.errors import ArtifactError, RunFolderLockedError, StaleArtifactError
from dreamood.io import load_artifact
from dreamood.pipeline import STAGES, Pipeline, PipelineData
from dreamood.pipeline.lock import LOCK_NAME, RunFolderLock
from dreamood.pipeline.verify import check_generated_folder, verify_run
from dreamood.testing import smoke_setup

REPO = Path(__file__).resolve().parents[1]


MODEL: list[Path] = []  # one tiny Stable Diffusion for every run of this module, outside the run folders


def _smoke(out: Path, **changes: object) -> tuple[PipelineConfig, PipelineData]:
    config, data = smoke_setup(load_config("cifar100", {"progress": False}), out, model_dir=MODEL[0])
    return (config.replace(**changes) if changes else config), data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    MODEL[:] = [tmp_path_factory.mktemp("model") / "tiny-stable-diffusion"]
    out = tmp_path_factory.mktemp("integrity") / "run"
    config, data = _smoke(out)
    Pipeline(config, data).run()
    return out


@pytest.fixture()
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ---- the lock ------------------------------------------------------------------------------------------------


def _hold_lock(folder: Path) -> subprocess.Popen[str]:
    """A second process that takes the run folder's lock and keeps it until it is killed."""
    code = (
        "import sys, time\n"
        "from dreamood.pipeline.lock import RunFolderLock\n"
        "RunFolderLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_gets_one_clear_line_and_a_killed_holder_leaves_a_stale_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "run"
    holder = _hold_lock(folder)
    try:
        with pytest.raises(RunFolderLockedError, match=rf"is in use by process {holder.pid} on this machine"):
            RunFolderLock(folder).acquire()
        code = cli_main(["run", "--smoke", "--output-dir", str(folder), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and f"is in use by process {holder.pid}" in err[0], err
        assert not (folder / "config.json").exists()  # nothing was written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the kill
    with caplog.at_level(logging.WARNING, logger="dreamood"), RunFolderLock(folder) as lock:
        assert lock.held and json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"removed the stale lock {folder / LOCK_NAME} of process {holder.pid}" in caplog.text
    assert not (folder / LOCK_NAME).exists()


def test_two_real_runs_on_one_folder_never_mix(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(seed: int) -> subprocess.Popen[str]:
        argv = ["-m", "dreamood", "run", "--smoke", "--output-dir", str(folder), "--seed", str(seed), "--no-progress"]
        return subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    first = start(0)
    deadline = time.monotonic() + 60
    while not (folder / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = start(1)
    second_out, second_err = second.communicate(timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 1 and "is in use by process" in second_err and second_out == "", second_err
    assert json.loads((folder / "config.json").read_text())["seed"] == 0
    assert verify_run(folder) == []


def test_a_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"host": f"not-{socket.gethostname()}", "pid": 1, "token": "x"}))
    with pytest.raises(RunFolderLockedError, match="is in use by process 1 on host not-"):
        RunFolderLock(tmp_path).acquire()


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    outer, inner = RunFolderLock(tmp_path), RunFolderLock(tmp_path)
    with outer, inner:
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


# ---- fingerprints ----------------------------------------------------------------------------------------------


def test_a_finished_run_plans_to_reuse_everything_and_records_every_stage(finished_run: Path) -> None:
    config, data = _smoke(finished_run)
    pipe = Pipeline(config, data)
    assert [status.state for status in pipe.plan()] == ["done"] * len(STAGES)
    for stage in STAGES:
        record = json.loads((finished_run / "stages" / f"{stage.name}.json").read_text())
        assert record["status"] == "done" and record["fingerprint"] == pipe.fingerprint(stage)
        assert stage.done_marker() in record["files"] or stage.name == "images"
    assert verify_run(finished_run) == []
    assert cli_main(["verify", str(finished_run)]) == 0


def test_a_changed_setting_redoes_its_stage_and_everything_after_it(
    run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, data = _smoke(run_copy, **{"sampler.sigma": 0.5})
    plan = {status.stage: status for status in Pipeline(config, data).plan()}
    assert [plan[name].state for name in ("anchors", "encoder", "bank")] == ["done"] * 3
    assert plan["samples"].state == "redo" and plan["samples"].reason == "sampler.sigma changed"
    assert all(plan[name].state == "redo" for name in ("images", "classifier", "report"))
    with pytest.raises(StaleArtifactError, match=r"samples artefact .* \(sampler.sigma changed\)"):
        Pipeline(config, data, on_change="refuse").run()
    encoder_time = (run_copy / "encoder.pt").stat().st_mtime_ns
    samples = (run_copy / "samples.safetensors").read_bytes()
    with caplog.at_level(logging.INFO, logger="dreamood"):
        Pipeline(config, data).run()
    assert "[samples] running (redo: sampler.sigma changed)" in caplog.text
    assert "[images] running (redo: input samples changed)" in caplog.text
    assert "[report] running (redo: input classifier changed)" in caplog.text
    assert (run_copy / "encoder.pt").stat().st_mtime_ns == encoder_time
    assert (run_copy / "samples.safetensors").read_bytes() != samples
    assert [status.state for status in Pipeline(config, data).plan()] == ["done"] * len(STAGES)
    assert verify_run(run_copy) == []


def test_a_new_method_or_benchmark_does_not_reuse_the_old_results(finished_run: Path) -> None:
    config, data = _smoke(finished_run, method="dream-id", **{"sampler.keep": 1})
    plan = {status.stage: status for status in Pipeline(config, data).plan()}
    assert plan["samples"].state == "redo" and "method changed" in plan["samples"].reason
    assert plan["classifier"].state == "redo"
    config, data = _smoke(finished_run, **{"data.class_names": ["bird", "frog", "horse", "ship"]})
    plan = {status.stage: status for status in Pipeline(config, data).plan()}
    assert plan["anchors"].state == "redo" and "data.class_names changed" in plan["anchors"].reason


def test_an_interrupted_stage_whose_settings_changed_starts_afresh(run_copy: Path) -> None:
    config, data = _smoke(run_copy, **{"training.epochs": 2})
    record = json.loads((run_copy / "stages" / "classifier.json").read_text())
    (run_copy / "stages" / "classifier.json").write_text(json.dumps({**record, "status": "running"}))
    (run_copy / "classifier" / "checkpoint.pt").write_bytes(b"another run's checkpoint")  # would fail to load
    Pipeline(config, data).run()
    history = json.loads((run_copy / "classifier" / "metrics.json").read_text())["history"]
    assert len(history) == 2


def test_an_interrupted_stage_with_the_same_settings_resumes(run_copy: Path) -> None:
    config, data = _smoke(run_copy)
    record = json.loads((run_copy / "stages" / "classifier.json").read_text())
    (run_copy / "stages" / "classifier.json").write_text(json.dumps({**record, "status": "running"}))
    pipe = Pipeline(config, data)
    assert pipe.status("classifier").state == "resume"
    weights = (run_copy / "classifier.pt").read_bytes()
    pipe.run()
    assert (run_copy / "classifier.pt").read_bytes() == weights  # resumed from its last checkpoint: same model


# ---- verified artefacts ------------------------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_bit_in_an_artefact_is_refused_on_load(run_copy: Path) -> None:
    _flip_last_byte(run_copy / "feature_bank.safetensors")
    config, data = _smoke(run_copy)
    with pytest.raises(ArtifactError, match=r"feature_bank.safetensors was changed after the bank stage wrote it"):
        Pipeline(config, data).load("bank")
    with pytest.raises(ArtifactError, match="was changed after it was saved"):
        load_artifact(run_copy / "feature_bank.safetensors", kind="FeatureBank")
    problems = verify_run(run_copy)
    assert any("feature_bank.safetensors was changed" in problem for problem in problems), problems
    assert cli_main(["verify", str(run_copy), "-q"]) == 1


def test_edited_metadata_and_mismatched_sidecars_are_refused(run_copy: Path) -> None:
    sidecar = run_copy / "anchors.json"
    info = json.loads(sidecar.read_text())
    info["metadata"]["class_names"] = ["pear", *info["metadata"]["class_names"][1:]]
    sidecar.write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="anchors.safetensors or its sidecar .* was changed after it was saved"):
        load_artifact(run_copy / "anchors.safetensors", kind="TokenEmbeddings")
    del info["artifact_id"]
    sidecar.write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="has no 'artifact_id'"):
        load_artifact(run_copy / "anchors.safetensors", kind="TokenEmbeddings")


def test_a_cut_manifest_is_refused_before_training(run_copy: Path) -> None:
    manifest = run_copy / "images" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    problems = check_generated_folder(run_copy / "images", images_per_class=4, num_classes=4)
    assert problems and "lists 8 images, expected 4 for each of 4 classes" in problems[0]
    config, data = _smoke(run_copy)
    with pytest.raises(ArtifactError, match="manifest.jsonl was changed after the images stage wrote it"):
        Pipeline(config, data, force=["classifier"]).run()


@pytest.mark.parametrize("damage", ["swapped", "tiny", "rgba", "sixteen-bit", "jpeg"])
def test_damaged_generated_images_are_found(run_copy: Path, damage: str) -> None:
    folder = run_copy / "images"
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    first, other = folder / rows[0]["path"], folder / rows[-1]["path"]
    if damage == "swapped":
        first_bytes = first.read_bytes()
        first.write_bytes(other.read_bytes())
        other.write_bytes(first_bytes)
        expected = "is not the image its manifest row describes"
    elif damage == "tiny":
        Image.new("RGB", (1, 1)).save(first, format="PNG")
        expected = "is 1x1, expected 32x32"
    elif damage == "rgba":
        Image.new("RGBA", (32, 32)).save(first, format="PNG")
        expected = "in mode RGBA, expected an 8-bit RGB PNG"
    elif damage == "sixteen-bit":
        Image.new("I;16", (32, 32)).save(first, format="PNG")
        expected = "expected an 8-bit RGB PNG"
    else:
        Image.new("RGB", (32, 32)).save(first, format="JPEG")
        expected = "is a JPEG image in mode RGB"
    problems = check_generated_folder(folder, images_per_class=4, num_classes=4, image_size=32)
    assert any(expected in problem for problem in problems), problems


# ---- files of the run folder that are not artefacts ---------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "not json", "[]"])
def test_a_damaged_config_or_timings_file_is_reported_and_replaced(
    run_copy: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    (run_copy / "config.json").write_text(content)
    (run_copy / "timings.json").write_text(content)
    config, data = _smoke(run_copy)
    with caplog.at_level(logging.WARNING, logger="dreamood"):
        Pipeline(config, data, force=["report"]).run()
    assert f"{run_copy / 'config.json'} " in caplog.text and f"{run_copy / 'timings.json'} " in caplog.text
    assert json.loads((run_copy / "config.json").read_text()) == config.to_dict()
    assert set(json.loads((run_copy / "timings.json").read_text())) == {"report"}


def test_smoke_says_which_settings_it_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--smoke", "--dry-run", "--output-dir", str(tmp_path), "--set", "encoder.epochs=50"]
    assert cli_main([*argv, "--device", "cpu"]) == 0
    assert "--smoke replaces your settings: encoder.epochs=50 (--smoke uses 3)" in capsys.readouterr().err


def test_an_artefact_without_a_record_is_remade(run_copy: Path) -> None:
    (run_copy / "stages" / "report.json").unlink()
    config, data = _smoke(run_copy)
    status = Pipeline(config, data).status("report")
    assert status.state == "to do" and "no stage record" in status.reason


# ---- boundaries the run relies on ---------------------------------------------------------------------------------


def test_a_full_disk_while_saving_a_checkpoint_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from dreamood.io import save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr("torch.save", full)
    with pytest.raises(
        OSError, match=r"no space left on the device while writing the checkpoint .*checkpoint.pt"
    ) as error:
        save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 2})
    assert error.value.errno == errno.ENOSPC
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_samples_labels_must_name_a_class() -> None:
    import torch

    from dreamood.sampling.samples import EmbeddingSamples

    with pytest.raises(ValueError, match=r"labels must be below the number of class names \(2\), got label 7"):
        EmbeddingSamples(torch.zeros(2, 4), torch.tensor([0, 7]), class_names=["cat", "dog"])
    with pytest.raises(ValueError, match=r"labels must be class indices >= 0, got -1"):
        EmbeddingSamples(torch.zeros(2, 4), torch.tensor([0, -1]))


def test_a_half_precision_bank_is_accepted_and_a_string_generator_refused() -> None:
    import torch

    from dreamood.anchors import TokenEmbeddings
    from dreamood.feature_bank import FeatureBank
    from dreamood.sampling.knn_boundary import KNNBoundarySampler

    vectors = torch.nn.functional.normalize(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    bank = FeatureBank(vectors.half(), torch.arange(2).repeat_interleave(12))
    anchors = TokenEmbeddings(["cat", "dog"], 0.4 * vectors[:2])
    sampler = KNNBoundarySampler(k=3, boundary_size=4, anchors_per_round=2, candidates_per_anchor=8, keep_per_anchor=1)
    samples = sampler.sample(bank, anchors, 4)
    assert samples.vectors.shape == (8, 16)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str 'seed'"):
        sampler.sample(bank, anchors, 4, generator="seed")  # type: ignore[arg-type]


def test_a_baseline_made_from_other_settings_is_redone(run_copy: Path) -> None:
    from dreamood.pipeline import SMOKE_BASELINES

    config, data = _smoke(run_copy)
    pipe = Pipeline(config, data, baselines=SMOKE_BASELINES)
    pipe.ood_baseline("godin")
    assert pipe.baseline_is_done("godin")
    (pipe.baseline_dir("godin") / "left-over").write_text("from the first configuration")
    changed = Pipeline(config.replace(**{"training.epochs": 2}), data, baselines=SMOKE_BASELINES)
    assert not changed.baseline_is_done("godin")
    changed.ood_baseline("godin")
    assert not (changed.baseline_dir("godin") / "left-over").exists()
    history = json.loads((changed.baseline_dir("godin") / "training" / "metrics.json").read_text())["history"]
    assert len(history) == 2 and changed.baseline_is_done("godin") and not pipe.baseline_is_done("godin")


# ---- dry runs check what the run needs ------------------------------------------------------------------------------


def test_a_dry_run_lists_everything_the_run_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--dry-run", "--output-dir", str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'none'}"]
    argv += ["--set", f"data.ood_root={tmp_path / 'ood'}", "--set", f"anchors.model={tmp_path / 'sd'}"]
    argv += ["--set", f"generation.model={tmp_path / 'sd'}"]
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    missing = [line for line in captured.out.splitlines() if line.startswith("missing: ")]
    assert any("CIFAR-100 not found: no folder" in line for line in missing), missing
    assert sum("OOD test set" in line for line in missing) == 5  # Textures, SVHN, Places365, LSUN-C, iSUN
    assert any(line.startswith("missing: anchors.model: pretrained model") for line in missing), missing
    assert any(line.startswith("missing: generation.model: pretrained model") for line in missing), missing
    assert f"the run cannot start: {len(missing)} thing(s) missing" in captured.err


def test_a_dry_run_checks_the_disk_space_for_the_images(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dreamood.pipeline import preflight

    config, data = _smoke(tmp_path / "fresh")
    pipe = Pipeline(config, data)
    assert preflight.check_requirements(pipe) == []
    monkeypatch.setattr(preflight, "_free_bytes", lambda folder: 1000)
    (problem,) = preflight.check_requirements(pipe)
    assert problem.startswith("not enough disk space for the images: 16 images of 32x32 take about")
    assert preflight.check_requirements(Pipeline(*_smoke(finished_run))) == []  # nothing left to generate


def test_infinite_logits_and_shrunk_decoder_training_images_are_not_silent() -> None:
    import torch

    from dreamood.decoding.in_domain import InDomainDiffusionDecoder
    from dreamood.errors import NonFiniteError
    from dreamood.evaluation import energy_score

    with pytest.raises(NonFiniteError, match="logits contains 0 NaN and 1 infinite"):
        energy_score(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    decoder = InDomainDiffusionDecoder(["a", "b"], image_size=8, block_out_channels=(8, 16), device="cpu")
    images, labels = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 0, 1])
    with pytest.warns(UserWarning, match="the training images are 16x16 but the decoder's image_size is 8"):
        decoder.fit((images, labels), 1, batch_size=4, show_progress=False)


@pytest.mark.parametrize("backend", ["sd2", "sdxl"])
def test_a_smoke_run_on_each_backend(tmp_path: Path, backend: str) -> None:
    config, data = smoke_setup(load_config("cifar100", {"progress": False}), tmp_path / "run", backend=backend)
    report = Pipeline(config, data).run()
    anchors = Pipeline(config, data).load("anchors")
    assert anchors.dim == (32 + 48 if backend == "sdxl" else 48)
    assert report.id_accuracy is not None and verify_run(tmp_path / "run") == []


def test_a_runs_encoder_and_classifier_load_in_one_line(finished_run: Path) -> None:
    import torch

    from dreamood.encoder import TextConditionedEncoder
    from dreamood.models import Classifier

    config, data = _smoke(finished_run)
    pipe = Pipeline(config, data)
    images = data.test.tensors[0][:8]  # type: ignore[attr-defined]
    classifier = Classifier.from_pretrained(finished_run / "classifier")
    assert torch.equal(classifier(images), pipe.load("classifier")(images))
    encoder = TextConditionedEncoder.from_pretrained(finished_run / "encoder")
    assert torch.equal(encoder.embed(images), pipe.load("encoder").embed(images))


def test_progress_bars_draw_nothing_into_a_file(tmp_path: Path) -> None:
    import contextlib
    import io

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dreamood._utils import progress
    from dreamood.training import TrainingConfig, train_classifier

    captured = io.StringIO()  # not a terminal, like a log file
    with contextlib.redirect_stderr(captured):
        assert list(progress(range(3), enabled=True, desc="steps")) == [0, 1, 2]
        loader = DataLoader(TensorDataset(torch.randn(8, 2), torch.tensor([0, 1] * 4)), batch_size=4)
        train_classifier(torch.nn.Linear(2, 2), loader, TrainingConfig(epochs=1), device="cpu", progress=True)
    assert "\r" not in captured.getvalue() and "it/s" not in captured.getvalue()
