"""train_classifier's engineering options and label kinds: deferred read-backs (sync_every), cudnn.benchmark,
compile_mode, the weight-decay exemption, target distributions as labels, and label checks on the device."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dreamood.errors import NonFiniteError
from dreamood.training import EnergyOODRegularizer, TrainingConfig, soft_cross_entropy, train_classifier


@pytest.fixture
def _restore_cudnn_benchmark() -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


def _mlp(seed: int = 0, width: int = 8, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, classes))


def _strip(history: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in record.to_dict().items() if k != "seconds"} for record in history]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- sync_every ------------------------------------------------------------------------------------------------


def _full_run(sync_every: int) -> tuple[nn.Module, nn.Module, list[Any]]:
    """Two epochs of 7 steps with generated inliers, outlier images and a BatchNorm network, shuffled loaders."""
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(28, 2, generator=data), torch.randint(0, 3, (28,), generator=data)
    x_syn, y_syn = torch.randn(9, 2, generator=data), torch.randint(0, 3, (9,), generator=data)
    outliers = 3 * torch.randn(12, 2, generator=data)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=5)
    result = train_classifier(
        model,
        DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)),
        TrainingConfig(epochs=2, lr=0.05, sync_every=sync_every),
        outlier_loader=DataLoader(outliers, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(2)),
        synthetic_id_loader=DataLoader(TensorDataset(x_syn, y_syn), batch_size=2),
        regularizer=regularizer,
        seed=3,
        device="cpu",
        progress=False,
    )
    return model, regularizer, result.history


def test_sync_every_gives_bit_identical_weights_and_history() -> None:
    model_1, reg_1, history_1 = _full_run(sync_every=1)
    assert [r.steps for r in history_1] == [7, 7] and all(r.ood_steps == 7 for r in history_1)
    for sync_every in (3, 10):  # 3 does not divide the 7 steps of an epoch; 10 reads once per epoch
        model, reg, history = _full_run(sync_every)
        assert _same_weights(model, model_1) and _same_weights(reg, reg_1), sync_every
        assert _strip(history) == _strip(history_1), sync_every


class _PoisonedBatches:
    """12 batches of 4 per pass; the first input of step ``bad_step`` of pass ``bad_epoch`` is NaN."""

    def __init__(self, bad_epoch: int, bad_step: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(48, 2, generator=generator), torch.randint(0, 3, (48,), generator=generator)
        self.bad = (bad_epoch, bad_step)
        self.passes = 0

    def __len__(self) -> int:
        return 12

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        for step in range(1, 13):
            x = self.x[4 * (step - 1) : 4 * step].clone()
            if (self.passes, step) == self.bad:
                x[0, 0] = float("nan")
            yield x, self.y[4 * (step - 1) : 4 * step]


@pytest.mark.parametrize("bad_step", [5, 11])  # read back at step 10 (in the middle), or at the epoch's end
def test_non_finite_loss_names_the_first_bad_step_at_the_next_read_back(tmp_path: Path, bad_step: int) -> None:
    model = _mlp()
    with pytest.raises(NonFiniteError, match=rf"loss is nan at epoch 2/2, step {bad_step}/12 \(cross-entropy nan"):
        train_classifier(
            model,
            _PoisonedBatches(bad_epoch=2, bad_step=bad_step),
            TrainingConfig(epochs=2, sync_every=10),
            output_dir=tmp_path,
            device="cpu",
            progress=False,
        )
    # The bad step was applied before the read-back; the checkpoint on disk is epoch 1's, and finite.
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    assert [r["epoch"] for r in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [1]


def test_progress_bar_moves_at_read_backs(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, Any]] = []

    class Bar:
        def __init__(self, total: int, desc: str, leave: bool, disable: bool | None) -> None:
            assert disable is None  # tqdm's own switch: no bar when stderr is not a terminal
            events.append(("total", total))

        def set_postfix(self, refresh: bool, **values: str) -> None:
            events.append(("postfix", sorted(values)))

        def update(self, n: int = 1) -> None:
            events.append(("update", n))

        def close(self) -> None:
            events.append(("close", None))

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    x, y = torch.randn(20, 2), torch.randint(0, 3, (20,))
    train_classifier(
        _mlp(),
        DataLoader(TensorDataset(x, y), batch_size=4),
        TrainingConfig(epochs=1, sync_every=2),
        device="cpu",
        progress=True,
    )
    updates = [n for kind, n in events if kind == "update"]
    assert events[0] == ("total", 5) and updates == [2, 2, 1] and events[-1] == ("close", None)
    assert ("postfix", ["acc", "loss"]) in events


# ---- config fields ---------------------------------------------------------------------------------------------


def test_new_config_fields_are_validated_and_recorded() -> None:
    with pytest.raises(ValueError, match="compile_mode='max-autotune' needs compile=True"):
        TrainingConfig(epochs=1, compile_mode="max-autotune")
    with pytest.raises(ValueError, match="compile_mode must be one of 'default', 'reduce-overhead'.*got 'fast'"):
        TrainingConfig(epochs=1, compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="sync_every must be > 0, got 0"):
        TrainingConfig(epochs=1, sync_every=0)
    with pytest.raises(TypeError, match="sync_every must be an int"):
        TrainingConfig(epochs=1, sync_every=2.0)  # type: ignore[arg-type]
    config = TrainingConfig(epochs=1, compile=True, compile_mode="reduce-overhead", cudnn_benchmark=True)
    data = config.to_dict()
    assert (data["compile_mode"], data["cudnn_benchmark"], data["sync_every"]) == ("reduce-overhead", True, 10)
    assert TrainingConfig(epochs=1).compile_mode is None


def test_compile_mode_is_passed_to_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_compile(module: nn.Module, **kwargs: Any) -> nn.Module:
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    for mode in (None, "max-autotune-no-cudagraphs"):
        train_classifier(
            _mlp(),
            DataLoader(TensorDataset(x, y)),
            TrainingConfig(epochs=1, compile=True, compile_mode=mode),
            device="cpu",
            progress=False,
        )
    assert calls == [{"mode": None}, {"mode": "max-autotune-no-cudagraphs"}]


class _FlagRecorder(nn.Module):
    """A linear classifier that records torch.backends.cudnn.benchmark at every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(torch.backends.cudnn.benchmark)
        return self.linear(x)


@pytest.mark.usefixtures("_restore_cudnn_benchmark")
def test_cudnn_benchmark_is_set_while_training_and_restored_after_success_and_error() -> None:
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    options: dict[str, Any] = {"device": "cpu", "progress": False}
    on, off = TrainingConfig(epochs=1, cudnn_benchmark=True), TrainingConfig(epochs=1, cudnn_benchmark=False)
    torch.backends.cudnn.benchmark = False
    model = _FlagRecorder()
    train_classifier(model, DataLoader(TensorDataset(x, y), batch_size=4), on, **options)
    assert model.seen == [True, True] and torch.backends.cudnn.benchmark is False

    bad = x.clone()
    bad[5, 0] = float("nan")
    model = _FlagRecorder()
    with pytest.raises(NonFiniteError):
        train_classifier(model, DataLoader(TensorDataset(bad, y), batch_size=4), on, **options)
    assert model.seen == [True, True] and torch.backends.cudnn.benchmark is False
    with pytest.raises(ValueError, match="id_loader is empty"):  # an error before the first step
        train_classifier(_FlagRecorder(), [], on, **options)
    assert torch.backends.cudnn.benchmark is False

    torch.backends.cudnn.benchmark = True  # False leaves a setting made elsewhere alone
    model = _FlagRecorder()
    train_classifier(model, DataLoader(TensorDataset(x, y), batch_size=4), off, **options)
    assert model.seen == [True, True] and torch.backends.cudnn.benchmark is True


# ---- no_weight_decay -------------------------------------------------------------------------------------------


def test_no_weight_decay_parameters_follow_sgd_without_decay() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    lr, min_lr, wd, momentum, steps = 0.1, 0.01, 0.2, 0.9, 3
    start = _mlp(seed=1)

    def train(exempt: bool) -> nn.Sequential:
        model = copy.deepcopy(start)
        train_classifier(
            model,
            DataLoader(TensorDataset(x, y), batch_size=4),
            TrainingConfig(epochs=1, lr=lr, min_lr=min_lr, weight_decay=wd, momentum=momentum),
            no_weight_decay=model[2].parameters() if exempt else (),
            device="cpu",
            progress=False,
        )
        return model

    # Reference: torch.optim.SGD with two parameter groups and the per-step cosine written out.
    reference = copy.deepcopy(start)
    optimizer = torch.optim.SGD(
        [{"params": reference[0].parameters()}, {"params": reference[2].parameters(), "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        nesterov=True,
        weight_decay=wd,
    )
    for t in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / steps))
        loss = nn.functional.cross_entropy(reference(x[4 * t : 4 * t + 4]), y[4 * t : 4 * t + 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    exempted, decayed = train(exempt=True), train(exempt=False)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(exempted.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.allclose(decayed[2].weight, reference[2].weight, rtol=1e-4, atol=1e-5)  # the exemption matters


def test_no_weight_decay_rejects_foreign_parameters() -> None:
    options: dict[str, Any] = {"device": "cpu", "progress": False}
    loader = DataLoader(TensorDataset(torch.randn(4, 2), torch.randint(0, 3, (4,))))
    config = TrainingConfig(epochs=1)
    with pytest.raises(ValueError, match=r"no_weight_decay holds 1 parameter\(s\) that are not parameters of model"):
        train_classifier(_mlp(), loader, config, no_weight_decay=[nn.Parameter(torch.zeros(3))], **options)
    with pytest.raises(TypeError, match="no_weight_decay must hold nn.Parameter objects, got a Tensor"):
        train_classifier(_mlp(), loader, config, no_weight_decay=[torch.zeros(3)], **options)
    with pytest.raises(TypeError, match="no_weight_decay must be an iterable of parameters"):
        train_classifier(_mlp(), loader, config, no_weight_decay=nn.Parameter(torch.zeros(3)), **options)


# ---- target distributions -------------------------------------------------------------------------------------


def _labelled_run(
    id_targets: Tensor,
    syn_targets: Tensor,
    x: Tensor,
    x_syn: Tensor,
    batch_sizes: tuple[int, int] = (4, 3),
    **options: Any,
) -> tuple[nn.Module, Any]:
    """Train on ID and extra labelled batches; ``options`` are TrainingConfig fields (2 epochs at lr 0.1 else)."""
    model = _mlp(seed=2)
    result = train_classifier(
        model,
        DataLoader(TensorDataset(x, id_targets), batch_size=batch_sizes[0]),
        TrainingConfig(**{"epochs": 2, "lr": 0.1, **options}),
        synthetic_id_loader=DataLoader(TensorDataset(x_syn, syn_targets), batch_size=batch_sizes[1]),
        device="cpu",
        progress=False,
    )
    return model, result


def test_one_hot_distributions_train_like_integer_labels() -> None:
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 2, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    x_syn, y_syn = torch.randn(6, 2, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    one_hot = torch.eye(3)
    hard_model, hard = _labelled_run(y, y_syn, x, x_syn)
    for id_targets, syn_targets in ((one_hot[y], one_hot[y_syn]), (y, one_hot[y_syn]), (one_hot[y], y_syn)):
        model, result = _labelled_run(id_targets, syn_targets, x, x_syn)
        for a, b in zip(model.parameters(), hard_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for got, expected in zip(result.history, hard.history):
            assert got.accuracy == expected.accuracy
            assert got.loss == pytest.approx(expected.loss, rel=1e-6)


def test_a_step_on_target_distributions_matches_float64() -> None:
    generator = torch.Generator().manual_seed(5)
    x, x_syn = torch.randn(6, 2, generator=generator), torch.randn(3, 2, generator=generator)
    id_targets = torch.softmax(2 * torch.randn(6, 3, generator=generator), dim=1)
    y_syn = torch.tensor([2, 0, 1])
    start = _mlp(seed=2).double()
    lr = 0.2
    model, result = _labelled_run(
        id_targets,
        y_syn,
        x,
        x_syn,
        batch_sizes=(6, 3),
        epochs=1,
        lr=lr,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
    )
    # Reference: mean over the 9 labelled rows of -sum_c t_c log softmax, integer labels as one-hot rows.
    logits = start(torch.cat([x, x_syn]).double())
    targets = torch.cat([id_targets.double(), torch.eye(3, dtype=torch.float64)[y_syn]])
    loss = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    grads = torch.autograd.grad(loss, list(start.parameters()))
    assert result.final.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.final.ce_loss == pytest.approx(loss.item(), rel=1e-5)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(loss.item(), rel=1e-12)
    accuracy = (logits[:6].argmax(dim=1) == id_targets.argmax(dim=1)).double().mean().item()
    assert result.final.accuracy == pytest.approx(accuracy)
    for after, before, grad in zip(model.parameters(), start.parameters(), grads):
        torch.testing.assert_close(after.detach().double(), before.detach() - lr * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("id_targets", "syn_targets", "error", "message"),
    [
        (torch.full((4, 3), 2 / 3), None, ValueError, r"rows summing to 1, got 4 other row\(s\) \(epoch 1, step 1\)"),
        (torch.full((4, 4), 0.25), None, ValueError, "the target distributions have 4 columns, but the model has 3"),
        (torch.full((4, 3), 1 / 3), torch.tensor([0, 3]), ValueError, r"labels must lie in \[0, 3\) for a model"),
        (torch.full((4, 3), 1 / 3), torch.full((2, 4), 0.25), ValueError, "id_loader: 3, synthetic_id_loader: 4"),
        (torch.zeros(4, 3, dtype=torch.long), None, TypeError, r"labels must be a 1-D integer tensor or \(N, C\)"),
    ],
)
def test_rejects_target_distributions_that_do_not_fit(
    id_targets: Tensor, syn_targets: Tensor | None, error: type[Exception], message: str
) -> None:
    synthetic = None if syn_targets is None else [(torch.randn(len(syn_targets), 2), syn_targets)]
    with pytest.raises(error, match=message):
        train_classifier(
            _mlp(),
            [(torch.randn(4, 2), id_targets)],
            TrainingConfig(epochs=1),
            synthetic_id_loader=synthetic,
            device="cpu",
            progress=False,
        )


def test_feature_sampler_refuses_target_distributions() -> None:
    class Sampler:
        ready = False

        def update(self, features: Tensor, labels: Tensor) -> None:
            pass

        def sample(self, generator: torch.Generator | None = None) -> Tensor:
            raise AssertionError("not ready")

    model = _mlp()
    with pytest.raises(ValueError, match="feature_sampler needs integer labels"):
        train_classifier(
            model,
            [(torch.randn(4, 2), torch.full((4, 3), 1 / 3))],
            TrainingConfig(epochs=1),
            regularizer=EnergyOODRegularizer(),
            feature_sampler=Sampler(),
            feature_extractor=model[:2],
            classifier_head=model[2],
            device="cpu",
            progress=False,
        )


# ---- label checks, computed where the labels are and reported at the read-back --------------------------------------


def _labels_run(id_targets: Tensor, syn_targets: Tensor, **options: Any) -> tuple[nn.Module, Any]:
    generator = torch.Generator().manual_seed(6)
    x, x_syn = torch.randn(12, 2, generator=generator), torch.randn(6, 2, generator=generator)
    return _labelled_run(id_targets, syn_targets, x, x_syn, **options)


def test_label_values_fail_at_the_read_back_naming_the_step() -> None:
    y = torch.arange(12) % 3
    y[5] = 3  # second batch of four
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from 0 to 3 \(epoch 1, step 2\)"):
        _labels_run(y, torch.zeros(6, dtype=torch.long), sync_every=10)
    y[5] = -1
    with pytest.raises(ValueError, match=r"from -1 to 1 \(epoch 1, step 2\)"):
        _labels_run(y, torch.zeros(6, dtype=torch.long), sync_every=10)
    bad_rows = torch.full((6, 3), 1 / 3)
    bad_rows[4] = torch.tensor([0.5, 0.6, -0.1])  # sums to 1 but has a negative entry; second batch of three
    with pytest.raises(ValueError, match=r"summing to 1, got 1 other row\(s\) \(epoch 1, step 2\)"):
        _labels_run(torch.arange(12) % 3, bad_rows, sync_every=10)
