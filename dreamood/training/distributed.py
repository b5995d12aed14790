"""Running the training loop under ``torchrun``: process group, sharded loaders, collective helpers.

Under ``torchrun --nproc_per_node=N`` every process runs the same script. :func:`setup_distributed` joins the
process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or
uses the one the script already initialised. Each loader's ``batch_size`` is the per-process batch, so the
global batch of a step is ``N * batch_size`` samples: rank ``r`` gets rows ``r, r + N, r + 2N, ...`` of the
global order (this is how ``DistributedSampler`` shards), and :func:`gather_rows` puts gathered rows back in
that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from dreamood._utils import DeviceLike, resolve_device

__all__ = ["DistributedContext", "distributed_loader", "gather_rows", "setup_distributed"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: Global rank of this process.
        world_size: Number of processes.
        local_rank: Rank of this process on its machine (selects its GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the one that writes files and shows progress."""
        return self.rank == 0


def setup_distributed(device: DeviceLike = None) -> tuple[DistributedContext, torch.device]:
    """Join the process group described by ``torchrun``'s environment and pick this process's device.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) and without an initialised process group, this is a
    single-process run. A process group initialised here uses NCCL on GPUs and gloo on CPUs; it is left open
    for the caller (destroy it with ``torch.distributed.destroy_process_group()``).

    Args:
        device: The requested device; ``None``, ``"auto"`` and ``"cuda"`` become ``cuda:LOCAL_RANK`` in a
            multi-process run on GPUs.

    Returns:
        The context and the device this process trains on.
    """
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    initialised = dist.is_available() and dist.is_initialized()
    if (initialised or env_world > 1) and target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not initialised and env_world > 1:
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
        initialised = True
    if not initialised:
        return DistributedContext(), target
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank), target


def distributed_loader(loader: Any, context: DistributedContext, *, seed: int, name: str) -> Any:
    """Return ``loader`` rebuilt with a ``DistributedSampler`` that gives this process its shard.

    A loader that already uses a ``DistributedSampler`` is returned unchanged, and so is every loader in a
    single-process run. A shuffling loader (``RandomSampler``) gets a shuffling sampler seeded with ``seed``;
    a sequential one keeps the dataset order. The batch size, workers, collate function and the other loader
    options are kept.

    Args:
        loader: A ``torch.utils.data.DataLoader``.
        context: This process's place in the run.
        seed: Seed of the shuffling, the same on every process.
        name: The argument's name, for error messages.

    Returns:
        The sharded loader.

    Raises:
        TypeError: ``loader`` is not a DataLoader (in a multi-process run).
        ValueError: The loader cannot be sharded: an iterable dataset, a custom batch sampler, or a sampler
            other than random (without replacement) or sequential.
    """
    if not context.is_distributed:
        return loader
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{name} must be a torch DataLoader under torchrun, got {type(loader).__name__}")
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"{name} iterates an IterableDataset, which cannot be sharded by a DistributedSampler")
    if loader.batch_size is None:
        raise ValueError(f"{name} uses a custom batch_sampler; give it a DistributedSampler-based one yourself")
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.num_samples != len(sampler.data_source):  # type: ignore[arg-type]
            raise ValueError(f"{name} samples with replacement or a subset; build it with a DistributedSampler")
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError(
            f"{name} uses a {type(sampler).__name__}, which cannot be sharded automatically; "
            "build the loader with a DistributedSampler (or a sampler that shards by rank) yourself"
        )
    shard: DistributedSampler[Any] = DistributedSampler(
        loader.dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle, seed=seed
    )
    options: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "sampler": shard,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        options.update(
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )
    return DataLoader(loader.dataset, **options)


def gather_rows(tensor: Tensor, context: DistributedContext) -> Tensor:
    """Gather a ``(b, ...)`` tensor from every process, in the global order that ``DistributedSampler`` shards.

    Row ``j`` of rank ``r`` becomes row ``j * world_size + r``, so the result is the batch a single process
    would have seen. Every process must pass the same shape.

    Args:
        tensor: This process's rows.
        context: This process's place in the run.

    Returns:
        The ``(world_size * b, ...)`` tensor (``tensor`` itself in a single-process run).

    Raises:
        ValueError: The processes passed different shapes (raised on every process).
    """
    if not context.is_distributed:
        return tensor
    import torch.distributed as dist

    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(context.world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(other, shape) for other in shapes):
        raise ValueError(f"processes hold batches of different shapes {[tuple(s.tolist()) for s in shapes]}")
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *tensor.shape[1:])


def all_reduce_sum(tensor: Tensor, context: DistributedContext) -> Tensor:
    """Sum ``tensor`` over every process in place and return it (unchanged in a single-process run)."""
    if context.is_distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Return the list of every process's ``value``, indexed by rank (``[value]`` in a single-process run)."""
    if not context.is_distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values
