"""The ``gdlr`` command line: ``gdlr run [CONFIG]``, ``gdlr show RUN``, ``gdlr list``,
``gdlr --version``.

``main(argv)`` returns the exit status (0 on success, 2 on a bad config or command line or when
out of memory, 1 when ``gdlr list`` finds no config, 130 when interrupted by Ctrl-C, 141 when
stdout is closed early, as in ``gdlr list | head -3``), so tests call it in-process. The
installed ``gdlr`` script calls it through the top-level module ``_gdlr_entry``, which also
makes a Ctrl-C during the imports of this module (jax, 1-2 s) exit with 130 and one line
``gdlr: interrupted``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import textwrap
from collections.abc import Sequence

import yaml
from jax.errors import JaxRuntimeError

from gdlr_jax._version import __version__
from gdlr_jax.engine._checkpoint import CheckpointMismatchError
from gdlr_jax.engine._distributed import DistributedError, initialize
from gdlr_jax.engine._memory import readable_size
from gdlr_jax.experiments._dry_run import plan_run
from gdlr_jax.experiments.config import (
    EXPERIMENTS,
    ConfigError,
    Section,
    get_experiment,
    load_config,
)
from gdlr_jax.experiments.runner import (
    DEFAULT_CONFIG,
    RUNS_DIR,
    RunInterrupted,
    command_line_names,
    config_dirs,
    find_config,
    format_table,
    list_configs,
    run_config,
)

#: the environment variable naming the folder of MNIST IDX files, for ``gdlr run`` (when the
#: config leaves ``data.data_dir`` empty) and for the tests (``tests/conftest.py``).
DATA_DIR_ENV = "GDLR_MNIST_DIR"
#: the config key that ``--data-dir`` sets.
DATA_DIR_KEY = "data.data_dir"
#: the width ``gdlr list`` fits its lines in.
LIST_WIDTH = 100

_EPILOG = f"""\
examples:
  gdlr run                                  # the default config (two-neuron study)
  gdlr run two_neuron --set sweep.steps=500 --set basin.resolution=64
  gdlr run configs/two_neuron.yaml --out /tmp/tn --overwrite
  gdlr run two_neuron --resume              # continue an interrupted run in runs/two_neuron
  gdlr run mnist_gelu_mse_cpu --data-dir ~/mnist   # a folder of MNIST IDX files
  gdlr run mnist_gelu_mse_cpu --dry-run     # every check of the run, and its plan; no compute
  gdlr show two_neuron                      # the table and files of the run in runs/two_neuron
  gdlr list

configs are YAML files; `gdlr list` shows the shipped ones and docs/cli.md documents every key.
MNIST: --data-dir PATH, or the environment variable {DATA_DIR_ENV} (docs/data.md).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gdlr`` (subcommands ``run``, ``show`` and ``list``)."""
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
        help="replace the previous run in the output folder (only a folder gdlr made, "
        "holding nothing else, is ever emptied)",
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
        "--data-dir",
        metavar="PATH",
        help=f"the folder of MNIST IDX files, for the experiments that read data (sets "
        f"{DATA_DIR_KEY}, after any --set); default: the config's {DATA_DIR_KEY}, else the "
        f"environment variable {DATA_DIR_ENV}; see docs/data.md",
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
        help="make every check of the run (config, data, memory plan, output folder) and "
        "print its plan (sweeps, trajectories, estimated memory and time) and the resolved "
        "config; compute and write nothing; exit status 2 where the run would refuse",
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cluster = run.add_argument_group(
        "across processes (jax.distributed; docs/distributed.md)",
        "every process runs the same command with the same --out, a folder all of them see; "
        "each runs its share of every sweep, process 0 writes the results",
    )
    cluster.add_argument(
        "--distributed",
        action="store_true",
        help="join the job's jax.distributed runtime, the cluster detected by JAX (SLURM, "
        "Open MPI, TPU pods, Kubernetes)",
    )
    cluster.add_argument(
        "--coordinator", metavar="HOST:PORT", help="the address of process 0 (explicit start)"
    )
    cluster.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    cluster.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    cluster.add_argument(
        "--coordinator-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for the coordinator and the other processes at the start "
        "(default: 60)",
    )

    show = commands.add_parser(
        "show",
        help="print the table of a finished run and list its files",
        description="Print the summary table of a run and list the files of its folder.",
    )
    show.add_argument(
        "run",
        metavar="RUN",
        help=f"a run folder, or the name of one in {RUNS_DIR}/ (e.g. two_neuron)",
    )

    commands.add_parser(
        "list",
        help="list the shipped configs with their descriptions",
        description="List the configs found in ./configs and in the repository's configs/.",
    )
    return parser


# ----- gdlr run -----------------------------------------------------------------------------
def _reads_data(experiment: str) -> bool:
    """Whether the experiment's schema has the key ``data.data_dir``."""
    data = get_experiment(experiment).schema.keys.get("data")
    return isinstance(data, Section) and "data_dir" in data.keys


def _data_dir(path: pathlib.Path, args: argparse.Namespace) -> str | None:
    """The data folder to set as ``data.data_dir``: ``--data-dir``, else ``$GDLR_MNIST_DIR``
    when the config file leaves the key empty and no ``--set`` gives it; ``None`` for none.

    Raises:
        ConfigError: on ``--data-dir`` for an experiment that reads no data.
    """
    try:  # a config that cannot be read is reported by load_config
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return args.data_dir
    experiment = raw.get("experiment") if isinstance(raw, dict) else None
    if experiment not in EXPERIMENTS:
        return args.data_dir
    if not _reads_data(experiment):
        if args.data_dir is not None:
            raise ConfigError(
                f"--data-dir {args.data_dir}: config {path} (experiment {experiment!r}) reads "
                "no data; drop --data-dir"
            )
        return None
    if args.data_dir is not None:
        return args.data_dir
    data = raw.get("data")
    in_file = data.get("data_dir") if isinstance(data, dict) else None
    overridden = any(o.partition("=")[0].strip() in ("data", DATA_DIR_KEY) for o in args.overrides)
    if in_file or overridden:
        return None
    return os.environ.get(DATA_DIR_ENV) or None


def _start_distributed(args: argparse.Namespace) -> None:
    """Joins the jax.distributed runtime the flags name, before any other JAX call."""
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if args.distributed and any(value is not None for value in explicit):
        raise DistributedError(
            "--distributed detects the cluster; it does not take --coordinator, "
            "--num-processes or --process-id (give those alone for an explicit start)"
        )
    if args.distributed:
        initialize(timeout_s=args.coordinator_timeout)
    elif any(value is not None for value in explicit):
        if None in explicit:
            raise DistributedError(
                "an explicit jax.distributed start needs all of --coordinator HOST:PORT, "
                "--num-processes N and --process-id I"
            )
        initialize(
            args.coordinator, args.num_processes, args.process_id,
            timeout_s=args.coordinator_timeout,
        )


def _run(args: argparse.Namespace) -> int:
    if not args.dry_run:  # a dry run computes nothing: each process checks on its own
        _start_distributed(args)
    path = find_config(args.config)
    data_dir = _data_dir(path, args)
    args.data_dir = data_dir  # the resume command names it
    data = [] if data_dir is None else [f"{DATA_DIR_KEY}={json.dumps(data_dir)}"]
    config = load_config(path, [*args.overrides, *data])
    if args.dry_run:
        plan = plan_run(config, out=args.out, overwrite=args.overwrite, resume=args.resume)
        print(plan.describe(), end="")
        print(plan.config.to_yaml(), end="")
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
    if args.data_dir is not None:
        argv += ["--data-dir", args.data_dir]
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


# ----- gdlr show ----------------------------------------------------------------------------
def _run_folder(name: str) -> pathlib.Path:
    """The run folder ``name``: a folder as given, else ``runs/<name>``.

    Raises:
        ConfigError: when neither is a folder (the message lists the runs in ``runs/``).
    """
    for path in (pathlib.Path(name), RUNS_DIR / name):
        if path.is_dir():
            return path
    runs = sorted(p.name for p in RUNS_DIR.iterdir() if p.is_dir()) if RUNS_DIR.is_dir() else []
    shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
    raise ConfigError(f"run not found: {name} (runs in {RUNS_DIR}/: {shown or 'none'})")


def _show(name: str) -> int:
    path = _run_folder(name)
    summary_file = path / "summary.json"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a gdlr run folder (no config.yaml)")
    if not summary_file.is_file():
        print(
            f"{path}: an unfinished run (no summary.json); continue it with gdlr run "
            f"{shlex.quote(str(path / 'config.yaml'))} --resume --out {shlex.quote(str(path))}"
        )
    else:
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            table = summary["table"]
            headers, rows, notes = table["headers"], table["rows"], table["notes"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{summary_file} holds no run table ({type(err).__name__}: {err}); it was "
                "written by another gdlr version, or damaged"
            ) from None
        print(
            f"run {summary.get('config')} (experiment {summary.get('experiment')}) in {path}: "
            f"{summary.get('wall_time_s')} s, gdlr_jax {summary.get('gdlr_jax_version')}"
        )
        print(format_table(headers, rows))
        for line in notes:
            print(line)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    print(f"\nfiles in {path}:")
    print(
        format_table(
            ("file", "size"),
            [(str(p.relative_to(path)), readable_size(p.stat().st_size)) for p in files],
        )
    )
    return 0


# ----- gdlr list ----------------------------------------------------------------------------
def _list() -> int:
    configs = list_configs()
    if not configs:
        print("no configs found (looked in ./configs and the repository's configs/)")
        return 1
    names = max(len(name) for name, _, _ in configs)
    for folder in config_dirs():
        here = [(name, description) for name, path, description in configs if path.parent == folder]
        if not here:
            continue
        cwd = pathlib.Path.cwd()  # ./configs/ as "configs/": a long absolute path would not fit
        shown = folder.relative_to(cwd) if folder.is_relative_to(cwd) else folder
        print(f"configs in {shown}/ (gdlr run NAME):")
        for name, description in here:  # descriptions wrapped to fit LIST_WIDTH
            lines = textwrap.wrap(description, max(20, LIST_WIDTH - names - 4)) or [""]
            print(f"  {name.ljust(names)}  {lines[0]}".rstrip())
            for line in lines[1:]:
                print(" " * (names + 4) + line)
    print("\nexperiments (the `experiment:` key of a config):")
    for name in EXPERIMENTS:
        line = f"{name}: {get_experiment(name).summary}"
        print(textwrap.fill(line, LIST_WIDTH, initial_indent="  ", subsequent_indent="    "))
    return 0


# ----- main ---------------------------------------------------------------------------------
def _stdout_closed() -> int:
    """After a write to a closed stdout (``gdlr list | head -3``): points stdout at
    ``/dev/null`` so that the interpreter's final flush is silent; returns 141 (128 +
    SIGPIPE, what a shell reports for a program ended by a closed pipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (in-process tests)
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gdlr`` script.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a bad command line or config, or when the run
        runs out of memory (the error is printed to stderr as one line ``gdlr: error:
        ...``), 1 when ``gdlr list`` finds no config, 130 when interrupted by Ctrl-C
        (stderr then says how to resume), 141 when stdout is closed before the output is
        written (``gdlr list | head -3``; nothing on stderr).
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        return _stdout_closed()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with command_line_names():
            if args.command == "run":
                return _run(args)
            if args.command == "show":
                return _show(args.run)
            if args.command == "list":
                return _list()
    except (ConfigError, CheckpointMismatchError, DistributedError) as err:
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
