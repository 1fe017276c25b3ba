"""The installed ``gdlr`` script: :func:`gdlr_jax.experiments.cli.main`, with Ctrl-C during
start-up handled like Ctrl-C later on (one line ``gdlr: interrupted``, exit status 130).

A top-level module, outside the ``gdlr_jax`` package on purpose: importing any module of the
package runs ``gdlr_jax/__init__.py``, which imports jax (1-2 s), so only code outside the
package runs before that import. A ``KeyboardInterrupt`` raised inside the import cannot be
caught reliably (jaxlib turns one raised in its extension's initialisation into an
``ImportError``, and jax's garbage-collection callback swallows one raised there), so Ctrl-C is
not turned into an exception until the import is over: it ends the process at once.
"""

import os
import signal
import sys


def _exit_interrupted(signum: int, frame: object) -> None:
    os.write(2, b"gdlr: interrupted\n")
    os._exit(130)  # nothing to clean up: no file is written while importing


def main() -> int:
    """Runs ``gdlr`` (the command line of ``sys.argv``) and returns its exit status."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when the parent process ignores SIGINT
        signal.signal(signal.SIGINT, _exit_interrupted)
    from gdlr_jax.experiments.cli import main as gdlr

    signal.signal(signal.SIGINT, previous)
    try:
        return gdlr()
    except KeyboardInterrupt:  # before cli.main's own handling (building the parser)
        print("gdlr: interrupted", file=sys.stderr)
        return 130
