"""The ``dreamood`` command: help, one-line errors, exit codes, and every stage subcommand on a tiny run."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import dreamood
from dreamood.cli import main
from dreamood.config import PipelineConfig
from dreamood.pipeline import STAGES
from dreamood.testing import smoke_setup

STAGE_COMMANDS = ("anchors", "fit-encoder", "sample", "generate", "train", "evaluate")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random Stable Diffusion folder for the whole session (written by the smoke setup)."""
    model = tmp_path_factory.getbasetemp() / "dreamood-tiny-sd"
    smoke_setup(PipelineConfig(), tmp_path_factory.mktemp("unused"), model_dir=model)
    return model


def _run_dir(root: Path, tiny_sd: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    link = root / "tiny-stable-diffusion"
    if not link.exists():
        link.symlink_to(tiny_sd, target_is_directory=True)
    return root


def _smoke(command: str, out: Path, *extra: str) -> list[str]:
    return [command, "--smoke", "--output-dir", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> dict[str, object]:
    """Every stage subcommand in order on a smoke run, with what each printed and returned."""
    out = _run_dir(tmp_path_factory.mktemp("cli") / "run", tiny_sd)
    results: dict[str, object] = {"out": out}
    # "sample" runs once too early (its bank does not exist yet) and once in its place.
    for command in ("anchors", "sample", *STAGE_COMMANDS[1:]):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(_smoke(command, out, "-q"))
        key = command if command not in results else f"{command}-again"
        results[key] = (code, stdout.getvalue(), stderr.getvalue())
    return results


def test_help_in_a_real_process() -> None:
    result = subprocess.run([sys.executable, "-m", "dreamood", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in (*STAGE_COMMANDS, "run", "demo"):
        assert command in result.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dreamood {dreamood.__version__}"


@pytest.mark.parametrize("command", [*STAGE_COMMANDS, "run"])
def test_every_subcommand_explains_its_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--config", "--set KEY=VALUE", "--output-dir", "--smoke", "--force", "--debug"):
        assert option in text, (command, option)


def test_stage_commands_run_in_order_and_write_their_artefacts(staged_run: dict[str, object]) -> None:
    out = staged_run["out"]
    assert isinstance(out, Path)
    code, _, stderr = staged_run["sample"]  # type: ignore[misc]
    assert code == 1
    assert stderr.strip().splitlines() == [
        f"dreamood sample: error: the bank artefact {out / 'feature_bank.safetensors'} does not exist: run its "
        "stage first (`dreamood fit-encoder` or `dreamood run`)"
    ]
    expected_output = {
        "anchors": ["anchors: 4 classes, dimension 32"],
        "fit-encoder": ["encoder: SmallConvNet -> 32-d embeddings", "feature bank: 64 embeddings of 4 classes"],
        "sample-again": ["samples: 32 embeddings (outlier mode)"],
        "generate": [f"images: {out / 'images'}"],
        "train": ["classifier: SmallConvNet, 4 classes"],
    }
    for command, lines in expected_output.items():
        code, stdout, stderr = staged_run[command]  # type: ignore[misc]
        assert code == 0, stderr
        assert stdout.strip().splitlines() == lines
    code, stdout, _ = staged_run["evaluate"]  # type: ignore[misc]
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["Gaussian noise", "Uniform noise"]
    assert "Gaussian noise" in stdout and "FPR95 (ID+)" in stdout
    for stage in STAGES:
        assert (out / stage.done_marker()).exists()


def test_run_after_the_stages_skips_everything(
    staged_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    out = staged_run["out"]
    assert isinstance(out, Path)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert main(_smoke("run", out, "--dry-run")) == 0
    status = capsys.readouterr().out
    for stage in STAGES:
        assert any(line.split()[:2] == [stage.name, "done"] for line in status.splitlines()), stage.name
    assert main(_smoke("run", out)) == 0
    captured = capsys.readouterr()
    for stage in STAGES:
        assert f"[{stage.name}] skipped" in captured.err
    assert "running" not in captured.err
    _, evaluate_stdout, _ = staged_run["evaluate"]  # type: ignore[misc]
    assert captured.out == evaluate_stdout
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}


def test_force_redoes_only_that_stage(staged_run: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    out = staged_run["out"]
    assert isinstance(out, Path)
    anchors_time = (out / "anchors.safetensors").stat().st_mtime_ns
    report_before = (out / "report.json").read_text()
    assert main(_smoke("evaluate", out, "--force")) == 0
    captured = capsys.readouterr()
    assert "[report] running" in captured.err and "[anchors]" not in captured.err
    assert (out / "anchors.safetensors").stat().st_mtime_ns == anchors_time
    assert (out / "report.json").read_text() == report_before  # deterministic evaluation


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def test_errors_are_one_line_with_exit_code_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 1
    assert _error_lines(capsys) == [f"dreamood train: error: configuration file not found: {tmp_path / 'missing.toml'}"]
    assert main(["anchors", "--set", "training.epoch=3"]) == 1
    (line,) = _error_lines(capsys)
    assert "unknown key 'training.epoch' in overrides (did you mean 'training.epochs'?)" in line
    assert main(["anchors", "--set", "training.epochs"]) == 1
    assert _error_lines(capsys) == [
        "dreamood anchors: error: --set expects KEY=VALUE (e.g. training.epochs=10), got 'training.epochs'"
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampler]\nsigma = 'wide'\n")
    assert main(["run", "--config", str(bad)]) == 1
    (line,) = _error_lines(capsys)
    assert line.startswith("dreamood run: error: ") and "sampler.sigma must be a number, got str 'wide'" in line
    data_root = tmp_path / "no-cifar"
    assert main(["fit-encoder", "--output-dir", str(tmp_path / "run"), "--set", f"data.root={data_root}"]) == 1
    (line,) = _error_lines(capsys)
    assert "the anchors artefact" in line and "`dreamood anchors`" in line


def test_usage_errors_exit_2_and_debug_shows_the_exception(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 2
    capsys.readouterr()
    with pytest.raises(FileNotFoundError, match="configuration file not found"):
        main(["train", "--debug", "--config", str(tmp_path / "missing.toml")])


def test_unexpected_errors_name_their_type(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import dreamood.cli as cli

    def broken(args: object) -> int:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(cli, "_run_all", broken)
    assert main(["run", "--dry-run"]) == 1
    assert _error_lines(capsys) == [
        "dreamood run: error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB (run with --debug for the "
        "traceback)"
    ]


def test_only_train_and_generate_run_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in ("anchors", "run", "evaluate"):
        assert main([command, "--output-dir", str(tmp_path)]) == 1
        (line,) = _error_lines(capsys)
        assert "under torchrun only `generate` and `train` are supported" in line


def test_demo_is_loaded_lazily(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.machinery
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dreamood.demo" else real_find_spec(name, *a)
    )
    assert main(["demo", "--port", "1"]) == 1
    assert _error_lines(capsys) == [
        "dreamood demo: error: the demo is not available in this installation (the module dreamood.demo is missing)"
    ]
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    seen: list[list[str]] = []
    fake = types.ModuleType("dreamood.demo")
    fake.__spec__ = importlib.machinery.ModuleSpec("dreamood.demo", None)
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dreamood.demo", fake)
    monkeypatch.setattr(dreamood, "demo", fake, raising=False)
    assert main(["demo", "--help", "--port", "8000"]) == 3
    assert seen == [["--help", "--port", "8000"]]


def test_demo_help_comes_from_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("dreamood.demo") is None:
        pytest.skip("this installation has no demo")
    assert main(["demo", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: dreamood demo")
    assert main(["demo", "--no-such-option"]) == 2


# ---- baselines ------------------------------------------------------------------------------------------------


def test_run_help_names_every_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    from dreamood.pipeline import GENERALIZATION_BASELINES, OOD_BASELINES

    assert main(["run", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, hyphenated names too
    assert "--baselinesNAMES" in text
    for name in (*OOD_BASELINES, *GENERALIZATION_BASELINES):
        assert name in text, name


def test_unknown_baselines_are_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--output-dir", str(tmp_path), "--baselines", "godin,memo"]) == 1
    assert _error_lines(capsys) == [
        "dreamood run: error: --baselines: unknown baseline(s) memo for dream-ood: choose from godin, gan, or all"
    ]
    assert main(["run", "--config", "imagenet100-dream-id", "--output-dir", str(tmp_path), "--baselines", "gan"]) == 1
    (line,) = _error_lines(capsys)
    assert "unknown baseline(s) gan for dream-id" in line and "cutmix" in line
    assert main(["run", "--output-dir", str(tmp_path), "--baselines", "godin", "--force", "gan"]) == 1
    assert _error_lines(capsys) == [
        "dreamood run: error: --force names baseline(s) gan that this run does not run (see --baselines)"
    ]
    assert main(["run", "--output-dir", str(tmp_path), "--force", "bogus"]) == 1
    (line,) = _error_lines(capsys)
    assert "force names unknown stages or baselines ['bogus']" in line and "generic-prompts" in line
    assert list(tmp_path.iterdir()) == []


def test_run_with_baselines_writes_their_reports_and_a_table_then_skips_them(
    staged_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    from dreamood.evaluation import OODReport
    from dreamood.pipeline import ood_table

    out = staged_run["out"]
    assert isinstance(out, Path)
    assert main(_smoke("run", out, "--baselines", "godin", "--dry-run")) == 0
    assert capsys.readouterr().out.splitlines()[-2].split() == ["baseline", "godin", "to", "do", str(
        out / "baselines" / "godin" / "report.json")]  # fmt: skip
    assert main(_smoke("run", out, "--baselines", "godin")) == 0
    first = capsys.readouterr()
    assert "[baseline godin] training" in first.err
    reports = {"DREAM-OOD": OODReport.from_json(out / "report.json")}
    reports["godin"] = OODReport.from_json(out / "baselines" / "godin" / "report.json")
    table = ood_table(reports)
    assert first.out.endswith(table + "\n")
    _, evaluate_stdout, _ = staged_run["evaluate"]  # type: ignore[misc]
    assert first.out == evaluate_stdout + table + "\n"
    assert (out / "baselines.md").read_text() == table + "\n"
    assert (out / "baselines" / "godin" / "report.md").is_file()
    assert not (out / "baselines" / "gan").exists()

    # Resumed: the finished baseline is skipped like the finished stages, its files untouched.
    files = {p: p.stat().st_mtime_ns for p in (out / "baselines").rglob("*") if p.is_file()}
    assert main(_smoke("run", out, "--baselines", "godin")) == 0
    again = capsys.readouterr()
    assert "[baseline godin] skipped" in again.err and "training" not in again.err
    assert again.out == first.out
    assert files == {p: p.stat().st_mtime_ns for p in (out / "baselines").rglob("*") if p.is_file()}
    assert main(_smoke("run", out, "--baselines", "godin", "--dry-run")) == 0
    assert capsys.readouterr().out.splitlines()[-2].split()[:3] == ["baseline", "godin", "done"]

    # Forced: retrained from scratch (no resume from its checkpoint), to the same result; the stages are skipped.
    assert main(_smoke("run", out, "--baselines", "godin", "--force", "godin", "--dry-run")) == 0
    assert capsys.readouterr().out.splitlines()[-2].split()[:3] == ["baseline", "godin", "forced"]
    assert main(_smoke("run", out, "--baselines", "godin", "--force", "godin")) == 0
    forced = capsys.readouterr()
    assert "[baseline godin] training for" in forced.err and "[classifier] running" not in forced.err
    assert "[baseline godin] skipped" not in forced.err and "classifier loaded" not in forced.err
    assert forced.out == first.out
    redone = {p: p.stat().st_mtime_ns for p in (out / "baselines" / "godin").rglob("*") if p.is_file()}
    assert all(redone[p] != files[p] for p in redone)


def test_dream_id_run_prints_its_accuracy_and_the_generalization_baselines(
    tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dreamood.pipeline import accuracy_table

    out = _run_dir(tmp_path / "run", tiny_sd)
    command = _smoke("run", out, "--config", "imagenet100-dream-id", "--baselines", "cross-entropy", "-q")
    assert main(command) == 0
    printed = capsys.readouterr().out
    accuracy = json.loads((out / "generalization.json").read_text())
    assert json.dumps({name: round(100 * value, 2) for name, value in accuracy.items()}) in printed.splitlines()
    baseline = json.loads((out / "baselines" / "cross-entropy" / "generalization.json").read_text())
    table = accuracy_table({"DREAM-ID": accuracy, "cross-entropy": baseline})
    assert printed.endswith(table + "\n") and (out / "baselines.md").read_text() == table + "\n"


# ---- progress bars ---------------------------------------------------------------------------------------------


def test_no_progress_silences_the_libraries_loading_bars(staged_run: dict[str, object]) -> None:
    # The stage commands ran with --no-progress: neither transformers nor diffusers may draw a bar.
    for command in ("anchors", "generate"):
        _, _, stderr = staged_run[command]  # type: ignore[misc]
        assert "Loading" not in stderr and "it/s]" not in stderr, (command, stderr)


def test_evaluate_compares_post_hoc_detectors_in_one_table(
    staged_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    out = staged_run["out"]
    assert isinstance(out, Path)
    assert main(_smoke("evaluate", out, "-q", "--detectors", "msp,energy,knn")) == 0
    printed = capsys.readouterr().out
    table = (out / "detectors" / "detectors.md").read_text()
    for name in ("MSP", "Energy", "KNN"):
        assert any(line.startswith(f"| {name} |") for line in table.splitlines()), table
        assert any(line.startswith(f"| {name} |") for line in printed.splitlines()), printed
    assert main(_smoke("evaluate", out, "-q", "--detectors", "msp,nonsense")) == 1
    assert "nonsense" in capsys.readouterr().err
