"""The ``gdlr`` command line: ``gdlr run [CONFIG]``, ``gdlr list``, ``gdlr --version``.

``main(argv)`` returns the exit status (0 on success, 2 on a bad config or command line), so
tests call it in-process; the installed ``gdlr`` script is ``sys.exit(main())``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gdlr_jax import __version__
from gdlr_jax.experiments.config import EXPERIMENTS, ConfigError, get_experiment, load_config
from gdlr_jax.experiments.runner import (
    DEFAULT_CONFIG,
    RUNS_DIR,
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
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in the output folder (only a folder holding a "
        "gdlr config.yaml is ever deleted)",
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
        target = args.out if args.out is not None else output_dir_for(config.name)
        print(f"# config {config.name} ({config.source}); fingerprint {config.fingerprint}")
        print(f"# output folder: {target}")
        print(config.to_yaml(), end="")
        return 0
    run_config(config, out=args.out, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


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
        The exit status: 0 on success, 2 on a bad command line or config (the error is
        printed to stderr as ``gdlr: error: ...``), 1 when ``gdlr list`` finds no config.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            return _list()
    except ConfigError as err:
        print(f"gdlr: error: {err}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2
