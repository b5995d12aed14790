"""train_classifier: exact loss and SGD update, schedule, batching, resume, checkpoints, errors, and OOD gains."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dreamood.config import TrainConfig
from dreamood.errors import ArtifactError, NonFiniteError
from dreamood.evaluation import OODEvaluator, energy_score, ood_metrics
from dreamood.training import EnergyOODRegularizer, TrainingConfig, train_classifier


def _mlp(seed: int = 0, width: int = 8, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, classes))


class QueueSampler:
    """A small deterministic feature-space sampler: keeps the last ``size`` features, pushes random ones outward."""

    def __init__(self, size: int = 8, num: int = 4) -> None:
        self.size = size
        self.num = num
        self.features: Tensor | None = None
        self.labels: Tensor | None = None
        self.updates: list[tuple[Tensor, Tensor]] = []

    @property
    def ready(self) -> bool:
        return self.features is not None and self.features.shape[0] >= self.size

    def update(self, features: Tensor, labels: Tensor) -> None:
        self.updates.append((features.clone(), labels.clone()))
        features = features if self.features is None else torch.cat([self.features, features])
        labels = labels if self.labels is None else torch.cat([self.labels, labels])
        self.features, self.labels = features[-self.size :], labels[-self.size :]

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        assert self.features is not None
        rows = torch.randint(self.features.shape[0], (self.num,), generator=generator)
        noise = torch.randn(self.num, self.features.shape[1], generator=generator)
        return 2.0 * self.features[rows] + 0.5 * noise

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features, "labels": self.labels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.features, self.labels = state["features"], state["labels"]


class FixedSampler:
    """Always ready; returns the same virtual outliers and records what it was fed."""

    def __init__(self, virtual: Tensor) -> None:
        self.virtual = virtual
        self.updates: list[tuple[Tensor, Tensor]] = []

    @property
    def ready(self) -> bool:
        return True

    def update(self, features: Tensor, labels: Tensor) -> None:
        self.updates.append((features.clone(), labels.clone()))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self.virtual.clone()


# ---- one exact step ----------------------------------------------------------------------------------------


def test_one_step_matches_hand_computed_loss_and_nesterov_sgd_update() -> None:
    torch.manual_seed(1)
    model = _mlp(width=4)
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=5)
    start_model, start_reg = copy.deepcopy(model).double(), copy.deepcopy(regularizer).double()
    x_id, y_id = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    x_syn, y_syn = torch.randn(3, 2), torch.tensor([2, 2, 1])
    x_out = torch.randn(4, 2) * 3
    virtual = torch.randn(2, 4)
    sampler = FixedSampler(virtual)
    lr, beta, wd, momentum = 0.3, 2.5, 5e-4, 0.9

    result = train_classifier(
        model,
        DataLoader(TensorDataset(x_id, y_id), batch_size=6),
        TrainingConfig(epochs=1, lr=lr, beta=beta, weight_decay=wd),
        outlier_loader=DataLoader(TensorDataset(x_out, torch.full((4,), 99)), batch_size=4),
        synthetic_id_loader=DataLoader(TensorDataset(x_syn, y_syn), batch_size=3),
        regularizer=regularizer,
        feature_sampler=sampler,
        feature_extractor=model[:2],
        classifier_head=model[2],
        device="cpu",
        progress=False,
    )

    # Reference in float64: CE on ID + generated inliers, L_ood on them vs outlier images and virtual outliers.
    logits_labelled = start_model(torch.cat([x_id, x_syn]).double())
    ce = nn.functional.cross_entropy(logits_labelled, torch.cat([y_id, y_syn]))
    logits_ood = torch.cat([start_model(x_out.double()), start_model[2](virtual.double())])
    loss = ce + beta * start_reg(logits_labelled, logits_ood)
    loss.backward()
    assert result.history[0].loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.history[0].ce_loss == pytest.approx(ce.item(), rel=1e-5)
    for trained, reference in ((model, start_model), (regularizer, start_reg)):
        for (name, after), before in zip(trained.named_parameters(), reference.parameters()):
            assert before.grad is not None
            step = before.grad + wd * before.detach()  # first step: momentum buffer = step
            expected = before.detach() - lr * (step + momentum * step)
            torch.testing.assert_close(after.detach().double(), expected, rtol=1e-5, atol=1e-6, msg=name)

    # The sampler saw the labelled features of this step, computed before the update.
    (features, labels), *rest = sampler.updates
    assert not rest
    torch.testing.assert_close(features.double(), start_model[:2](torch.cat([x_id, x_syn]).double()).detach())
    assert torch.equal(labels, torch.cat([y_id, y_syn]))


def test_learning_rate_follows_a_per_step_cosine() -> None:
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    lr, min_lr, epochs, steps = 0.2, 1e-3, 3, 4
    result = train_classifier(
        _mlp(),
        DataLoader(TensorDataset(x, y), batch_size=4),
        TrainingConfig(epochs=epochs, lr=lr, min_lr=min_lr),
        device="cpu",
        progress=False,
    )
    total = epochs * steps
    for epoch, record in enumerate(result.history):
        last_step = epoch * steps + steps - 1
        expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * last_step / total))
        assert record.lr == pytest.approx(expected, rel=1e-12)
        assert record.steps == steps and record.ood_steps == 0 and record.ood_loss is None


# ---- batching ----------------------------------------------------------------------------------------------


def test_batchnorm_normalises_id_and_outliers_together() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2, momentum=1.0, affine=False), nn.Linear(2, 3))
    x_id, y_id = torch.randn(5, 2), torch.randint(0, 3, (5,))
    x_out = torch.randn(3, 2) * 4 + 10
    train_classifier(
        model,
        DataLoader(TensorDataset(x_id, y_id), batch_size=5),
        TrainingConfig(epochs=1),
        outlier_loader=DataLoader(x_out, batch_size=3),  # plain image batches, no labels
        regularizer=EnergyOODRegularizer(head="linear"),
        device="cpu",
        progress=False,
    )
    both = torch.cat([x_id, x_out])
    torch.testing.assert_close(model[0].running_mean, both.mean(dim=0))
    torch.testing.assert_close(model[0].running_var, both.var(dim=0, unbiased=True))


def test_outlier_labels_are_ignored_and_batch_order_does_not_matter_without_batchnorm() -> None:
    x, y = torch.randn(12, 2), torch.randint(0, 3, (12,))
    outliers = torch.randn(8, 2) * 3
    trained = []
    for outlier_loader, seed in (
        (DataLoader(outliers, batch_size=4), 0),
        (DataLoader(TensorDataset(outliers, torch.randint(0, 50, (8,))), batch_size=4), 0),
        (DataLoader(outliers, batch_size=4), 123),  # another order of the mixed batch
    ):
        model = _mlp()
        torch.manual_seed(0)
        train_classifier(
            model,
            DataLoader(TensorDataset(x, y), batch_size=4),
            TrainingConfig(epochs=2),
            outlier_loader=outlier_loader,
            regularizer=EnergyOODRegularizer(head="linear"),
            seed=seed,
            device="cpu",
            progress=False,
        )
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(trained[0], trained[1])
    torch.testing.assert_close(trained[0], trained[2])


class _Recording(Dataset[Tensor]):
    def __init__(self, data: Tensor) -> None:
        self.data = data
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tensor:
        self.seen.append(index)
        return self.data[index]


def test_outlier_loader_restarts_each_epoch_and_cycles_within_it() -> None:
    x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    outliers = _Recording(torch.randn(4, 2))
    train_classifier(
        _mlp(),
        DataLoader(TensorDataset(x, y), batch_size=2),
        TrainingConfig(epochs=2),
        outlier_loader=DataLoader(outliers, batch_size=2),
        regularizer=EnergyOODRegularizer(),
        device="cpu",
        progress=False,
    )
    # 5 steps per epoch over 2 outlier batches: batches 0, 1, 0, 1, 0, then again from batch 0.
    one_epoch = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert outliers.seen == one_epoch + one_epoch


def test_ood_start_epoch_trains_cross_entropy_alone_first() -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    outliers = _Recording(torch.randn(4, 2))
    result = train_classifier(
        _mlp(),
        DataLoader(TensorDataset(x, y), batch_size=4),
        TrainingConfig(epochs=3, ood_start_epoch=2),
        outlier_loader=DataLoader(outliers, batch_size=4),
        regularizer=EnergyOODRegularizer(),
        device="cpu",
        progress=False,
    )
    assert [r.ood_steps for r in result.history] == [0, 0, 2]
    assert result.history[0].ood_loss is None and result.history[2].ood_loss is not None
    assert outliers.seen == [0, 1, 2, 3, 0, 1, 2, 3]  # outliers are not even loaded before the start
    for record in result.history[:2]:
        assert record.loss == pytest.approx(record.ce_loss, rel=1e-12)


def test_feature_sampler_waits_until_ready_and_feeds_virtual_outliers_through_the_head() -> None:
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    model = _mlp()
    sampler = QueueSampler(size=8, num=4)
    result = train_classifier(
        model,
        DataLoader(TensorDataset(x, y), batch_size=4),
        TrainingConfig(epochs=2),
        regularizer=EnergyOODRegularizer(),
        feature_sampler=sampler,
        feature_extractor=model[:2],
        classifier_head=model[2],
        device="cpu",
        progress=False,
    )
    # Ready after two batches of 4 features: steps 3 and 4 of epoch 1, all of epoch 2.
    assert [r.ood_steps for r in result.history] == [2, 4]
    assert len(sampler.updates) == 8 and all(f.shape == (4, 8) for f, _ in sampler.updates)


# ---- resume, checkpoints, logs ------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


class _NoisyData(Dataset[tuple[Tensor, Tensor]]):
    """Augments with torch, Python and NumPy global randomness, and can fail after a number of reads."""

    def __init__(self, x: Tensor, y: Tensor, fail_after: int | None = None) -> None:
        self.x, self.y = x, y
        self.fail_after = fail_after
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise _Interrupted
        jitter = 0.05 * torch.randn(2) + 0.01 * random.random() + 0.01 * float(np.random.randn())  # noqa: NPY002
        return self.x[index] + jitter, self.y[index]


def _resumable_run(
    output_dir: Path, fail_after: int | None, resume: bool, model_seed: int
) -> tuple[nn.Module, nn.Module, Any]:
    torch.manual_seed(7)
    x, y = torch.randn(24, 2), torch.randint(0, 3, (24,))
    outliers = torch.randn(12, 2) * 3
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=4, weighted=True, num_classes=3)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)  # noqa: NPY002
    result = train_classifier(
        model,
        DataLoader(_NoisyData(x, y, fail_after), batch_size=6, shuffle=True),
        TrainingConfig(epochs=3, lr=0.05),  # shuffled by the global RNG
        outlier_loader=DataLoader(outliers, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)),
        regularizer=regularizer,
        feature_sampler=QueueSampler(size=6, num=3),
        feature_extractor=model[:3],
        classifier_head=model[3],
        output_dir=output_dir,
        resume=resume,
        device="cpu",
        progress=False,
    )
    return model, regularizer, result


def test_resume_after_interruption_is_bit_identical(tmp_path: Path) -> None:
    model_a, reg_a, result_a = _resumable_run(tmp_path / "a", None, resume=False, model_seed=0)
    with pytest.raises(_Interrupted):
        _resumable_run(tmp_path / "b", fail_after=24 + 13, resume=True, model_seed=0)  # fails in epoch 2
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    model_b, reg_b, result_b = _resumable_run(tmp_path / "b", None, resume=True, model_seed=5)

    for (name, a), b in zip(
        [*model_a.state_dict().items(), *reg_a.state_dict().items()],
        [*model_b.state_dict().values(), *reg_b.state_dict().values()],
    ):
        assert torch.equal(a, b), name
    strip = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result_a.history]
    assert strip == [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result_b.history]
    # A different start without resume really does differ (the comparison above can fail).
    model_c, _, _ = _resumable_run(tmp_path / "c", None, resume=False, model_seed=5)
    assert not torch.equal(model_c[0].weight, model_a[0].weight)


def test_checkpoint_and_metrics_log(tmp_path: Path) -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    model = _mlp()
    result = train_classifier(
        model,
        DataLoader(TensorDataset(x, y), batch_size=4),
        TrainingConfig(epochs=2),
        outlier_loader=DataLoader(torch.randn(4, 2)),
        regularizer=EnergyOODRegularizer(),
        output_dir=tmp_path,
        device="cpu",
        progress=False,
    )
    assert result.checkpoint_path == tmp_path / "checkpoint.pt"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # nothing but tensors and containers
    assert state["epoch"] == 2 and state["format"] == "dreamood.training"
    for name, value in model.state_dict().items():
        assert torch.equal(state["model"][name], value)
    for key in ("optimizer", "scheduler", "scaler", "regularizer", "rng", "history", "config"):
        assert key in state
    log = json.loads((tmp_path / "metrics.json").read_text())
    assert log["history"] == [r.to_dict() for r in result.history]
    assert log["config"]["epochs"] == 2 and [r["epoch"] for r in log["history"]] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file


def test_resume_checks_the_run_and_handles_missing_or_finished_checkpoints(tmp_path: Path) -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))

    def run(model: nn.Module, epochs: int) -> Any:
        return train_classifier(
            model,
            DataLoader(TensorDataset(x, y), batch_size=4),
            TrainingConfig(epochs=epochs),
            output_dir=tmp_path,
            resume=True,
            device="cpu",
            progress=False,
        )

    trained = _mlp()
    first = run(trained, epochs=2)  # no checkpoint yet: starts from scratch
    assert [r.epoch for r in first.history] == [1, 2]
    untouched = _mlp(seed=3)
    again = run(untouched, epochs=2)  # finished: loads the weights, trains nothing
    assert again.history == first.history
    assert torch.equal(untouched[0].weight, trained[0].weight)
    with pytest.raises(ValueError, match="written with epochs=2, this run has epochs=5"):
        run(_mlp(), epochs=5)


def test_init_checkpoint_accepts_training_checkpoints_and_prefixed_state_dicts(tmp_path: Path) -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    source = _mlp(seed=4)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "dp.pt")
    train_classifier(
        _mlp(seed=4),
        DataLoader(TensorDataset(x, y)),
        TrainingConfig(epochs=1, lr=1e-9, min_lr=0.0),
        output_dir=tmp_path / "run",
        device="cpu",
        progress=False,
    )
    for path in (tmp_path / "dp.pt", tmp_path / "run" / "checkpoint.pt"):
        model = _mlp(seed=9)
        train_classifier(
            model,
            DataLoader(TensorDataset(x, y)),
            TrainingConfig(epochs=1, lr=1e-9, min_lr=0.0, weight_decay=0.0),
            init_checkpoint=path,
            device="cpu",
            progress=False,
        )
        torch.testing.assert_close(model[0].weight, source[0].weight, rtol=0, atol=1e-6)
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="neither a training checkpoint nor a model state dict"):
        train_classifier(
            _mlp(),
            DataLoader(TensorDataset(x, y)),
            TrainingConfig(epochs=1),
            init_checkpoint=tmp_path / "bad.pt",
            device="cpu",
            progress=False,
        )


# ---- engineering options ----------------------------------------------------------------------------------


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("options", [{"amp": "bf16", "channels_last": True}, {"amp": "fp16"}])
def test_mixed_precision_and_channels_last_track_full_precision(options: dict[str, Any]) -> None:
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    outliers = torch.randn(8, 3, 6, 6)
    losses = []
    for extra in ({}, options):
        result = train_classifier(
            _conv_net(),
            DataLoader(TensorDataset(x, y), batch_size=8),
            TrainingConfig(epochs=2, lr=0.01, **extra),
            outlier_loader=DataLoader(outliers, batch_size=4),
            regularizer=EnergyOODRegularizer(),
            device="cpu",
            progress=False,
        )
        losses.append([r.loss for r in result.history])
    assert all(math.isfinite(v) for v in losses[1])
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


@pytest.mark.slow
def test_compiled_forward_gives_the_eager_result() -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    weights = []
    for compile_ in (False, True):
        model = _mlp()
        train_classifier(
            model,
            DataLoader(TensorDataset(x, y), batch_size=4),
            TrainingConfig(epochs=1, compile=compile_),
            outlier_loader=DataLoader(torch.randn(4, 2)),
            regularizer=EnergyOODRegularizer(head="linear"),
            device="cpu",
            progress=False,
        )
        weights.append(model[0].weight.detach().clone())
    torch.testing.assert_close(weights[1], weights[0])


def test_non_finite_loss_stops_with_epoch_and_step() -> None:
    x, y = torch.randn(12, 2), torch.randint(0, 3, (12,))
    x[9, 1] = float("nan")  # third batch of four
    model = _mlp()
    with pytest.raises(NonFiniteError, match=r"loss is nan at epoch 1/2, step 3/3"):
        train_classifier(
            model,
            DataLoader(TensorDataset(x, y), batch_size=4),
            TrainingConfig(epochs=2, sync_every=1),
            device="cpu",
            progress=False,
        )
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # checked every step: not applied


def test_progress_bar_shows_loss_and_accuracy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: tqdm draws (into a file it draws nothing)
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    train_classifier(
        _mlp(), DataLoader(TensorDataset(x, y), batch_size=4), TrainingConfig(epochs=1), device="cpu", progress=True
    )
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "acc=" in err


# ---- argument checks --------------------------------------------------------------------------------------


def _loader() -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.randn(4, 2), torch.randint(0, 3, (4,))), batch_size=2)


_LOOP_FIELDS = {item.name for item in dataclasses.fields(TrainingConfig)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"outlier_loader": [torch.randn(2, 2)]}, ValueError, "regularizer is None"),
        ({"regularizer": EnergyOODRegularizer()}, ValueError, "regularizer was given without outliers"),
        (
            {"regularizer": EnergyOODRegularizer(), "feature_sampler": FixedSampler(torch.zeros(1, 8))},
            ValueError,
            "feature_sampler needs feature_extractor",
        ),
        ({"feature_extractor": lambda x: x}, ValueError, "must be given together"),
        ({"classifier_head": nn.Linear(8, 3), "feature_extractor": lambda x: x}, ValueError, "not part of model"),
        ({"classifier_head": nn.Linear(8, 3).forward, "feature_extractor": lambda x: x}, ValueError, "not part"),
        ({"feature_sampler": object(), "regularizer": EnergyOODRegularizer()}, TypeError, "feature_sampler must"),
        (
            {"outlier_loader": [torch.randn(2, 2)], "regularizer": EnergyOODRegularizer(), "ood_start_epoch": 1},
            ValueError,
            "ood_start_epoch=1 is not below epochs=1",
        ),
        ({"lr": -1.0}, ValueError, "lr must be a finite number > 0, got -1.0"),
        ({"amp": "fp8"}, ValueError, "amp must be one of 'bf16', 'fp16', got 'fp8'"),
        ({"resume": True}, ValueError, "resume=True needs output_dir"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float 1.5"),
        ({"learning_rate": 0.1}, TypeError, "unexpected keyword argument 'learning_rate'"),
        ({"config": "fast"}, TypeError, "config must be a TrainingConfig, got str"),
        ({"config": {"epochs": 1}}, TypeError, "config must be a TrainingConfig, got dict"),
    ],
)
def test_rejects_arguments_that_do_not_fit(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    loop = {key: value for key, value in kwargs.items() if key in _LOOP_FIELDS}
    arguments = {key: value for key, value in kwargs.items() if key not in _LOOP_FIELDS}
    with pytest.raises(error, match=message):
        config = arguments.pop("config", None) or TrainingConfig(epochs=1, **loop)
        train_classifier(_mlp(), _loader(), config, device="cpu", progress=False, **arguments)


def test_a_replaced_config_overrides_options() -> None:
    config = TrainingConfig(epochs=1, lr=0.5)
    result = train_classifier(_mlp(), _loader(), dataclasses.replace(config, lr=0.25), device="cpu", progress=False)
    # Two steps: the last one runs at the cosine's midpoint of the replaced lr.
    assert result.history[0].lr == pytest.approx(1e-6 + (0.25 - 1e-6) * 0.5, rel=1e-12)
    assert TrainingConfig(epochs=2).to_dict()["nesterov"] is True
    with pytest.raises(TypeError, match="positional"):
        train_classifier(_mlp(), _loader(), config, None)  # type: ignore[misc]


def test_a_run_configuration_trains_with_its_loop_fields_only(tmp_path: Path) -> None:
    run_config = TrainConfig(epochs=1, lr=0.05, beta=0.0, backbone="small", batch_size=2, sync_every=1)
    loop_config = TrainingConfig(**{name: getattr(run_config, name) for name in _LOOP_FIELDS})
    loader = _loader()
    weights, recorded = [], []
    for index, config in enumerate((run_config, loop_config)):
        model = _mlp()
        train_classifier(model, loader, config, seed=3, output_dir=tmp_path / str(index), device="cpu", progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        recorded.append(json.loads((tmp_path / str(index) / "metrics.json").read_text())["config"])
    assert torch.equal(weights[0], weights[1])
    # The checkpoints record the loop's fields and the call's run-time arguments, in this order.
    names = [item.name for item in dataclasses.fields(TrainingConfig)]
    assert list(recorded[0]) == [
        *names,
        "device",
        "seed",
        "output_dir",
        "resume",
        "init_checkpoint",
        "progress",
        "fingerprint",
    ]
    assert recorded[0]["output_dir"] == str(tmp_path / "0") and recorded[0]["seed"] == 3
    assert {**recorded[0], "output_dir": None} == {**recorded[1], "output_dir": None}


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        ([torch.randn(2, 2)], TypeError, r"id_loader must yield \(images, labels\)"),
        ([(torch.randn(2, 2), torch.tensor([0.0, 1.0]))], TypeError, "labels must be a 1-D integer tensor"),
        ([(torch.randn(2, 2), torch.tensor([0, 1, 2]))], ValueError, "2 images but 3 labels"),
        ([(torch.randn(2, 2), torch.tensor([0, 3]))], ValueError, r"labels must lie in \[0, 3\).*from 0 to 3"),
    ],
)
def test_rejects_malformed_batches(batches: list[Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        train_classifier(_mlp(), batches, TrainingConfig(epochs=1), device="cpu", progress=False)


def test_rejects_outlier_images_of_another_shape() -> None:
    with pytest.raises(ValueError, match=r"outlier_loader yielded images of shape \(3,\).*id_loader yields \(2,\)"):
        train_classifier(
            _mlp(),
            _loader(),
            TrainingConfig(epochs=1),
            outlier_loader=[torch.randn(2, 3)],
            regularizer=EnergyOODRegularizer(),
            device="cpu",
            progress=False,
        )


# ---- acceptance: outliers near the class boundary lower FPR95 ------------------------------------------------


def _blobs(seed: int, per_class: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    centres = 3.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.arange(3).repeat_interleave(per_class)
    return centres[labels] + 0.5 * torch.randn(len(labels), 2, generator=generator), labels, centres


def _boundary_outliers(x: Tensor, centres: Tensor, n: int, seed: int) -> Tensor:
    """Points 1.5-3 units (3-6 standard deviations) from random ID samples, away from every class centre."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(x), (n,), generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(n, 2, generator=generator), dim=1)
    points = x[rows] + direction * (1.5 + 1.5 * torch.rand(n, 1, generator=generator))
    return points[torch.cdist(points, centres).min(dim=1).values > 1.5]


def _far_outliers(centres: Tensor, n: int, seed: int) -> Tensor:
    """Held-out outliers of another kind: uniform in [-10, 10]^2, more than 2.5 units from every centre."""
    generator = torch.Generator().manual_seed(seed)
    points = 20 * torch.rand(4 * n, 2, generator=generator) - 10
    return points[torch.cdist(points, centres).min(dim=1).values > 2.5][:n]


def test_boundary_outliers_lower_fpr95_over_three_seeds() -> None:
    rows = []
    for seed in range(3):
        x, y, centres = _blobs(seed)
        x_test, y_test, _ = _blobs(100 + seed)
        train_outliers = _boundary_outliers(x, centres, 600, 200 + seed)
        test_outliers = _far_outliers(centres, 600, 300 + seed)
        fpr = {}
        for with_outliers in (False, True):
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
            extra: dict[str, Any] = {}
            if with_outliers:
                extra = {
                    "outlier_loader": DataLoader(
                        train_outliers, batch_size=60, shuffle=True, generator=torch.Generator().manual_seed(seed)
                    ),
                    "regularizer": EnergyOODRegularizer(head="linear"),
                }
            train_classifier(
                model,
                DataLoader(
                    TensorDataset(x, y), batch_size=60, shuffle=True, generator=torch.Generator().manual_seed(seed)
                ),
                TrainingConfig(epochs=20, lr=0.05, beta=1.0),
                seed=seed,
                device="cpu",
                progress=False,
                **extra,
            )
            report = OODEvaluator(energy_score, model=model, device="cpu", progress=False).evaluate(
                DataLoader(TensorDataset(x_test, y_test), batch_size=200), {"far": DataLoader(test_outliers)}
            )
            with torch.no_grad():
                direct = ood_metrics(energy_score(model(x_test)), energy_score(model(test_outliers)))
            assert report["far"].metrics["fpr95"] == pytest.approx(direct.fpr95)
            assert report.id_accuracy is not None and report.id_accuracy > 0.97
            fpr[with_outliers] = direct.fpr95
        rows.append(fpr)
        print(f"seed {seed}: FPR95 cross-entropy only {fpr[False]:.3f}, with boundary outliers {fpr[True]:.3f}")
    mean_ce = sum(r[False] for r in rows) / 3
    mean_ood = sum(r[True] for r in rows) / 3
    print(f"mean FPR95: cross-entropy only {mean_ce:.3f}, with boundary outliers {mean_ood:.3f}")
    assert all(r[True] < r[False] for r in rows)
    assert mean_ood < mean_ce - 0.3


@pytest.mark.slow
def test_vos_and_npos_feature_samplers_lower_fpr95_after_warm_up() -> None:
    from dreamood.sampling.feature_samplers import NPOSSampler, VOSSampler

    fpr: dict[str, list[float]] = {"ce": [], "vos": [], "npos": []}
    for seed in range(3):
        x, y, centres = _blobs(seed)
        x_test, _, _ = _blobs(100 + seed)
        test_outliers = _far_outliers(centres, 600, 300 + seed)
        for name in fpr:
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
            extra: dict[str, Any] = {}
            config = TrainingConfig(epochs=20, lr=0.05)
            if name != "ce":
                sampler = (
                    VOSSampler(3, queue_size=100, sample_from=1000, select=5)
                    if name == "vos"
                    else NPOSSampler(
                        3, queue_size=100, k=10, num_boundary=20, num_anchors=5, candidates_per_anchor=50, sigma=0.5
                    )
                )
                extra = {
                    "feature_sampler": sampler,
                    "feature_extractor": model[:4],
                    "classifier_head": model[4],
                    "regularizer": EnergyOODRegularizer(head="linear"),
                }
                config = dataclasses.replace(config, ood_start_epoch=5)
            result = train_classifier(
                model,
                DataLoader(
                    TensorDataset(x, y), batch_size=60, shuffle=True, generator=torch.Generator().manual_seed(seed)
                ),
                config,
                device="cpu",
                progress=False,
                **extra,
            )
            if name != "ce":
                assert [r.ood_steps for r in result.history[:5]] == [0] * 5
                assert all(r.ood_steps == r.steps for r in result.history[5:])
            with torch.no_grad():
                fpr[name].append(ood_metrics(energy_score(model(x_test)), energy_score(model(test_outliers))).fpr95)
    means = {name: sum(values) / 3 for name, values in fpr.items()}
    print("FPR95 per seed:", {name: [round(v, 3) for v in values] for name, values in fpr.items()})
    print("mean FPR95:", {name: round(v, 3) for name, v in means.items()})
    assert means["vos"] < means["ce"] and means["npos"] < means["ce"]


def test_resuming_with_a_sampler_without_state_warns(tmp_path: Path) -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    options: dict[str, Any] = {"output_dir": tmp_path, "resume": True, "device": "cpu", "progress": False}
    for attempt in range(2):
        model = _mlp()
        sampler = FixedSampler(torch.zeros(2, 8))  # no state_dict()
        arguments = (model, DataLoader(TensorDataset(x, y), batch_size=4), TrainingConfig(epochs=1))
        parts = {"feature_extractor": model[:2], "classifier_head": model[2], "regularizer": EnergyOODRegularizer()}
        if attempt == 0:
            train_classifier(*arguments, feature_sampler=sampler, **parts, **options)
        else:
            with pytest.warns(UserWarning, match="FixedSampler has no saved state"):
                train_classifier(*arguments, feature_sampler=sampler, **parts, **options)


def test_library_classifier_parts_with_a_vos_sampler_in_bf16_channels_last() -> None:
    from dreamood.models import Classifier, SmallConvNet
    from dreamood.sampling.feature_samplers import VOSSampler

    model = Classifier(SmallConvNet(in_channels=3, feature_dim=8, width=4, seed=0), num_classes=3)
    x, y = torch.randn(24, 3, 8, 8), torch.arange(3).repeat(8)
    result = train_classifier(
        model,
        DataLoader(TensorDataset(x, y), batch_size=6),
        TrainingConfig(epochs=2, ood_start_epoch=1, amp="bf16", channels_last=True),
        regularizer=EnergyOODRegularizer(head="linear", weighted=True, num_classes=3),
        feature_sampler=VOSSampler(3, queue_size=4, sample_from=50, select=2),
        feature_extractor=model.features,
        classifier_head=model.head,
        device="cpu",
        progress=False,
    )
    assert [r.ood_steps for r in result.history] == [0, 4]
    assert result.final.ood_loss is not None and math.isfinite(result.final.loss)
