"""Images per second of classifier training (DREAM-OOD Phase 3): a plain fp32 loop against dreamood's fast options.

Workload: ResNet-34 with the 3x3 stride-1 stem (the paper's CIFAR-100 backbone), 100 classes, 32x32 inputs,
batches of 512 in-memory tensors already on the device (so data loading is not measured), SGD with Nesterov
momentum 0.9, weight decay 5e-4 and a per-step cosine learning rate, as in the paper. Rows:

* ``plain_fp32``: a hand-written eager PyTorch loop in float32 (forward, cross-entropy, backward, SGD step,
  scheduler step): the baseline. PyTorch's defaults apply, so cuDNN convolutions may use TF32 on the GPU.
* ``plain_fp32_strict``: the same with TF32 switched off for convolutions and matrix products.
* ``loop_fp32``: :func:`dreamood.training.train_classifier` without fast options (the loop's own cost: the
  per-step statistics, read back from the device every ``sync_every=10`` steps, and their checks).
* ``loop_bf16``, ``loop_bf16_channels_last``, ``loop_fast``: the loop with bf16 autocast, then channels-last,
  then ``torch.compile`` (``loop_fast`` = all three).
* ``loop_fast_sync_every_1``: the fast options with the statistics read back after every step
  (``sync_every=1``), which makes the host wait for the device once per step: what ``sync_every`` saves.
* ``loop_fast_cudnn_benchmark``: the fast options with ``cudnn_benchmark=True`` (cuDNN picks its
  convolution algorithms by timing them; off by default).
* ``loop_fast_reduce_overhead``: the fast options with ``compile_mode="reduce-overhead"`` (CUDA graphs).
* ``loop_fast_fp16``: the fast options with fp16 autocast and loss scaling instead of bf16 (the loss scaler
  reads one flag back from the device at every step).
* ``loop_fast_outliers``: a full DREAM-OOD step with the fast options: 256 ID images and 256 outlier images
  per step, cross-entropy plus the energy regulariser (paper Eq. 7, linear head).

Every row trains a freshly initialised model (same seed) for ``--warmup-epochs`` epochs that are not timed
(compilation, cuDNN autotuning) and then ``--epochs`` timed epochs of ``--steps`` steps, with the device
synchronised at both ends of each timed epoch. The JSON file is rewritten after every row. Run::

    python benchmarks/bench_training.py --out benchmarks/results/training_h200.json
    python benchmarks/bench_training.py --tiny --out /tmp/training_tiny.json   # CPU smoke run, seconds

``--tiny`` trains a small CNN on the CPU and compiles with torch.compile's ``eager`` backend (graph capture
without code generation), so the whole script runs in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreamood.io import atomic_write


@dataclass(frozen=True)
class Setup:
    """One configuration to measure."""

    description: str
    loop: str = "dreamood"  # dreamood | plain
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    outliers: bool = False
    strict_fp32: bool = False
    cudnn_benchmark: bool = False
    compile_mode: str | None = None
    sync_every: int | None = None  # None: TrainingConfig's default


SETUPS: dict[str, Setup] = {
    "plain_fp32": Setup("hand-written eager fp32 loop (baseline; PyTorch's TF32 defaults)", loop="plain"),
    "plain_fp32_strict": Setup("hand-written eager fp32 loop, TF32 off", loop="plain", strict_fp32=True),
    "loop_fp32": Setup("train_classifier, no fast options"),
    "loop_bf16": Setup("train_classifier, amp=bf16", amp="bf16"),
    "loop_bf16_channels_last": Setup("+ channels_last", amp="bf16", channels_last=True),
    "loop_fast": Setup("+ compile (bf16, channels_last, compile)", amp="bf16", channels_last=True, compile=True),
    "loop_fast_sync_every_1": Setup(
        "fast options, statistics read back every step (sync_every=1)",
        amp="bf16",
        channels_last=True,
        compile=True,
        sync_every=1,
    ),
    "loop_fast_cudnn_benchmark": Setup(
        "fast options + cudnn_benchmark=True",
        amp="bf16",
        channels_last=True,
        compile=True,
        cudnn_benchmark=True,
    ),
    "loop_fast_reduce_overhead": Setup(
        'fast options + compile_mode="reduce-overhead" (CUDA graphs)',
        amp="bf16",
        channels_last=True,
        compile=True,
        compile_mode="reduce-overhead",
    ),
    "loop_fast_fp16": Setup("fast options with amp=fp16 (loss scaling)", amp="fp16", channels_last=True, compile=True),
    "loop_fast_outliers": Setup(
        "fast options, half ID + half outlier images, energy regulariser",
        amp="bf16",
        channels_last=True,
        compile=True,
        outliers=True,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="rows, in this order")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--arch", choices=("resnet34", "small"), default=None, help="default resnet34 (small --tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 512)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default 50)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs (default 3)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs run before timing")
    parser.add_argument("--distinct-batches", type=int, default=8, help="in-memory batches the epochs cycle through")
    parser.add_argument("--compile-backend", default=None, help="default inductor (eager with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a small network on the CPU: a smoke run in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results to this JSON file (after every row)")
    args = parser.parse_args(argv)
    defaults = {"device": "cuda", "arch": "resnet34", "batch_size": 512, "steps": 50, "epochs": 3}
    defaults["compile_backend"] = "inductor"
    if args.tiny:
        defaults = {"device": "cpu", "arch": "small", "batch_size": 8, "steps": 2, "epochs": 1}
        defaults["compile_backend"] = "eager"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("batch_size", "image_size", "num_classes", "steps", "epochs", "distinct_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_epochs < 0:
        parser.error(f"--warmup-epochs must be non-negative, got {args.warmup_epochs}")
    if args.batch_size % 2:
        parser.error(f"--batch-size must be even (the outlier row splits it in halves), got {args.batch_size}")
    return args


def quiet_logs() -> None:
    """Keep compilation chatter (autotuning, recompilation notes) off stdout: errors only."""
    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR, aot=logging.ERROR)
    with contextlib.suppress(ImportError, AttributeError):
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "autotune_num_choices_displayed"):
            inductor_config.autotune_num_choices_displayed = 0
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._(dynamo|inductor)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def backend_flags(setup: Setup) -> Iterator[None]:
    """The setup's TF32 switches inside the block, PyTorch's defaults restored after it.

    ``cudnn.benchmark`` is the loop's own option (``TrainingConfig.cudnn_benchmark``), which restores it itself.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if setup.strict_fp32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """Make ``torch.compile`` use ``backend`` inside the block.

    ``TrainingConfig(compile=True)`` calls ``torch.compile`` with its default backend, inductor, whose CPU code
    generation takes tens of seconds; smoke runs trace with the ``eager`` backend instead.
    """
    if backend == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


class EpochBatches:
    """An in-memory "loader": ``steps`` batches per pass, cycling through fixed tensors, timing every pass.

    The device is synchronised when a pass starts and when it is exhausted, i.e. after the consumer has queued
    the work of the last batch, so ``seconds[e]`` is the wall time of epoch ``e`` with its work finished.
    """

    def __init__(self, batches: list[tuple[Tensor, Tensor]], steps: int, device: torch.device) -> None:
        self.batches = batches
        self.steps = steps
        self.device = device
        self.seconds: list[float] = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        synchronize(self.device)
        start = time.perf_counter()
        for step in range(self.steps):
            yield self.batches[step % len(self.batches)]
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)


def make_batches(args: argparse.Namespace, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, args.image_size, args.image_size)
    return [
        (
            torch.randn(shape, generator=generator).to(args.device),
            torch.randint(0, args.num_classes, (batch_size,), generator=generator).to(args.device),
        )
        for _ in range(args.distinct_batches)
    ]


def make_model(args: argparse.Namespace) -> nn.Module:
    from dreamood.models import Classifier, SmallConvNet, resnet34

    if args.arch == "resnet34":
        return resnet34(args.num_classes, small_input=True, seed=args.seed)
    return Classifier(SmallConvNet(in_channels=3, feature_dim=64, width=16, seed=args.seed), args.num_classes)


def _cosine(total_steps: int, min_ratio: float) -> Any:
    def factor(step: int) -> float:
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))

    return factor


def run_plain(args: argparse.Namespace, device: torch.device) -> list[float]:
    """The baseline: the plain eager fp32 training loop a user writes by hand; returns the epoch times."""
    model = make_model(args).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    epochs = args.warmup_epochs + args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(epochs * args.steps, 1e-5))
    loader = EpochBatches(make_batches(args, args.batch_size, args.seed), args.steps, device)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return loader.seconds[args.warmup_epochs :]


def run_loop(args: argparse.Namespace, setup: Setup, device: torch.device) -> list[float]:
    """dreamood's training loop with the setup's options; returns the timed epochs' times."""
    from dreamood.training import EnergyOODRegularizer, TrainingConfig, train_classifier

    model = make_model(args)
    config = TrainingConfig(
        epochs=args.warmup_epochs + args.epochs,
        lr=0.1,
        beta=2.5,
        amp=setup.amp,
        channels_last=setup.channels_last,
        compile=setup.compile,
        compile_mode=setup.compile_mode,
        cudnn_benchmark=setup.cudnn_benchmark,
    )
    if setup.sync_every is not None:
        config = replace(config, sync_every=setup.sync_every)
    id_size = args.batch_size // 2 if setup.outliers else args.batch_size
    loader = EpochBatches(make_batches(args, id_size, args.seed), args.steps, device)
    extra: dict[str, Any] = {}
    if setup.outliers:
        outliers = [images for images, _ in make_batches(args, args.batch_size - id_size, args.seed + 1)]
        extra = {"outlier_loader": outliers, "regularizer": EnergyOODRegularizer(head="linear")}
    with compile_backend(args.compile_backend):
        train_classifier(model, loader, config, device=str(device), seed=args.seed, progress=False, **extra)
    return loader.seconds[args.warmup_epochs :]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(args.device) if cuda else "cpu",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected rows, print a table and write JSON after every row; return the results."""
    from dreamood.training import TrainingConfig

    args = parse_args(argv)
    quiet_logs()
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "benchmark": "classifier_training",
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "environment": environment(args),
        "rows": [],
        "summary": {},
    }
    target_ratio = 3.0
    print(
        f"{args.arch}, {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} steps x "
        f"{args.epochs} timed epochs (+{args.warmup_epochs} warm-up); {results['environment']['device_name']}"
    )
    header = f"{'row':<24} {'images/s':>10} {'ms/step':>9} {'spread':>7} {'vs plain':>9}  description"
    print(header + "\n" + "-" * len(header), flush=True)
    baseline: float | None = None
    default_sync_every = TrainingConfig(epochs=1).sync_every
    for name in args.rows:
        setup = SETUPS[name]
        free_memory(device)
        row: dict[str, Any] = {"name": name, **asdict(setup)}
        if setup.loop == "dreamood" and setup.sync_every is None:
            row["sync_every"] = default_sync_every
        try:
            with backend_flags(setup):
                seconds = run_plain(args, device) if setup.loop == "plain" else run_loop(args, setup, device)
            images = args.steps * args.batch_size * len(seconds)
            mean = sum(seconds) / len(seconds)
            row.update(
                {
                    "epoch_seconds": seconds,
                    "images": images,
                    "images_per_s": images / sum(seconds),
                    "ms_per_step": 1e3 * sum(seconds) / (args.steps * len(seconds)),
                    # Largest relative deviation of an epoch from the mean epoch: the timing noise.
                    "spread": max(abs(epoch - mean) for epoch in seconds) / mean,
                }
            )
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if name == "plain_fp32":
                baseline = row["images_per_s"]
            if baseline:
                row["ratio_to_plain"] = row["images_per_s"] / baseline
            ratio = f"{row['ratio_to_plain']:.2f}x" if "ratio_to_plain" in row else ""
            print(
                f"{name:<24} {row['images_per_s']:>10.1f} {row['ms_per_step']:>9.2f} {row['spread']:>7.1%} "
                f"{ratio:>9}  {setup.description}",
                flush=True,
            )
        except Exception as error:  # one failing option must not lose the other rows
            row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
            row["traceback"] = traceback.format_exc()[-3000:]
            print(f"{name:<24} FAILED: {row['error']}", flush=True)
        results["rows"].append(row)
        done = {r["name"]: r for r in results["rows"] if "images_per_s" in r}
        fast = done.get("loop_fast", {}).get("ratio_to_plain")
        results["summary"] = {
            "plain_images_per_s": baseline,
            "loop_fast_images_per_s": done.get("loop_fast", {}).get("images_per_s"),
            "loop_fast_ratio_to_plain": fast,
            "target_ratio": target_ratio,
            "meets_target": None if fast is None else fast >= target_ratio,
        }
        if args.out:
            with atomic_write(args.out, "w") as handle:
                json.dump(results, handle, indent=2)
    free_memory(device)
    fast = results["summary"]["loop_fast_ratio_to_plain"]
    if fast is not None:
        verdict = "met" if fast >= target_ratio else "NOT met"
        print(f"loop_fast: {fast:.2f}x plain_fp32; target >= {target_ratio:g}x {verdict}")
    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
