"""Speed of the k-NN boundary sampler (DREAM-OOD Phase 2) at ImageNet-100 scale, against the plain reference.

Full-size problem (the paper's ImageNet-100 settings): 100 classes x 1,000 L2-normalised bank embeddings x
768 dims, 10,000 outputs per class, k = 300, boundary 200, 50 anchors per round, 1,500 candidates per anchor,
sigma 0.03, keep 2: 100 rounds and 7.5 million candidates per class.

The classes are independent (``scope="class"``), so the benchmark times ``--classes`` classes of the full-size
problem and multiplies the per-class time by ``--total-classes``. The plain per-class, per-round
reimplementation of the reference procedure (``benchmarks/reference_sampler.py``: every candidate
materialised and scored by brute force) is timed on ``--reference-rounds`` rounds of one class and
extrapolated the same way; its samples are compared with the sampler's on those rounds (same random draws).
Wall-clock and CPU times are both recorded: on a shared machine the CPU time is the steadier figure. Both
run on ``--device``; their random numbers come from generators on ``--generator-device`` (by default the same
device: a CPU generator on a GPU run would spend most of the time drawing the noise on the CPU). Run::

    python benchmarks/bench_sampler.py --out benchmarks/results/sampler_cpu.json
    python benchmarks/bench_sampler.py --device cuda --classes 100 --target-s 10 \
        --out benchmarks/results/sampler_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamood.anchors import TokenEmbeddings
from dreamood.feature_bank import FeatureBank
from dreamood.io import atomic_write
from dreamood.sampling.knn_boundary import KNNBoundarySampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_sampler import reference_sample

TOKENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "token_embed_in100.npy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10, help="classes of the full-size problem to time")
    parser.add_argument("--total-classes", type=int, default=100, help="classes of the full problem")
    parser.add_argument("--bank-per-class", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-per-class", type=int, default=10_000)
    parser.add_argument("-k", "--k", type=int, default=300)
    parser.add_argument("--boundary-size", type=int, default=200)
    parser.add_argument("--anchors-per-round", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=1500, help="candidates per anchor")
    parser.add_argument("--keep", type=int, default=2, help="kept candidates per anchor")
    parser.add_argument("--sigma", type=float, default=0.03)
    parser.add_argument("--spread", type=float, default=1.0, help="within-class noise of the synthetic bank")
    parser.add_argument("--reference-rounds", type=int, default=2, help="rounds of one class timed for the reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generator-device", default=None, help="device of the random generators (default: --device)")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--target-s", type=float, default=60.0, help="time to beat for the full problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.generator_device is None:
        args.generator_device = args.device
    return args


def generator_for(args: argparse.Namespace, seed: int) -> torch.Generator:
    """A generator on ``--generator-device`` seeded with ``seed``."""
    return torch.Generator(device=args.generator_device).manual_seed(seed)


def make_problem(args: argparse.Namespace, num_classes: int) -> tuple[FeatureBank, TokenEmbeddings, str]:
    """Synthetic bank clustered around the class tokens (the published ImageNet-100 ones when available)."""
    generator = torch.Generator().manual_seed(args.seed)
    if TOKENS.exists() and args.dim == 768 and num_classes <= 100:
        tokens = torch.from_numpy(np.load(TOKENS))[:num_classes].float()
        source = "token_embed_in100.npy"
    else:
        tokens = torch.randn(num_classes, args.dim, generator=generator) * (0.4 / math.sqrt(args.dim))
        source = "random"
    centres = torch.nn.functional.normalize(tokens, dim=1).repeat_interleave(args.bank_per_class, 0)
    noise = torch.randn(len(centres), args.dim, generator=generator) * (args.spread / math.sqrt(args.dim))
    bank = FeatureBank(
        torch.nn.functional.normalize(centres + noise, dim=1),
        torch.arange(num_classes).repeat_interleave(args.bank_per_class),
    )
    return bank, TokenEmbeddings([f"class{c}" for c in range(num_classes)], tokens), source


def sampler_for(args: argparse.Namespace) -> KNNBoundarySampler:
    return KNNBoundarySampler(
        k=args.k,
        boundary_size=args.boundary_size,
        anchors_per_round=args.anchors_per_round,
        candidates_per_anchor=args.candidates,
        sigma=args.sigma,
        keep_per_anchor=args.keep,
        device=args.device,
        memory_budget_mb=args.memory_budget_mb,
        show_progress=False,
    )


def breakdown(args: argparse.Namespace, bank: FeatureBank) -> dict[str, float]:
    """Wall time of the steps of one class that do not depend on the selection, to show where the time goes."""
    sampler = sampler_for(args)
    rounds = math.ceil(args.num_per_class / (args.anchors_per_round * args.keep))
    members = bank.per_class(0).to(args.device)
    generator = generator_for(args, args.seed)
    start = time.perf_counter()
    sampler.anchor_set(bank, 0)
    _synchronize(args.device)
    anchor_set = time.perf_counter() - start
    start = time.perf_counter()
    noise = [
        torch.randn(args.candidates, args.dim, generator=generator, device=args.generator_device) for _ in range(rounds)
    ]
    _synchronize(args.generator_device)
    draws = time.perf_counter() - start
    start = time.perf_counter()
    for eps in noise:
        torch.mm(eps.to(args.device), members.T)
    _synchronize(args.device)
    products = time.perf_counter() - start
    return {"bank_knn_and_anchor_set_s": anchor_set, "noise_draws_s": draws, "noise_bank_products_s": products}


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table and optionally write JSON; return the results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bank, tokens, token_source = make_problem(args, args.classes)
    per_round = args.anchors_per_round * args.keep
    rounds = math.ceil(args.num_per_class / per_round)

    # Warm-up (libraries, threads) on a small problem.
    sampler_for(args).sample(bank, tokens, per_round, generator=generator_for(args, 1))

    _synchronize(args.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    samples = sampler_for(args).sample(bank, tokens, args.num_per_class, generator=generator_for(args, 2))
    _synchronize(args.device)
    ours_wall, ours_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(samples) == args.classes * args.num_per_class
    ours_per_class = ours_wall / args.classes
    steps = breakdown(args, bank)

    # Reference: a few rounds of class 0, and the same rounds from the sampler on that class alone.
    first = bank.indices_of(0)
    single = FeatureBank(bank.embeddings[first], torch.zeros(len(first), dtype=torch.long))
    single_tokens = TokenEmbeddings(["class0"], tokens.vectors[:1])
    count = args.reference_rounds * per_round
    reference = reference_sample(
        single.embeddings.to(args.device),
        single.labels.to(args.device),
        single_tokens.norms.to(args.device),
        count,
        k=args.k,
        boundary_size=args.boundary_size,
        anchors_per_round=args.anchors_per_round,
        candidates_per_anchor=args.candidates,
        sigma=args.sigma,
        keep_per_anchor=args.keep,
        generator=generator_for(args, 3),
    )
    reference_round_s = sum(reference["round_seconds"]) / len(reference["round_seconds"])
    reference_per_class = reference["boundary_seconds"][0] + rounds * reference_round_s
    reference_round_cpu = sum(reference["round_cpu_seconds"]) / len(reference["round_cpu_seconds"])
    reference_per_class_cpu = reference["boundary_cpu_seconds"][0] + rounds * reference_round_cpu
    same_rounds = generator_for(args, 3)
    ours_same_rounds = sampler_for(args).sample(single, single_tokens, count, generator=same_rounds)
    same_anchors = bool(torch.equal(ours_same_rounds.anchor_index.cpu(), reference["anchor_index"].cpu()))
    max_vector_difference = float((ours_same_rounds.vectors.cpu() - reference["vectors"].cpu()).abs().max())
    load_after = os.getloadavg()

    full_ours = ours_per_class * args.total_classes
    full_reference = reference_per_class * args.total_classes
    result = {
        "ours_timed_classes": args.classes,
        "ours_wall_s": ours_wall,
        "ours_cpu_s": ours_cpu,
        "ours_per_class_wall_s": ours_per_class,
        "ours_per_class_cpu_s": ours_cpu / args.classes,
        "ours_full_problem_wall_s_extrapolated": full_ours,
        "ours_full_problem_cpu_s_extrapolated": ours_cpu / args.classes * args.total_classes,
        "meets_target": full_ours < args.target_s,
        "one_class_steps_wall_s": steps,
        "reference_timed_rounds": args.reference_rounds,
        "reference_round_wall_s": reference_round_s,
        "reference_boundary_wall_s": reference["boundary_seconds"][0],
        "reference_round_cpu_s": reference_round_cpu,
        "reference_per_class_wall_s_extrapolated": reference_per_class,
        "reference_per_class_cpu_s_extrapolated": reference_per_class_cpu,
        "reference_full_problem_wall_s_extrapolated": full_reference,
        "speed_ratio_reference_over_ours": reference_per_class / ours_per_class,
        "speed_ratio_reference_over_ours_cpu_time": reference_per_class_cpu / (ours_cpu / args.classes),
        "check_same_anchors_as_reference": same_anchors,
        "check_max_abs_vector_difference_to_reference": max_vector_difference,
    }

    print(
        f"KNNBoundarySampler, {args.total_classes} classes x {args.bank_per_class} x {args.dim}, "
        f"{args.num_per_class} per class, {args.candidates} candidates/anchor, k={args.k}; device {args.device}, "
        f"{torch.get_num_threads()} threads, load average {load_before[0]:.1f} -> {load_after[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    header = f"{'':<38} {'per class s':>12} {f'{args.total_classes} classes s':>14} {'how':>36}"
    print(header)
    print("-" * len(header))
    print(
        f"{'KNNBoundarySampler (wall)':<38} {ours_per_class:>12.2f} {full_ours:>14.1f} "
        f"{f'timed {args.classes} classes':>36}"
    )
    print(
        f"{'KNNBoundarySampler (CPU time)':<38} {ours_cpu / args.classes:>12.2f} "
        f"{ours_cpu / args.classes * args.total_classes:>14.1f} {'process CPU seconds, all threads':>36}"
    )
    print(
        f"{'reference reimplementation (wall)':<38} {reference_per_class:>12.2f} {full_reference:>14.1f} "
        f"{f'timed {args.reference_rounds} of {rounds} rounds':>36}"
    )
    print(
        f"{'reference reimplementation (CPU time)':<38} {reference_per_class_cpu:>12.2f} "
        f"{reference_per_class_cpu * args.total_classes:>14.1f} {'process CPU seconds, all threads':>36}"
    )
    print(
        f"speed ratio (reference / ours): {result['speed_ratio_reference_over_ours']:.1f}x wall, "
        f"{result['speed_ratio_reference_over_ours_cpu_time']:.1f}x CPU time"
    )
    print(f"target {args.target_s:g} s for the full problem: {'met' if result['meets_target'] else 'NOT met'}")
    print("one class, wall s: " + ", ".join(f"{name} {value:.2f}" for name, value in steps.items()))
    print(f"same anchors as the reference: {same_anchors}; max |vector difference| {max_vector_difference:.1e}")

    results: dict[str, Any] = {
        "benchmark": "knn_boundary_sampler",
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "token_source": token_source,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_before_after": [load_before[0], load_after[0]],
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "results": result,
    }
    if args.out:
        with atomic_write(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
