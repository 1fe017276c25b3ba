"""The installed ``gdlr`` script: :func:`gdlr_jax.experiments.cli.main`, with Ctrl-C during
start-up handled like Ctrl-C later on (one line ``gdlr: interrupted``, exit status 130).

A top-level module, outside the ``gdlr_jax`` package on purpose: importing any module of the
package runs ``gdlr_jax/__init__.py``, which imports jax (1-2 s), so only code outside the
package runs before that import. A ``KeyboardInterrupt`` raised inside the import cannot be
caught reliably (jaxlib turns one raised in its extension's initialisation into an
``ImportError``, and jax's garbage-collection callback swallows one raised there), so Ctrl-C is
not turned into an exception until the import is over: it ends the process at once.

For the same reason the XLA flags that must be set before jax initialises are set here:
where the CPU has AVX-512, ``--xla_cpu_prefer_vector_width=512`` (XLA:CPU emits 256-bit vectors
by default; 512-bit ones ran the engine's two-neuron sweep about 2x faster on an AVX-512 Zen 5,
``docs/engine.md``), unless ``XLA_FLAGS`` already chooses a width.
"""

import os
import signal
import sys


def _exit_interrupted(signum: int, frame: object) -> None:
    os.write(2, b"gdlr: interrupted\n")
    os._exit(130)  # nothing to clean up: no file is written while importing


VECTOR_WIDTH_FLAG = "--xla_cpu_prefer_vector_width"


def _cpu_has_avx512() -> bool:
    """Whether ``/proc/cpuinfo`` lists the ``avx512f`` flag (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(
                line.startswith("flags") and "avx512f" in line.split() for line in cpuinfo
            )
    except OSError:
        return False


def prefer_wide_vectors(environ: dict = os.environ) -> None:
    """Adds ``--xla_cpu_prefer_vector_width=512`` to ``XLA_FLAGS`` on an AVX-512 CPU, unless
    the flag is there already (before jax is imported; later it has no effect)."""
    flags = environ.get("XLA_FLAGS", "")
    if VECTOR_WIDTH_FLAG not in flags and _cpu_has_avx512():
        environ["XLA_FLAGS"] = f"{flags} {VECTOR_WIDTH_FLAG}=512".strip()


def main() -> int:
    """Runs ``gdlr`` (the command line of ``sys.argv``) and returns its exit status."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not when the parent process ignores SIGINT
        signal.signal(signal.SIGINT, _exit_interrupted)
    prefer_wide_vectors()
    from gdlr_jax.experiments.cli import main as gdlr

    signal.signal(signal.SIGINT, previous)
    try:
        return gdlr()
    except KeyboardInterrupt:  # before cli.main's own handling (building the parser)
        print("gdlr: interrupted", file=sys.stderr)
        return 130
