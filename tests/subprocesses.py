"""Helpers of the tests that start several Python processes (jax.distributed on localhost)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest


def free_port() -> int:
    """A TCP port of localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """This process's environment on the CPU platform, one host device, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> tuple[list[int], list[str]]:
    """Exit codes and outputs of ``procs``; all are killed and the test fails past ``timeout``."""
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a process did not finish in time:\n" + "\n".join(outputs))
    return [proc.returncode for proc in procs], outputs
