"""Speed of KNN scoring (Sun et al., ICML 2022) with each exact k-NN backend of dreamood.

Default workload: 10,000 query features scored against 50,000 training features of dimension 512 with k = 50
(L2-normalised, as the KNN detector uses them). The time covers ``KNN(...).fit(train).score(queries)``:
normalisation, the exact search and the directly recomputed distances. ``cpu s`` is the CPU time of all
threads of the process; on a machine shared with other jobs, ``cpu s / threads`` estimates the wall time the
run would take alone. Run::

    python benchmarks/bench_knn.py --out benchmarks/results/knn_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from dreamood.detectors import KNN
from dreamood.io import atomic_write


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000, help="number of query features")
    parser.add_argument("--keys", type=int, default=50_000, help="number of training features")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("-k", "--k", type=int, default=50, help="which neighbour")
    parser.add_argument("--backends", nargs="+", default=["torch", "faiss"], choices=["torch", "faiss", "auto"])
    parser.add_argument("--device", default="cpu", help="device of the torch backend (faiss always uses the CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (the best is reported)")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0, help="scratch memory of the torch backend")
    parser.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: all cores)")
    parser.add_argument("--target-s", type=float, default=5.0, help="time to beat, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def _features(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    # Post-ReLU-like features: non-negative, so neighbours are at realistic (not all near-orthogonal) distances.
    return torch.randn(n, dim, generator=generator).relu_()


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table and optionally write JSON; return the results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    generator = torch.Generator().manual_seed(args.seed)
    train = _features(args.keys, args.dim, generator)
    queries = _features(args.queries, args.dim, generator)

    rows: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None
    for backend in args.backends:
        device = "cpu" if backend == "faiss" else args.device
        train_dev, queries_dev = train.to(device), queries.to(device)
        detector = KNN(k=args.k, backend=backend, device=device, memory_budget_mb=args.memory_budget_mb)
        detector.fit(train_dev[: 4 * args.k]).score(queries_dev[:16])  # warm-up: libraries, threads, kernels
        times, cpu_times = [], []
        for _ in range(args.repeats):
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            scores = detector.fit(train_dev).score(queries_dev)
            _synchronize(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        scores = scores.cpu()
        max_difference = 0.0 if reference is None else float((scores - reference).abs().max())
        reference = scores if reference is None else reference
        best = min(times)
        rows.append(
            {
                "backend": backend,
                "device": device,
                "best_s": best,
                "median_s": statistics.median(times),
                "cpu_s_of_best": cpu_times[times.index(best)],
                "queries_per_s": args.queries / best,
                "meets_target": best < args.target_s,
                "max_abs_score_difference_to_first": max_difference,
            }
        )

    header = (
        f"{'backend':<8} {'device':<7} {'best s':>8} {'median s':>9} {'cpu s':>8} {'queries/s':>10} "
        f"{'< target':>9} {'max diff':>9}"
    )
    print(
        f"KNN scoring: {args.queries} queries x {args.keys} keys x {args.dim} dims, k={args.k}, "
        f"{torch.get_num_threads()} threads, target {args.target_s:g} s"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['backend']:<8} {row['device']:<7} {row['best_s']:>8.3f} {row['median_s']:>9.3f} "
            f"{row['cpu_s_of_best']:>8.3f} "
            f"{row['queries_per_s']:>10.0f} {'yes' if row['meets_target'] else 'no':>9} "
            f"{row['max_abs_score_difference_to_first']:>9.1e}"
        )

    results: dict[str, Any] = {
        "benchmark": "knn_scoring",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": {
            "torch": torch.__version__,
            "faiss": _faiss_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "results": rows,
    }
    if args.out:
        with atomic_write(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.out}")
    return results


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return str(faiss.__version__)


if __name__ == "__main__":
    main()
