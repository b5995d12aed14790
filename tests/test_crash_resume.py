"""Crash and resume: real processes killed with SIGKILL at seeded random points, then resumed; full disks.

Encoder training (Phase 1) and classifier training with VOS virtual outliers (Phase 3) run in a child process
(this file run as a script) that prints one line per image it reads. The test kills it with SIGKILL after a
seeded random number of lines, kills the resumed run again inside its first checkpoint write (``os.fsync``
sends SIGKILL to its own process), resumes once more to the end, and compares the final weights with an
uninterrupted run in this process: they must be bit-identical. A whole ``dreamood run --smoke`` is killed
after a random number of finished stages and re-run: the finished stages must be skipped, their artefacts
untouched. Full disks and permission errors are simulated by making the file system calls raise.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dreamood.anchors import TokenEmbeddings
from dreamood.encoder import CHECKPOINT_NAME as ENCODER_CHECKPOINT
from dreamood.encoder import TextConditionedEncoder, fit_encoder
from dreamood.feature_bank import FeatureBank
from dreamood.io import load_checkpoint, save_checkpoint
from dreamood.sampling.feature_samplers import NPOSSampler, VOSSampler
from dreamood.training import EnergyOODRegularizer, TrainingConfig, train_classifier

WORKER = Path(__file__).resolve()
REPO = WORKER.parents[1]
CRASH_SEED = 2023
SAMPLES = 24  # images per epoch
EPOCHS = 3
TIMEOUT = 240
FINAL_NAME = "final.pt"
READ = "@image-read"

# Counts reported by test_crash_resume_counts (filled as the tests run).
COUNTS = {"crash points": 0, "resumes": 0, "resumes verified identical": 0}


# ---- the jobs, run in this process (reference) and in killed child processes ----------------------------------


class _Announced(Dataset[tuple[Tensor, Tensor]]):
    """Two separable blobs; announces every read on stdout so that the parent can kill at a chosen point."""

    def __init__(self, announce: bool) -> None:
        generator = torch.Generator().manual_seed(5)
        self.labels = torch.arange(SAMPLES) % 3
        self.inputs = 2.0 * nn.functional.one_hot(self.labels, 6).float() + torch.randn(SAMPLES, 6, generator=generator)
        self.announce = announce

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if self.announce:
            print(READ, flush=True)
        # Augmentation from the global generator, which a resumed run must restore too.
        return self.inputs[index] + 0.05 * torch.randn(6), self.labels[index]


def _loader(announce: bool) -> DataLoader[Any]:
    return DataLoader(_Announced(announce), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(3))


def _encoder_job(out_dir: Path, announce: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2))
    anchors = TokenEmbeddings(["cat", "dog", "car"], torch.eye(3, 5) + 0.1)
    encoder = TextConditionedEncoder(backbone, 16, anchors)
    history = fit_encoder(
        encoder,
        _loader(announce),
        EPOCHS,
        lr=0.05,
        device="cpu",
        checkpoint_dir=out_dir,
        resume=True,
        show_progress=False,
        seed=11,
    )
    return {"model": encoder.state_dict(), "history": history.as_dict()}


def _classifier_job(out_dir: Path, announce: bool) -> dict[str, Any]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=8, weighted=True, num_classes=3)
    result = train_classifier(
        model,
        _loader(announce),
        TrainingConfig(epochs=EPOCHS, ood_start_epoch=1, lr=0.05),
        regularizer=regularizer,
        feature_sampler=VOSSampler(3, queue_size=4, sample_from=64, select=2, seed=4),
        feature_extractor=model[:3],
        classifier_head=model[3],
        device="cpu",
        output_dir=out_dir,
        resume=True,
        progress=False,
    )
    history = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.history]
    return {"model": model.state_dict(), "regularizer": regularizer.state_dict(), "history": history}


JOBS = {"encoder": (_encoder_job, ENCODER_CHECKPOINT), "classifier": (_classifier_job, "checkpoint.pt")}


def _worker_main(job: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    crash_at = int(os.environ.get("DREAMOOD_TEST_KILL_AT_FSYNC", "0"))
    if crash_at:
        real_fsync, calls = os.fsync, [0]

        def fsync_then_die(fd: int) -> None:
            calls[0] += 1
            if calls[0] == crash_at:  # the temporary file is written, the rename has not happened
                os.kill(os.getpid(), signal.SIGKILL)
            real_fsync(fd)

        os.fsync = fsync_then_die
    state = JOBS[job][0](Path(out_dir), announce=True)
    save_checkpoint(Path(out_dir) / FINAL_NAME, state)


# ---- driving the child processes -----------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _run_child(
    args: list[str], *, kill_after: int | None = None, marker: str = READ, env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run a child; SIGKILL it once ``kill_after`` output lines contain ``marker``. Returns (code, lines)."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or _child_env(), cwd=REPO
    )
    assert process.stdout is not None
    lines: list[str] = []
    seen = 0
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            seen += marker in line
            if kill_after is not None and seen >= kill_after:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    return process.returncode, lines


def _worker(job: str, out_dir: Path, *, kill_after: int | None = None, kill_at_fsync: int = 0) -> tuple[int, int]:
    """Run the job in a child process; return its exit code and the number of images it read."""
    env = _child_env()
    if kill_at_fsync:
        env["DREAMOOD_TEST_KILL_AT_FSYNC"] = str(kill_at_fsync)
    code, lines = _run_child([sys.executable, str(WORKER), job, str(out_dir)], kill_after=kill_after, env=env)
    if kill_after is None and not kill_at_fsync:
        assert code == 0, "\n".join(lines[-30:])
    return code, sum(READ in line for line in lines)


def _checkpoint_epoch(path: Path) -> int:
    """Epochs completed by the checkpoint at ``path`` (0 when absent); it must always load."""
    return int(load_checkpoint(path)["epoch"]) if path.exists() else 0


def _visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


@pytest.mark.parametrize("job", sorted(JOBS))
def test_killed_training_resumes_to_bit_identical_weights(job: str, tmp_path: Path) -> None:
    function, checkpoint_name = JOBS[job]
    expected = function(tmp_path / "reference", announce=False)
    out_dir = tmp_path / "killed"
    checkpoint = out_dir / checkpoint_name
    total_reads = EPOCHS * SAMPLES
    rng = random.Random(f"{CRASH_SEED}-{job}")

    # 1. SIGKILL at a random read after the first epoch's checkpoint.
    kill_after = rng.randint(SAMPLES + 1, total_reads - 1)
    code, _ = _worker(job, out_dir, kill_after=kill_after)
    assert code == -signal.SIGKILL
    epoch = _checkpoint_epoch(checkpoint)
    assert 1 <= epoch < EPOCHS

    # 2. Resume; SIGKILL inside the first checkpoint write (after the data, before the rename).
    code, reads = _worker(job, out_dir, kill_at_fsync=1)
    assert code == -signal.SIGKILL
    assert reads == SAMPLES, "the resumed run did not start from the checkpoint's epoch"
    assert _checkpoint_epoch(checkpoint) == epoch, "a checkpoint killed mid-write replaced the previous one"
    assert _temporaries(out_dir), "the kill did not happen inside the checkpoint write"

    # 3. Resume to the end: only the remaining epochs are trained.
    code, reads = _worker(job, out_dir)
    assert reads == (EPOCHS - epoch) * SAMPLES
    final = load_checkpoint(out_dir / FINAL_NAME)
    for part in ("model", "regularizer"):
        for name, value in expected.get(part, {}).items():
            assert torch.equal(final[part][name], value), f"{part}.{name} differs from the uninterrupted run"
    assert final["history"] == expected["history"]
    assert FINAL_NAME in _visible_files(out_dir) and checkpoint.name in _visible_files(out_dir)
    assert not _temporaries(out_dir), "the resumed run left the killed write's temporary file"
    COUNTS["crash points"] += 2
    COUNTS["resumes"] += 2
    COUNTS["resumes verified identical"] += 1


# ---- feature samplers: a resumed VOS / NPOS run is exact ------------------------------------------------------


class _Interrupted(Exception):
    pass


def _sampler_run(sampler_name: str, out_dir: Path, fail_after: int | None) -> nn.Module:
    reads = [0]

    class Data(Dataset[tuple[Tensor, Tensor]]):
        def __init__(self) -> None:
            self.inner = _Announced(announce=False)

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
            reads[0] += 1
            if fail_after is not None and reads[0] > fail_after:
                raise _Interrupted
            return self.inner[index]

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    sampler = (
        VOSSampler(3, queue_size=4, sample_from=64, select=2)
        if sampler_name == "vos"
        else NPOSSampler(3, queue_size=6, k=2, num_boundary=3, num_anchors=2, candidates_per_anchor=8, sigma=0.5)
    )
    train_classifier(
        model,
        DataLoader(Data(), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(3)),
        TrainingConfig(epochs=EPOCHS, lr=0.05),
        regularizer=EnergyOODRegularizer(head="linear"),
        feature_sampler=sampler,
        feature_extractor=model[:2],
        classifier_head=model[2],
        device="cpu",
        output_dir=out_dir,
        resume=True,
        progress=False,
    )
    return model


@pytest.mark.parametrize("sampler_name", ["vos", "npos"])
def test_resume_with_a_feature_sampler_is_bit_exact(sampler_name: str, tmp_path: Path) -> None:
    import shutil
    import warnings

    expected = _sampler_run(sampler_name, tmp_path / "a", None)
    with pytest.raises(_Interrupted):
        _sampler_run(sampler_name, tmp_path / "b", fail_after=SAMPLES + 10)  # dies in epoch 2
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] == 1
    assert state["feature_sampler"]["sampler"] == {"vos": "VOSSampler", "npos": "NPOSSampler"}[sampler_name]
    queue_size = {"vos": 4, "npos": 6}[sampler_name]
    assert state["feature_sampler"]["queues"]["counts"].tolist() == [queue_size] * 3

    # The same checkpoint without the sampler's state: the resumed run restarts with empty queues.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    save_checkpoint(tmp_path / "c" / "checkpoint.pt", {**state, "feature_sampler": {}})

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the resumed run may differ" warning
        resumed = _sampler_run(sampler_name, tmp_path / "b", None)
    for (name, want), got in zip(expected.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name
    with pytest.warns(UserWarning, match="restarts empty"):
        without_state = _sampler_run(sampler_name, tmp_path / "c", None)
    assert not all(torch.equal(a, b) for a, b in zip(expected.parameters(), without_state.parameters()))
    COUNTS["resumes"] += 1
    COUNTS["resumes verified identical"] += 1


def test_sampler_state_round_trip_continues_the_same_draws() -> None:
    features = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 2
    original = VOSSampler(2, queue_size=8, sample_from=32, select=3, seed=7)
    original.update(features, labels)
    original.sample()  # advance the internal generator
    copy = VOSSampler(2, queue_size=8, sample_from=32, select=3, seed=99)
    copy.load_state_dict(original.state_dict())
    assert torch.equal(copy.sample(), original.sample())
    for index in range(2):
        assert torch.equal(copy.queues.get(index), original.queues.get(index))
    # An empty sampler's state restores an empty sampler.
    empty = VOSSampler(2, queue_size=8)
    empty.load_state_dict(VOSSampler(2, queue_size=8).state_dict())
    assert not empty.ready and empty.queues.counts.tolist() == [0, 0]


# ---- a whole pipeline killed between stages -------------------------------------------------------------------


STAGE_DONE = "] done in "


@pytest.mark.slow
def test_killed_pipeline_run_does_not_redo_finished_stages(tmp_path: Path) -> None:
    if not (REPO / "dreamood" / "cli.py").is_file():
        pytest.skip("dreamood.cli is not part of this checkout")
    command = [sys.executable, "-m", "dreamood", "run", "--smoke", "--no-progress", "--output-dir", str(tmp_path)]
    kill_after = random.Random(f"{CRASH_SEED}-pipeline").randint(1, 5)
    code, lines = _run_child(command, kill_after=kill_after, marker=STAGE_DONE)
    finished = [line[1 : line.index("]")] for line in lines if line.startswith("[") and STAGE_DONE in line]
    assert code == -signal.SIGKILL, "\n".join(lines[-20:])
    assert len(finished) >= kill_after
    artefacts = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and "tiny-" not in str(path)}

    code, lines = _run_child(command)
    assert code == 0, "\n".join(lines[-30:])
    skipped = [line[1 : line.index("]")] for line in lines if line.startswith("[") and "] skipped" in line]
    redone = [line[1 : line.index("]")] for line in lines if line.startswith("[") and "] running" in line]
    assert set(finished) <= set(skipped), f"finished before the kill: {finished}; skipped after: {skipped}"
    assert not set(finished) & set(redone)
    changed = [
        str(path.relative_to(tmp_path))
        for path, data in artefacts.items()
        if path.name not in ("timings.json", "config.json") and (not path.exists() or path.read_bytes() != data)
    ]
    assert not any(any(name in c for name in _stage_files(finished)) for c in changed), changed
    assert (tmp_path / "report.json").is_file()
    COUNTS["crash points"] += 1
    COUNTS["resumes"] += 1


def _stage_files(stages: list[str]) -> list[str]:
    from dreamood.pipeline import stage_named

    return [Path(stage_named(stage).artifact).stem for stage in stages]


# ---- full disks and permission errors -------------------------------------------------------------------------


def _failing(real: Any, after: int, error: OSError) -> Any:
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise error
        return real(*args, **kwargs)

    return call


def test_full_disk_during_an_encoder_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    encoder = TextConditionedEncoder(nn.Linear(6, 16), 16, torch.eye(3, 5) + 0.1)
    # The first checkpoint is written; the disk is full when the second is synced.
    monkeypatch.setattr(os, "fsync", _failing(os.fsync, 1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match=r"No space left on device \(while writing\): '.*encoder_checkpoint.pt'") as info:
        fit_encoder(encoder, _loader(announce=False), 2, device="cpu", checkpoint_dir=tmp_path, show_progress=False)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / ENCODER_CHECKPOINT)["epoch"] == 1
    assert os.listdir(tmp_path) == [ENCODER_CHECKPOINT], "a temporary file was left behind"


def test_permission_error_during_training_keeps_checkpoint_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    # Epoch 1 writes checkpoint.pt and metrics.json; then the folder becomes read-only.
    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", _failing(tempfile.mkstemp, 2, denied))
    with pytest.raises(PermissionError, match=r"Permission denied \(while writing\): '.*checkpoint.pt'"):
        train_classifier(
            model,
            _loader(announce=False),
            TrainingConfig(epochs=2, lr=0.05),
            device="cpu",
            output_dir=tmp_path,
            progress=False,
        )
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert [row["epoch"] for row in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [1]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.json"]


@pytest.mark.parametrize("failing_write", [1, 2], ids=["tensor-file", "sidecar"])
def test_full_disk_while_saving_an_artefact_leaves_the_old_one_intact(
    failing_write: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = FeatureBank(nn.functional.normalize(torch.randn(6, 4), dim=1), torch.tensor([0, 0, 0, 1, 1, 1]))
    path = old.save(tmp_path / "bank")
    # Same shapes, other content: a tensor file of one save with the sidecar of another would load silently.
    new = FeatureBank(nn.functional.normalize(torch.randn(6, 4), dim=1), torch.tensor([0, 0, 0, 1, 1, 1]))
    monkeypatch.setattr(os, "fsync", _failing(os.fsync, failing_write - 1, OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match=r"No space \(while writing\)"):
        new.save(path)
    monkeypatch.undo()
    loaded = FeatureBank.load(path)
    assert torch.equal(loaded.embeddings, old.embeddings) and torch.equal(loaded.labels, old.labels)
    assert sorted(os.listdir(tmp_path)) == ["bank.json", "bank.safetensors"]


def test_tensor_file_and_sidecar_of_different_saves_are_refused(tmp_path: Path) -> None:
    from dreamood.errors import ArtifactError

    first = TokenEmbeddings(["cat", "dog"], torch.ones(2, 3)).save(tmp_path / "a" / "anchors")
    second = TokenEmbeddings(["dog", "cat"], torch.ones(2, 3)).save(tmp_path / "b" / "anchors")
    first.with_suffix(".json").write_bytes(second.with_suffix(".json").read_bytes())  # a crash between renames
    with pytest.raises(ArtifactError, match="come from two different saves"):
        TokenEmbeddings.load(first)
    # Saving is deterministic: the same artefact gives the same bytes.
    again = TokenEmbeddings(["dog", "cat"], torch.ones(2, 3)).save(tmp_path / "c" / "anchors")
    assert again.read_bytes() == second.read_bytes()
    assert again.with_suffix(".json").read_bytes() == second.with_suffix(".json").read_bytes()


def test_cli_reports_a_full_disk_in_one_line_and_keeps_earlier_artefacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("dreamood.cli")
    assert cli.main(["anchors", "--smoke", "--no-progress", "--output-dir", str(tmp_path)]) == 0
    before = (tmp_path / "anchors.safetensors").read_bytes()
    monkeypatch.setattr(os, "replace", _failing(os.replace, 0, OSError(errno.ENOSPC, "No space left on device")))
    code = cli.main(["anchors", "--force", "--smoke", "--no-progress", "--output-dir", str(tmp_path)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err
    assert (tmp_path / "anchors.safetensors").read_bytes() == before
    assert TokenEmbeddings.load(tmp_path / "anchors.safetensors").num_classes == 4


def test_crash_points_are_inside_the_runs() -> None:
    points = []
    for job in sorted(JOBS):
        kill_after = random.Random(f"{CRASH_SEED}-{job}").randint(SAMPLES + 1, EPOCHS * SAMPLES - 1)
        assert SAMPLES < kill_after < EPOCHS * SAMPLES  # after a checkpoint, before the end
        points.append(f"{job}: SIGKILL after {kill_after} of {EPOCHS * SAMPLES} reads, then inside a checkpoint write")
    points.append(f"pipeline: SIGKILL after {random.Random(f'{CRASH_SEED}-pipeline').randint(1, 5)} finished stages")
    print("crash points:", "; ".join(points))
    print("so far in this session:", ", ".join(f"{name}: {value}" for name, value in COUNTS.items()))


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
