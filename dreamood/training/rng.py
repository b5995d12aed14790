"""Seeding, capturing and restoring every random state a training run consumes, in a ``weights_only``-loadable form.

A resumed run must draw exactly the numbers the uninterrupted run would have drawn: torch's CPU and CUDA
generators (dropout, a loader's shuffling when it has no generator of its own), Python's and NumPy's global
generators (data augmentation), and any explicit ``torch.Generator`` (a loader's, its sampler's, the loop's
own). Everything is stored as tensors, ints, floats and lists, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["capture_rng_state", "loader_generators", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU) with ``seed``.

    User code such as random image augmentations draws from these generators, so a training run seeds them
    all; the NumPy seed is ``seed`` modulo ``2**32``.

    Args:
        seed: Any integer.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global state is what user code draws from)
    torch.manual_seed(seed)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """Return the distinct ``torch.Generator`` objects a DataLoader draws from (its own and its sampler's).

    Args:
        loader: Any iterable; only the ``generator`` attributes of it and of its ``sampler`` are looked at.

    Returns:
        The generators, without duplicates, in a fixed order.
    """
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def capture_rng_state(generators: Mapping[str, list[torch.Generator]], *, global_state: bool = True) -> dict[str, Any]:
    """Snapshot the global random states and the given generators.

    Args:
        generators: Named groups of explicit generators (for example each loader's).
        global_state: Also capture the global generators (torch CPU and CUDA, Python, NumPy); ``False`` for a
            run that draws only from explicit generators and must leave the global ones alone.

    Returns:
        A dict of tensors and plain values that :func:`restore_rng_state` accepts.
    """
    import numpy as np

    explicit = {name: [g.get_state() for g in group] for name, group in generators.items()}
    if not global_state:
        return {"generators": explicit}
    version, mt_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()  # noqa: NPY002 (the legacy global state is what user code draws from)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "generators": explicit,
    }


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, list[torch.Generator]], *, global_state: bool = True
) -> list[str]:
    """Put back the random states captured by :func:`capture_rng_state`.

    Args:
        state: A dict from :func:`capture_rng_state`.
        generators: The same named groups of generators, in the same order, as at capture time.
        global_state: Also restore the global generators; give the value given to :func:`capture_rng_state`.

    Returns:
        Descriptions of the states that could not be restored (a CUDA state on a machine with a different
        number of GPUs, a generator group whose size changed), empty when everything was restored.

    Raises:
        KeyError: ``global_state`` is true but ``state`` holds no global states.
    """
    problems = _restore_global_state(state) if global_state else []
    saved_groups = state["generators"]
    for name, group in generators.items():
        saved = saved_groups.get(name)
        if saved is None or len(saved) != len(group):
            problems.append(f"generators of {name}")
            continue
        for generator, generator_state in zip(group, saved):
            generator.set_state(generator_state)
    return problems


def _restore_global_state(state: Mapping[str, Any]) -> list[str]:
    import numpy as np

    problems: list[str] = []
    torch.set_rng_state(state["torch"])
    cuda_states = list(state["cuda"])
    if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    elif cuda_states or torch.cuda.is_available():
        problems.append(f"CUDA generators ({len(cuda_states)} saved, {torch.cuda.device_count()} present)")
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    return problems
