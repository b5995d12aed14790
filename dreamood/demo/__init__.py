"""``dreamood demo``: the whole DREAM-OOD pipeline, offline, on real images bundled with scikit-learn/-image.

ID data are scikit-learn's 8x8 handwritten digits; near-OOD are the digits left out of the ID classes; far-OOD
are crops of real photographs (textures, faces, photos) in a raw and an intensity-matched version. Every stage
of DREAM-OOD (Du et al., NeurIPS 2023) runs from the library's public API, with a small diffusion model trained
on the digits in place of Stable Diffusion, next to the paper's baselines: VOS, NPOS, GODIN, GAN-based outliers
and post-hoc detectors for OOD detection, and for DREAM-ID's generalisation RandAugment, AutoAugment, AugMix,
CutMix and MEMO on a rotated copy of the test digits. The run writes ``report.md``, ``report.html``,
``metrics.json``, PNG figures and every stage's artefacts, and prints the summary tables.

Use it from the command line (``dreamood demo --help``) or from Python::

    from dreamood.demo import main
    main(["--out", "demo-run", "--seeds", "3"])

This module imports only :mod:`argparse` until a run starts, so building the command line stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dreamood.demo.config import DemoConfig

if TYPE_CHECKING:
    from dreamood.demo.pipeline import DemoResult

__all__ = ["DemoConfig", "add_arguments", "config_from_args", "main", "run", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dreamood demo`` to ``parser`` (used by ``dreamood demo`` and :func:`main`).

    Args:
        parser: The parser (or sub-command parser) to extend.
    """
    defaults = DemoConfig()
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: a fresh ./dreamood-demo-<timestamp>)",
    )
    parser.add_argument(
        "--id-classes",
        default=",".join(str(d) for d in defaults.id_classes),
        metavar="DIGITS",
        help="in-distribution digits, e.g. '0,1,2,3,4,5' or '4-9'; the others are near-OOD (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=defaults.seeds,
        metavar="N",
        help="repeat Phases 1-3 with N seeds and report mean ± std (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="first seed (default: %(default)s)")
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="'auto' (a GPU when present), 'cpu', 'cuda', 'cuda:1', ... (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch during the run (default: torch's setting)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where trained decoders are cached (default: $DREAMOOD_CACHE or ~/.cache/dreamood)",
    )
    parser.add_argument("--no-cache", action="store_true", help="retrain the decoder; neither read nor write the cache")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (the stage headers are still logged)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny networks and few images: checks the whole pipeline in seconds (numbers are meaningless)",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Build the :class:`DemoConfig` of parsed ``dreamood demo`` arguments.

    Args:
        args: Arguments parsed by a parser extended with :func:`add_arguments`.

    Returns:
        The configuration.

    Raises:
        ValueError: ``--id-classes``, ``--seeds`` or ``--threads`` is invalid.
    """
    from dreamood.demo.data import parse_id_classes

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    options = {
        "id_classes": parse_id_classes(args.id_classes),
        "seeds": args.seeds,
        "seed": args.seed,
        "out_dir": args.out,
        "device": args.device,
        "threads": args.threads,
        "cache_dir": args.cache_dir,
        "use_cache": not args.no_cache,
        "progress": not args.no_progress,
    }
    return DemoConfig.quick_config(**options) if args.quick else DemoConfig(**options)


def run(config: DemoConfig) -> DemoResult:
    """Run the demo with ``config`` (see :func:`dreamood.demo.pipeline.run_demo`).

    Args:
        config: What to run.

    Returns:
        The output folder, the metrics and the report paths.
    """
    from dreamood.demo.pipeline import run_demo

    return run_demo(config)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; the entry point of the ``dreamood demo`` sub-command.

    Args:
        args: Arguments parsed by a parser extended with :func:`add_arguments`.

    Returns:
        The exit status: 0 on success, 2 for an invalid option (the message is printed).
    """
    import sys

    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"dreamood demo: error: {error}", file=sys.stderr)
        return 2
    with _logging_to_stderr():
        run(config)
    return 0


def _logging_to_stderr() -> contextlib.AbstractContextManager[None]:
    """Show the ``dreamood`` logger's messages (stage headers, notes) on stderr during the run.

    ``dreamood demo`` already does this for every command; the handler is added only when the logger has none.
    """
    import logging

    from dreamood.logs import log_to_stderr

    return contextlib.nullcontext() if logging.getLogger("dreamood").handlers else log_to_stderr(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the demo.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The exit status (0 on success, 2 for invalid options).
    """
    parser = argparse.ArgumentParser(
        prog="dreamood demo",
        description="Run DREAM-OOD end to end on scikit-learn's digits, offline, and write a report.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
