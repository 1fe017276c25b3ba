"""The ``gdlr`` command line: ``gdlr run [CONFIG]``, ``gdlr list``, ``gdlr --version``.

``main(argv)`` returns the exit status (0 on success, 2 on a bad config or command line or when
out of memory, 1 when ``gdlr list`` finds no config, 130 when interrupted by Ctrl-C), so tests
call it in-process. The installed ``gdlr`` script calls it through the top-level module
``_gdlr_entry``, which also makes a Ctrl-C during the imports of this module (jax, 1-2 s) exit
with 130 and one line ``gdlr: interrupted``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from jax.errors import JaxRuntimeError

from gdlr_jax import __version__
from gdlr_jax.engine._checkpoint import CheckpointMismatchError
from gdlr_jax.experiments.config import (
    EXPERIMENTS,
    ConfigError,
    get_experiment,
    load_config,
)
from gdlr_jax.experiments.runner import (
    DEFAULT_CONFIG,
    RUNS_DIR,
    RunInterrupted,
    find_config,
    format_table,
    list_configs,
    output_dir_for,
    run_config,
)

_EPILOG = """\
examples:
  gdlr run                                  # the default config (two-neuron study)
  gdlr run two_neuron --set sweep.steps=500 --set basin.resolution=64
  gdlr run configs/two_neuron.yaml --out /tmp/tn --overwrite
  gdlr run two_neuron --resume              # continue an interrupted run in runs/two_neuron
  gdlr run two_neuron --dry-run             # validate and print the resolved config
  gdlr list

configs are YAML files; `gdlr list` shows the shipped ones and docs/cli.md documents every key.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gdlr`` (subcommands ``run`` and ``list``)."""
    parser = argparse.ArgumentParser(
        prog="gdlr",
        description="Gradient descent with large step sizes: run the experiments of gdlr_jax "
        "from validated YAML configs, writing results, summaries and figures.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gdlr_jax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a config (default: the two-neuron study)",
        description="Validate a config, run its experiment and write the output folder: "
        "config.yaml (resolved), results.npz, summary.json and the figures (PNG and PDF). "
        "A summary table is printed at the end.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        metavar="CONFIG",
        help="a config file, or the name of a shipped config (see `gdlr list`); "
        f"default: {DEFAULT_CONFIG}",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        help=f"output folder (default: {RUNS_DIR}/<config-name>, or <config-name>-2, -3, ... "
        "when taken: a previous run is never overwritten silently)",
    )
    existing = run.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in the output folder (only a folder holding a "
        "gdlr config.yaml is ever deleted)",
    )
    existing.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the unfinished run in the output folder (default: {RUNS_DIR}/"
        "<config-name> itself): the finished chunks of its sweeps are loaded, the others "
        "computed, with the results of an uninterrupted run; refused when the folder holds a "
        "run of another config",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. sweep.steps=500 or portraits.0.eta=0.3; "
        "the value is read as YAML and type-checked); repeatable",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved config and its output folder; compute nothing",
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    commands.add_parser(
        "list",
        help="list the shipped configs with their descriptions",
        description="List the configs found in ./configs and in the repository's configs/.",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config), args.overrides)
    if args.dry_run:
        target = args.out
        if target is None:
            target = output_dir_for(config.name, resume=args.resume)
        print(f"# config {config.name} ({config.source}); fingerprint {config.fingerprint}")
        print(f"# output folder: {target}")
        print(config.to_yaml(), end="")
        return 0
    run_config(
        config,
        out=args.out,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        resume=args.resume,
    )
    return 0


def _resume_command(args: argparse.Namespace, out: str) -> str:
    """The ``gdlr run`` command that resumes the interrupted run of ``args`` in ``out``."""
    argv = ["gdlr", "run", args.config]
    for override in args.overrides:
        argv += ["--set", override]
    return shlex.join(argv + ["--resume", "--out", out])


def _out_of_memory(err: BaseException) -> str:
    """One line for an allocation that failed while running (XLA's ``RESOURCE_EXHAUSTED`` on
    a device, or a host ``MemoryError``): what failed, and the keys that shrink the chunks."""
    what = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return (
        f"out of memory while running ({what}); run fewer trajectories at once: lower "
        "engine.etas_per_chunk (mnist) or engine.memory_budget_mb (two_neuron) with --set, "
        "or the problem size (resolution, n_init, width, max_examples)"
    )


def _list() -> int:
    rows = [(name, description, str(path)) for name, path, description in list_configs()]
    if not rows:
        print("no configs found (looked in ./configs and the repository's configs/)")
        return 1
    print(format_table(("config", "description", "file"), rows))
    print("\nexperiments (the `experiment:` key of a config):")
    for name in EXPERIMENTS:
        print(f"  {name}: {get_experiment(name).summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gdlr`` script.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a bad command line or config, or when the run
        runs out of memory (the error is printed to stderr as one line ``gdlr: error:
        ...``), 1 when ``gdlr list`` finds no config,
        130 when interrupted by Ctrl-C (stderr then says how to resume).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            return _list()
    except (ConfigError, CheckpointMismatchError) as err:
        print(f"gdlr: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, JaxRuntimeError) as err:
        if isinstance(err, JaxRuntimeError) and "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"gdlr: error: {_out_of_memory(err)}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(
            "gdlr: interrupted; finished chunks are saved; resume with: "
            + _resume_command(args, str(err.path)),
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        print("gdlr: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 2
