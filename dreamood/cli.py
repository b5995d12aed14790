"""The ``dreamood`` command: run DREAM-OOD stage by stage, or a whole run from a configuration file.

Every stage subcommand reads the same configuration (``--config``, a TOML/YAML/JSON file or the name of a
packaged paper configuration, plus ``--set key=value`` overrides) and works in the run's output folder: it
loads the artefacts of the stages before it and writes its own. ``dreamood run`` chains all stages and skips
those whose artefact exists; with ``--baselines`` it also runs the paper's baselines (skipping finished ones)
and prints a table comparing them with the run. Errors are reported in one line (``--debug`` shows the
traceback) with a non-zero exit code. ``torchrun -m dreamood train ...`` trains on several processes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dreamood import __version__

if TYPE_CHECKING:
    from dreamood.evaluation import OODReport
    from dreamood.pipeline import Pipeline

__all__ = ["build_parser", "main"]

_EPILOG = (
    "Stages in order: anchors, fit-encoder (encoder and feature bank), sample, generate, train, evaluate. "
    "Each writes its artefact to the output folder and reads the previous stages' artefacts from it; "
    "`dreamood run` runs them all and skips those already done. Configurations: a .toml, .yaml or .json file, "
    "or a packaged one: cifar100, imagenet100, imagenet100-dream-id."
)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("configuration")
    group.add_argument(
        "--config",
        default="cifar100",
        metavar="FILE",
        help="configuration file (.toml, .yaml, .json) or packaged name: cifar100 (default), imagenet100, "
        "imagenet100-dream-id",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key, e.g. --set training.epochs=10 --set data.root=/data (repeatable)",
    )
    group.add_argument("--output-dir", metavar="DIR", help="folder of the run's artefacts (sets output_dir)")
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... or auto (CUDA when available)")
    group.add_argument("--seed", type=int, help="seed of every random choice of the run")
    group.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the run to tiny random models and random data that run on a CPU in seconds (checks the "
        "wiring; the numbers mean nothing)",
    )
    output = common.add_argument_group("output")
    output.add_argument("--no-progress", action="store_true", help="hide progress bars")
    output.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    output.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dreamood`` command, with one subparser per subcommand.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="dreamood",
        description="DREAM-OOD: imagine outliers with a diffusion model and train OOD detectors with them "
        "(Du et al., NeurIPS 2023).",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"dreamood {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    for name, (stages, text) in _stage_commands().items():
        sub = commands.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("--force", action="store_true", help="redo the stage even when its artefact exists")
        if "report" in stages:
            sub.add_argument(
                "--detectors",
                metavar="NAMES",
                help="also evaluate the classifier under post-hoc detectors and print one table (written to "
                "detectors/): 'all' or comma-separated names (msp, energy, odin, mahalanobis, knn, vim, react, "
                "dice, ash-s, scale, gen, ...; see the detectors page)",
            )
        sub.set_defaults(handler=_run_stages, stages=stages)
    run = commands.add_parser(
        "run",
        parents=[common],
        help="run every stage from a configuration, skipping those already done",
        description="Run every stage of DREAM-OOD (or DREAM-ID) from a configuration, skipping the stages whose "
        "artefact exists, and print the evaluation report.",
        epilog=_EPILOG,
    )
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="NAME",
        help="redo NAME even when its artefact exists: a stage (anchors, encoder, bank, samples, images, "
        "classifier, report), a baseline of --baselines (retrained from scratch), or all: every stage and "
        "baseline (repeatable)",
    )
    run.add_argument(
        "--baselines",
        default="",
        metavar="NAMES",
        help="also run the paper's baselines on the same data and print a comparison table (also written to "
        "baselines.md): 'all' or a comma-separated subset of godin,gan (dream-ood) or of cross-entropy,"
        "randaugment,autoaugment,augmix,cutmix,generic-prompts,memo (dream-id); each works in "
        "baselines/<name>/ and is skipped when its result exists",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration and what the run would do with each stage (reuse, make, resume, "
        "redo and why) and baseline, run nothing",
    )
    run.add_argument(
        "--on-change",
        choices=("redo", "refuse"),
        default="redo",
        help="a finished stage whose settings or inputs changed: redo it and everything after it (default), or "
        "refuse and say what changed",
    )
    run.set_defaults(handler=_run_all, stages=())
    verify = commands.add_parser(
        "verify",
        help="check a run folder: stage records, artefact digests, generated images, checkpoints",
        description="Check every artefact of a run folder against what made it and report every problem "
        "(exit code 1 when there is one).",
    )
    verify.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (output_dir of the run)")
    verify.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    verify.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    verify.set_defaults(handler=_verify)
    commands.add_parser(
        "demo",
        help="run DREAM-OOD end to end on bundled digits, offline (options: dreamood demo --help)",
        description=(
            "Run every DREAM-OOD stage offline on scikit-learn's digits and write a report; "
            "every argument after `demo` is passed to it."
        ),
        add_help=False,
    )
    _add_export_command(commands)
    return parser


# ---- helpers -------------------------------------------------------------------------------------------------


def _stage_commands() -> dict[str, tuple[tuple[str, ...], str]]:
    """Subcommand -> (the stages it runs, one-line help), from the stage records."""
    from dreamood.pipeline import STAGES

    commands: dict[str, tuple[tuple[str, ...], str]] = {}
    for stage in STAGES:
        names, _ = commands.get(stage.command, ((), stage.help))
        commands[stage.command] = ((*names, stage.name), stage.help)
    return commands


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. training.epochs=10), got {item!r}")
        overrides[key.strip()] = value
    return overrides


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` overrides and the flags that set configuration keys."""
    overrides: dict[str, Any] = _parse_overrides(args.overrides)
    for key, value in (("output_dir", args.output_dir), ("device", args.device), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    if args.no_progress:
        overrides["progress"] = False
    return overrides


def _load(args: argparse.Namespace) -> Any:
    """The configuration, with the overrides."""
    from dreamood.config import load_config

    return load_config(args.config, _overrides(args))


def _shrink(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """The configuration and the smoke data when ``--smoke`` is given (the configuration and ``None`` otherwise)."""
    if not args.smoke:
        return config, None
    import torch

    from dreamood.testing import smoke_setup

    torch.set_num_threads(1)  # tiny models: extra threads only add overhead
    small, data = smoke_setup(config, config.output_dir)
    _notice_smoke_overrides(_overrides(args), config, small)
    return small, data


def _folder_lock(config: Any, *, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """The run folder's lock for the whole command (only rank 0 of a torchrun run takes it)."""
    from dreamood.pipeline.lock import RunFolderLock

    if not enabled or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return RunFolderLock(config.output_dir)


def _notice_smoke_overrides(overrides: dict[str, Any], asked: Any, used: Any) -> None:
    """Say which of the user's settings (``--set``, ``--device``, ...) --smoke replaced with its own tiny ones."""
    from dreamood.pipeline.records import flatten

    asked_values, used_values = dict(flatten(asked.to_dict())), dict(flatten(used.to_dict()))
    replaced = [
        f"{key}={asked_values[key]!r} (--smoke uses {used_values[key]!r})"
        for key in overrides
        if key in asked_values and key != "output_dir" and used_values.get(key) != asked_values[key]
    ]
    if replaced:
        logging.getLogger("dreamood").warning("--smoke replaces your settings: %s", ", ".join(replaced))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_distributed(stages: Sequence[str], command: str) -> None:
    from dreamood.pipeline import STAGES, stage_named

    if _world_size() > 1 and not all(stage_named(name).distributed for name in stages):
        supported = " and ".join(f"`{stage.command}`" for stage in STAGES if stage.distributed)
        raise ValueError(
            f"`dreamood {command}` runs in one process; under torchrun only {supported} are supported "
            "(run the other stages without torchrun)"
        )


def _accuracy_line(accuracy: dict[str, float]) -> str:
    """DREAM-ID's top-1 accuracies in % as one JSON line."""
    return json.dumps({name: round(100 * value, 2) for name, value in accuracy.items()})


def _compare_baselines(
    pipe: Pipeline, names: Sequence[str], report: OODReport, accuracy: dict[str, float] | None
) -> str:
    """Run (or load) the baselines; the markdown table comparing them with the run (its accuracy for DREAM-ID)."""
    from dreamood.pipeline import accuracy_table, ood_table

    if accuracy is not None:
        return accuracy_table({"DREAM-ID": accuracy, **{name: pipe.generalization_baseline(name) for name in names}})
    return ood_table({"DREAM-OOD": report, **{name: pipe.ood_baseline(name) for name in names}})


# ---- handlers ------------------------------------------------------------------------------------------------


def _run_stages(args: argparse.Namespace) -> int:
    from dreamood.pipeline import Pipeline, stage_named

    _check_distributed(args.stages, args.command)
    config = _load(args)
    with _folder_lock(config):
        config, data = _shrink(args, config)
        pipe = Pipeline(config, data, force=args.stages if args.force else ())
        pipe.write_config()
        for name in args.stages:
            stage = stage_named(name)
            result = pipe.run_stage(stage)
            if int(os.environ.get("RANK", "0")) == 0:
                print(stage.summary(result))
            if stage.name == "report" and config.method == "dream-id":
                print(_accuracy_line(pipe.generalization(pipe.load("classifier"))))
            if stage.name == "report" and getattr(args, "detectors", None):
                names = "all" if args.detectors.strip() == "all" else [n.strip() for n in args.detectors.split(",")]
                comparison = pipe.compare_detectors(pipe.load("classifier"), names)
                if int(os.environ.get("RANK", "0")) == 0:
                    print(comparison.to_markdown())
    return 0


def _run_all(args: argparse.Namespace) -> int:
    from dreamood.pipeline import BASELINES, STAGES, parse_baselines

    _check_distributed([stage.name for stage in STAGES], "run")
    config = _load(args)
    try:
        baselines = parse_baselines(args.baselines, config.method)
    except ValueError as error:
        raise ValueError(f"--baselines: {error}") from error
    not_run = [name for name in args.force if name in BASELINES and name not in baselines]
    if not_run:
        raise ValueError(f"--force names baseline(s) {', '.join(not_run)} that this run does not run (see --baselines)")
    force = [*(stage.name for stage in STAGES), *baselines] if "all" in args.force else list(args.force)
    with _folder_lock(config, enabled=not args.dry_run):
        config, data = _shrink(args, config)
        return _run_pipeline(args, config, data, force, baselines)


def _run_pipeline(
    args: argparse.Namespace, config: Any, data: Any, force: Sequence[str], baselines: Sequence[str]
) -> int:
    from dreamood.io import atomic_write, remove_temporaries
    from dreamood.pipeline import SMOKE_BASELINES, Pipeline

    pipe = Pipeline(
        config, data, force=force, baselines=SMOKE_BASELINES if args.smoke else None, on_change=args.on_change
    )
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        for status in pipe.plan():
            print(f"{status.stage:<11} {status.state:<7} {pipe.path(status.stage)}  ({status.reason})")
        for name in baselines:
            path = pipe.baseline_path(name)
            state = "forced" if name in pipe.force else "done" if pipe.baseline_is_done(name) else "to do"
            print(f"{'baseline ' + name:<24} {state:<6} {path}")
        from dreamood.pipeline.preflight import check_requirements

        missing = check_requirements(pipe)
        for problem in missing:
            print(f"missing: {problem}")
        if missing:
            raise ValueError(f"the run cannot start: {len(missing)} thing(s) missing (listed above)")
        print("ready: every data folder, model folder and resource the run needs is there")
        return 0
    report = pipe.run()
    print(report)
    accuracy = None
    if config.method == "dream-id":
        accuracy = json.loads((pipe.output_dir / "generalization.json").read_text())  # written by Pipeline.run
        print(_accuracy_line(accuracy))
    if baselines:
        table = _compare_baselines(pipe, baselines, report, accuracy)
        path = pipe.output_dir / "baselines.md"
        remove_temporaries(path)
        with atomic_write(path, "w") as handle:
            handle.write(table + "\n")
        print(table)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dreamood.pipeline.verify import verify_run

    problems = verify_run(args.run_dir)
    for problem in problems:
        print(f"problem: {problem}")
    if not args.quiet:
        print(f"{args.run_dir}: {len(problems)} problem(s)" if problems else f"{args.run_dir}: no problem found")
    return 1 if problems else 0


def _run_demo(argv: Sequence[str]) -> int:
    from dreamood.errors import DreamoodError

    if importlib.util.find_spec("dreamood.demo") is None:
        raise DreamoodError("the demo is not available in this installation (the module dreamood.demo is missing)")
    import dreamood.demo as demo

    hook = getattr(demo, "main", None)
    if not callable(hook):
        raise DreamoodError("dreamood.demo has no main(argv) entry point")
    try:
        result = hook(list(argv))
    except SystemExit as exit_:  # the demo's own argument parser: --help, usage errors
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    return int(result) if isinstance(result, int) else 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    known = (ValueError, TypeError, FileNotFoundError, PermissionError, NotADirectoryError, FileExistsError)
    from dreamood.errors import DreamoodError

    if isinstance(error, (DreamoodError, *known)) and text:
        return text
    return f"{type(error).__name__}: {text} (run with --debug for the traceback)"


def _logging_to_stderr(quiet: bool) -> contextlib.AbstractContextManager[None]:
    """Show dreamood's log messages on stderr (warnings only with ``quiet`` or off rank 0) during the command."""
    from dreamood.logs import log_to_stderr

    return log_to_stderr(logging.WARNING if quiet or int(os.environ.get("RANK", "0")) != 0 else logging.INFO)


def _close_process_group(*, succeeded: bool) -> None:
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if succeeded:
            # Tearing the group down while a peer is still in a gloo collective can abort the peer.
            dist.barrier()
        dist.destroy_process_group()


# ---- dreamood export -------------------------------------------------------------------------------------------


def _add_export_command(commands: Any) -> None:
    """``dreamood export FOLDER OUT``: a generated folder as an ImageFolder tree with class names / OpenOOD list."""
    export = commands.add_parser(
        "export",
        help="write generated images as an ImageFolder tree with class names, or with an OpenOOD image list",
        description="Write a folder of generated images (e.g. <output_dir>/images) as an ImageFolder tree whose "
        "class folders (000_apple/, 001_aquarium_fish/, ...) sort in label order, with classes.json; with "
        "--format openood also imglist.txt ('<path> <label>' lines, label -1 for outliers). For pytorch-ood, "
        "load the tree with dreamood.data.outlier_dataset (targets -1).",
    )
    export.add_argument("folder", help="a folder written by generate_images (e.g. runs/x/images)")
    export.add_argument("out_dir", help="where to write the tree (must be empty or missing, unless --overwrite)")
    export.add_argument("--format", choices=("imagefolder", "openood"), default="imagefolder")
    export.add_argument(
        "--labels",
        choices=("outlier", "class"),
        default="outlier",
        help="labels of the OpenOOD list: -1 for every image (outliers, default) or the class index (inliers)",
    )
    export.add_argument("--image-size", type=int, metavar="PIXELS", help="resize the images (e.g. 32 for CIFAR)")
    export.add_argument(
        "--link",
        choices=("copy", "hardlink", "symlink"),
        default="copy",
        help="copy the images (default) or link them (without --image-size only)",
    )
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    export.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    export.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from dreamood.data.export import export_generated

    result = export_generated(
        args.folder,
        args.out_dir,
        args.format,
        labels=args.labels,
        image_size=args.image_size,
        link=args.link,
        overwrite=args.overwrite,
    )
    if not args.quiet:
        classes = sum(1 for name in result.class_folders if name)
        print(f"wrote {result.num_images} images in {classes} class folders to {result.out_dir}")
        if result.imglist is not None:
            print(f"OpenOOD image list: {result.imglist} (data_dir: {result.out_dir})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dreamood`` command.

    Args:
        argv: The arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 1 on an error (reported in one line on stderr), 2 on a usage error,
        130 when interrupted.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"]:
        try:
            return _run_demo(arguments[1:])
        except Exception as error:
            print(f"dreamood demo: error: {_one_line(error)}", file=sys.stderr)
            return 1
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0) if isinstance(exit_.code, int) or exit_.code is None else 2
    succeeded = False
    try:
        with _logging_to_stderr(args.quiet):
            code = int(args.handler(args))
        succeeded = code == 0
        return code
    except KeyboardInterrupt:
        print(f"dreamood {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"dreamood {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        _close_process_group(succeeded=succeeded)
