"""train_classifier under torchrun (2 CPU processes, gloo) equals single-process training on the global batch.

The test launches this file as a torchrun script (``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/test_distributed.py OUT``). The model has no BatchNorm, whose statistics stay per
process, so both runs compute the same loss on the same global batch: each process gets ``BATCH`` of the
``2 * BATCH`` samples of a step, the feature sampler sees the gathered features in global order, and the
virtual outliers are split between the processes.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from dreamood.training import EnergyOODRegularizer, TrainingConfig, train_classifier
from dreamood.training.distributed import DistributedContext, distributed_loader, gather_rows

BATCH = 4  # per process
OUTLIER_BATCH = 2  # per process


class _QueueSampler:
    """Keeps the last ``size`` features; draws ``num`` of them pushed outward (deterministic given the generator)."""

    def __init__(self, size: int = 12, num: int = 4) -> None:
        self.size, self.num = size, num
        self.features: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.features is not None and self.features.shape[0] >= self.size

    def update(self, features: Tensor, labels: Tensor) -> None:
        merged = features if self.features is None else torch.cat([self.features, features])
        self.features = merged[-self.size :]

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        assert self.features is not None
        rows = torch.randint(self.features.shape[0], (self.num,), generator=generator)
        return 1.5 * self.features[rows] + 0.3 * torch.randn(self.num, self.features.shape[1], generator=generator)


def _train(world_size: int, output_dir: Path | None) -> tuple[nn.Module, nn.Module, Any]:
    """The same run for any number of processes: per-process batches shrink as the process count grows."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    outliers = 3 * torch.randn(16, 3, generator=generator)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    regularizer = EnergyOODRegularizer(head="mlp", hidden_dim=6, weighted=True, num_classes=4)
    scale = 2 // world_size
    result = train_classifier(
        model,
        DataLoader(TensorDataset(x, y), batch_size=BATCH * scale),
        TrainingConfig(epochs=2, lr=0.1, beta=1.5),
        outlier_loader=DataLoader(outliers, batch_size=OUTLIER_BATCH * scale),
        regularizer=regularizer,
        feature_sampler=_QueueSampler(),
        feature_extractor=model[:2],
        classifier_head=model[2],
        output_dir=output_dir,
        device="cpu",
        progress=False,
    )
    return model, regularizer, result


def _worker(out: Path) -> None:
    import torch.distributed as dist

    gc.disable()  # so only references, not a collection, decide what is still alive below
    model, regularizer, result = _train(world_size=int(os.environ["WORLD_SIZE"]), output_dir=out / "run")
    rank = dist.get_rank()
    torch.save({"model": model.state_dict(), "regularizer": regularizer.state_dict()}, out / f"weights_rank{rank}.pt")
    summary = {
        "world_size": dist.get_world_size(),
        "checkpoint_path": None if result.checkpoint_path is None else str(result.checkpoint_path),
        "history": [r.to_dict() for r in result.history],
        "live_ddp_wrappers": _live_ddp_wrappers(),
    }
    (out / f"result_rank{rank}.json").write_text(json.dumps(summary))
    # Both ranks reach this point before the group is torn down: a rank that destroys it while its peer
    # is still in a gloo collective can abort the peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_single_process_training(tmp_path: Path) -> None:
    completed = _torchrun(str(tmp_path))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, regularizer, single = _train(world_size=1, output_dir=None)
    finally:
        torch.set_num_threads(threads)
    reference = {**model.state_dict(), **{f"reg.{k}": v for k, v in regularizer.state_dict().items()}}

    for rank in (0, 1):
        saved = torch.load(tmp_path / f"weights_rank{rank}.pt", weights_only=True)
        weights = {**saved["model"], **{f"reg.{k}": v for k, v in saved["regularizer"].items()}}
        assert weights.keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        summary = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        assert summary["world_size"] == 2
        assert summary["live_ddp_wrappers"] == 0  # released when train_classifier returned
        for distributed, local in zip(summary["history"], single.history):
            assert distributed["loss"] == pytest.approx(local.loss, rel=1e-5)
            assert distributed["accuracy"] == local.accuracy
            assert distributed["steps"] == local.steps == 4
            assert distributed["ood_steps"] == local.ood_steps
    assert single.history[0].ood_steps > 0  # the virtual outliers really took part
    # Only rank 0 writes files.
    assert json.loads((tmp_path / "result_rank1.json").read_text())["checkpoint_path"] is None
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "metrics.json"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["world_size"] == 2


# ---- sharding helpers, without a process group ---------------------------------------------------------------


def test_distributed_loader_shards_like_distributed_sampler() -> None:
    dataset = TensorDataset(torch.arange(10))
    shards = []
    for rank in (0, 1):
        loader = distributed_loader(
            DataLoader(dataset, batch_size=2), DistributedContext(rank=rank, world_size=2), seed=0, name="x"
        )
        assert loader.batch_size == 2
        shards.append([int(v) for (batch,) in loader for v in batch])
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]

    shuffled = [
        [
            int(v)
            for (batch,) in distributed_loader(
                DataLoader(dataset, batch_size=5, shuffle=True), DistributedContext(rank, 2), seed=3, name="x"
            )
            for v in batch
        ]
        for rank in (0, 1)
    ]
    assert sorted(shuffled[0] + shuffled[1]) == list(range(10)) and shuffled[0] != [0, 2, 4, 6, 8]


def test_distributed_loader_leaves_single_process_loaders_alone_and_rejects_unshardable_ones() -> None:
    loader = DataLoader(TensorDataset(torch.arange(4)), batch_size=2)
    assert distributed_loader(loader, DistributedContext(), seed=0, name="x") is loader
    weighted = DataLoader(TensorDataset(torch.arange(4)), sampler=WeightedRandomSampler([1.0] * 4, 4))
    with pytest.raises(ValueError, match="outlier_loader uses a WeightedRandomSampler"):
        distributed_loader(weighted, DistributedContext(0, 2), seed=0, name="outlier_loader")
    with pytest.raises(TypeError, match="id_loader must be a torch DataLoader under torchrun, got list"):
        distributed_loader([torch.zeros(2)], DistributedContext(0, 2), seed=0, name="id_loader")


def test_gather_rows_is_identity_in_a_single_process() -> None:
    rows = torch.randn(3, 2)
    assert gather_rows(rows, DistributedContext()) is rows


def _bad_label_worker(out: Path) -> None:
    """Train where one sample (so one process's shard) has a label out of range; record what each rank raised."""
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    y[13] = 7
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    gc.disable()
    try:
        loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
        train_classifier(model, loader, TrainingConfig(epochs=1, sync_every=3), device="cpu", progress=False)
        message = "no error"
    except ValueError as error:
        message = str(error)
    message += f"\nlive DDP wrappers: {_live_ddp_wrappers()}"
    (out / f"error_rank{dist.get_rank()}.txt").write_text(message)
    dist.barrier()
    dist.destroy_process_group()


def _live_ddp_wrappers() -> int:
    """How many DistributedDataParallel wrappers are alive (without collecting garbage first)."""
    from torch.nn.parallel import DistributedDataParallel

    return sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())


def _torchrun(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *arguments], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_bad_label_on_one_process_stops_every_process_at_the_same_step(tmp_path: Path) -> None:
    completed = _torchrun(str(tmp_path), "bad-label")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    messages = sorted((tmp_path / f"error_rank{rank}.txt").read_text() for rank in (0, 1))
    # The wrappers are released on error too, not left to the garbage collector (or to interpreter exit).
    assert all(message.endswith("\nlive DDP wrappers: 0") for message in messages), messages
    # Sample 13 is in the second global batch of eight (step 2), on one process only.
    assert messages[0].startswith("another process found labels out of range") and "(epoch 1, step 2)" in messages[0]
    assert messages[1].startswith("labels must lie in [0, 4)") and "to 7 (epoch 1, step 2)" in messages[1]


if __name__ == "__main__":
    if sys.argv[2:] == ["bad-label"]:
        _bad_label_worker(Path(sys.argv[1]))
    else:
        _worker(Path(sys.argv[1]))
