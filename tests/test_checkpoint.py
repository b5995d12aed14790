"""Tests for dreamood.training.checkpoint, schedule, precision and rng: the pieces every training loop shares."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.errors import ArtifactError
from dreamood.io import load_checkpoint, save_checkpoint
from dreamood.training import TrainingConfig, train_classifier
from dreamood.training.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, TrainingCheckpoint
from dreamood.training.precision import autocast, autocast_dtype, grad_scaler
from dreamood.training.rng import capture_rng_state, restore_rng_state, seed_everything
from dreamood.training.schedule import cosine_factor, cosine_schedule

# ---- the cosine schedule -------------------------------------------------------------------------------------


def _old_encoder_factor(lr: float, total_steps: int) -> Any:
    """fit_encoder's schedule as it was written before the shared one (min_lr fixed at 1e-6)."""
    min_factor = min(1.0, 1e-6 / lr)
    return lambda step: (
        min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def _old_loop_factor(lr: float, min_lr: float, total_steps: int) -> Any:
    """train_classifier's schedule as it was written before the shared one."""
    ratio = min_lr / lr
    return lambda step: ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _lr_sequence(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[list[float]]:
    optimizer = scheduler.optimizer
    rates = []
    for _ in range(steps + 1):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def _sgd(lr: float, groups: int = 1) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=lr, momentum=0.9)


@pytest.mark.parametrize(
    ("lr", "min_lr", "total"),
    [(0.1, 1e-6, 600), (0.05, 1e-6, 9), (3e-7, 1e-6, 12), (0.2, 1e-3, 12), (0.1, 0.1, 5), (0.1, 0.0, 7)],
)
def test_cosine_schedule_gives_bit_identical_rates_to_the_former_ones(lr: float, min_lr: float, total: int) -> None:
    new = _lr_sequence(cosine_schedule(_sgd(lr, groups=2), total, min_lr), total)
    if min_lr == 1e-6:
        old_optimizer = _sgd(lr, groups=2)
        old = _lr_sequence(torch.optim.lr_scheduler.LambdaLR(old_optimizer, _old_encoder_factor(lr, total)), total)
        assert new == old  # exact float equality at every step, both groups
    if min_lr <= lr:
        old_optimizer = _sgd(lr, groups=2)
        old = _lr_sequence(torch.optim.lr_scheduler.LambdaLR(old_optimizer, _old_loop_factor(lr, min_lr, total)), total)
        assert new == old
    # Independently: the closed form in float64, from lr down to max(min_lr, ...) at the last step.
    floor = min(lr, min_lr)
    for step, rates in enumerate(new):
        expected = floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        assert rates == [pytest.approx(expected, rel=1e-12, abs=1e-18)] * 2
    assert new[0] == [lr, lr]


def test_cosine_schedule_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        cosine_factor(0, 0.5)
    with pytest.raises(ValueError, match=r"min_ratio must lie in \[0, 1\], got 1.5"):
        cosine_factor(10, 1.5)
    with pytest.raises(ValueError, match="min_lr"):
        cosine_schedule(_sgd(0.1), 10, -1.0)
    assert cosine_factor(4, 0.25)(9) == cosine_factor(4, 0.25)(4) == 0.25  # past the end: the last factor


# ---- mixed precision and seeding -----------------------------------------------------------------------------


def test_autocast_dtype_names_and_errors() -> None:
    assert autocast_dtype(None) is None
    for name in ("bf16", "bfloat16", torch.bfloat16):
        assert autocast_dtype(name) == torch.bfloat16
    for name in ("fp16", "float16", torch.float16):
        assert autocast_dtype(name) == torch.float16
    with pytest.raises(ValueError, match="amp_dtype must be .* got 'int8'"):
        autocast_dtype("int8", "amp_dtype")
    with pytest.raises(ValueError, match="amp must be"):
        autocast_dtype(torch.float32)
    cpu = torch.device("cpu")
    assert grad_scaler(cpu, torch.float16).is_enabled() and not grad_scaler(cpu, torch.bfloat16).is_enabled()
    with autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    seed_everything(2**32 + 7)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002
    random.seed(2**32 + 7)
    np.random.seed(7)  # noqa: NPY002
    torch.manual_seed(2**32 + 7)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002


def test_rng_state_without_the_global_generators_leaves_them_alone() -> None:
    generator = torch.Generator().manual_seed(3)
    state = capture_rng_state({"g": [generator]}, global_state=False)
    assert set(state) == {"generators"}
    expected = torch.rand(3, generator=generator)
    torch.manual_seed(5)
    global_draw = torch.rand(1)
    torch.manual_seed(5)
    assert restore_rng_state(state, {"g": [generator]}, global_state=False) == []
    assert torch.equal(torch.rand(3, generator=generator), expected)
    assert torch.equal(torch.rand(1), global_draw)
    with pytest.raises(KeyError):
        restore_rng_state(state, {"g": [generator]})


# ---- the checkpoint ------------------------------------------------------------------------------------------


def _objects(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any, torch.Generator]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = cosine_schedule(optimizer, 10, 1e-6)
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed)


def _checkpoint(path: Path | None, seed: int, **options: Any) -> tuple[TrainingCheckpoint, nn.Module, torch.Generator]:
    model, optimizer, scheduler, generator = _objects(seed)
    settings: dict[str, Any] = {
        "objects": {"model": model, "optimizer": optimizer, "scheduler": scheduler},
        "run": {"steps_per_epoch": 4},
        "generators": {"loader": [generator]},
        **options,
    }
    return TrainingCheckpoint(path, "test_loop", **settings), model, generator


def _train_a_step(model: nn.Module, checkpoint: TrainingCheckpoint) -> None:
    optimizer, scheduler = checkpoint.objects["optimizer"], checkpoint.objects["scheduler"]
    model(torch.randn(5, 3)).square().mean().backward()
    optimizer.step()
    scheduler.step()


def test_save_then_load_restores_every_state_and_random_stream(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    saved, model, generator = _checkpoint(path, seed=0)
    _train_a_step(model, saved)
    saved.save(3, {"loss": [0.5, 0.25, 0.125]}, extra={"note": "kept"})
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = (torch.rand(4), torch.rand(4, generator=generator), random.random(), np.random.rand())  # noqa: NPY002
    expected_lr = saved.objects["optimizer"].param_groups[0]["lr"]

    resumed, other_model, other_generator = _checkpoint(path, seed=9)
    assert resumed.exists()
    state = resumed.load()
    resumed.restore_rng(state)
    assert state["epoch"] == 3 and state["history"] == {"loss": [0.5, 0.25, 0.125]} and state["note"] == "kept"
    assert state["format"] == CHECKPOINT_FORMAT and state["format_version"] == FORMAT_VERSION
    assert state["kind"] == "test_loop" and state["steps_per_epoch"] == 4
    for name, value in other_model.state_dict().items():
        assert torch.equal(value, expected_weights[name])
    assert resumed.objects["optimizer"].param_groups[0]["lr"] == expected_lr
    draws = (torch.rand(4), torch.rand(4, generator=other_generator), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(draws[0], expected_draws[0]) and torch.equal(draws[1], expected_draws[1])
    assert draws[2:] == expected_draws[2:]


def test_a_run_without_a_path_writes_nothing(tmp_path: Path) -> None:
    checkpoint, _, _ = _checkpoint(None, seed=0)
    checkpoint.save(1, [])
    checkpoint.remove_temporaries()
    assert not checkpoint.exists() and not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="keeps no checkpoint"):
        checkpoint.load()


def test_resume_refuses_other_loops_runs_layouts_and_objects(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    saved, _, _ = _checkpoint(path, seed=0)
    saved.save(1, [])
    state = load_checkpoint(path)

    with pytest.raises(ArtifactError, match="is not a checkpoint of other_loop but of test_loop"):
        TrainingCheckpoint(path, "other_loop", objects={}).load()
    with pytest.raises(ValueError, match="written with steps_per_epoch=4, this run has steps_per_epoch=5"):
        _checkpoint(path, seed=0, run={"steps_per_epoch": 5})[0].load()
    with pytest.raises(ArtifactError, match=r"its 'model' state does not fit"):
        TrainingCheckpoint(path, "test_loop", objects={"model": nn.Linear(2, 2)}).load()

    save_checkpoint(path, {"epoch": 1, "steps_per_epoch": 4, "model": state["model"]})  # the layout before formats
    with pytest.raises(ArtifactError, match=r"is not a checkpoint of test_loop \(format None.*older dreamood"):
        _checkpoint(path, seed=0)[0].load()
    for version in (FORMAT_VERSION + 1, 1, None):
        save_checkpoint(path, {**state, "format_version": version})
        expected = "but of train_classifier" if version == 1 else f"layout version {version!r}"
        with pytest.raises(ArtifactError, match=expected):
            _checkpoint(path, seed=0)[0].load()
    save_checkpoint(path, {key: value for key, value in state.items() if key != "history"})
    with pytest.raises(ArtifactError, match=r"lacks the entries \['history'\]"):
        _checkpoint(path, seed=0)[0].load()
    save_checkpoint(path, {**state, "rng": []})
    checkpoint = _checkpoint(path, seed=0)[0]
    with pytest.raises(ArtifactError, match="no random state of process 0"):
        checkpoint.restore_rng(checkpoint.load())


def test_bad_construction_and_entries(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"objects\['model'\] must have state_dict"):
        TrainingCheckpoint(tmp_path / "c.pt", "test_loop", objects={"model": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"\['epoch'\]"):
        TrainingCheckpoint(tmp_path / "c.pt", "test_loop", objects={"epoch": model})
    with pytest.raises(ValueError, match=r"\['model'\]"):
        TrainingCheckpoint(tmp_path / "c.pt", "test_loop", objects={"model": model}, run={"model": 1})
    with pytest.raises(ValueError, match=r"extra entries \['model'\]"):
        TrainingCheckpoint(tmp_path / "c.pt", "test_loop", objects={"model": model}).save(1, [], extra={"model": 1})


def _classifier_run(tmp_path: Path, config: TrainingConfig, **options: Any) -> nn.Module:
    x, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    train_classifier(model, loader, config, output_dir=tmp_path, resume=True, device="cpu", progress=False, **options)
    return model


def test_train_classifier_resumes_only_a_checkpoint_of_the_same_run(tmp_path: Path) -> None:
    trained = _classifier_run(tmp_path, TrainingConfig(epochs=2), fingerprint="run A")
    again = _classifier_run(tmp_path, TrainingConfig(epochs=2), fingerprint="run A")  # finished: nothing to train
    for a, b in zip(trained.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    for config, options, message in [
        (
            TrainingConfig(epochs=2, lr=0.05),
            {"fingerprint": "run A"},
            "written with settings.lr=0.1, this run has settings.lr=0.05",
        ),
        (
            TrainingConfig(epochs=2),
            {"fingerprint": "run A", "seed": 1},
            "written with settings.seed=0, this run has settings.seed=1",
        ),
        (TrainingConfig(epochs=2), {"fingerprint": "run B"}, "written with fingerprint='run A', this run has"),
        (
            TrainingConfig(epochs=2, amp="bf16"),
            {"fingerprint": "run A"},
            "written with settings.amp=None, this run has settings.amp=",
        ),
    ]:
        with pytest.raises(ValueError, match=rf"cannot resume from .*checkpoint.pt: it was {message}"):
            _classifier_run(tmp_path, config, **options)


def test_a_checkpoint_of_the_first_layout_is_refused_clearly(tmp_path: Path) -> None:
    _classifier_run(tmp_path, TrainingConfig(epochs=2))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["kind"] == "train_classifier"
    first_layout = {key: value for key, value in state.items() if key not in ("kind", "settings", "fingerprint")}
    save_checkpoint(tmp_path / "checkpoint.pt", {**first_layout, "format_version": 1, "regularizer": {}})
    with pytest.raises(ValueError, match="it records no 'settings' to check against this run .* resume=False"):
        _classifier_run(tmp_path, TrainingConfig(epochs=2))


def test_fit_encoder_resumes_only_a_checkpoint_of_the_same_run(tmp_path: Path) -> None:
    from dreamood.anchors import TokenEmbeddings
    from dreamood.encoder import TextConditionedEncoder, fit_encoder

    anchors = TokenEmbeddings(["cat", "dog"], 0.4 * torch.eye(2, 6))
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)

    def fit(**options: Any) -> None:
        torch.manual_seed(0)
        encoder = TextConditionedEncoder(nn.Linear(3, 5), 5, anchors)
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        fit_encoder(
            encoder, loader, 2, checkpoint_dir=tmp_path, resume=True, device="cpu", show_progress=False, **options
        )

    fit(lr=0.1, fingerprint="run A")
    fit(lr=0.1, fingerprint="run A")  # finished: resumes and trains nothing
    with pytest.raises(ValueError, match="it was written with settings.lr=0.1, this run has settings.lr=0.05"):
        fit(lr=0.05, fingerprint="run A")
    with pytest.raises(ValueError, match="it was written with fingerprint='run A', this run has fingerprint='run B'"):
        fit(lr=0.1, fingerprint="run B")
