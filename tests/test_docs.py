"""The docs stay true: every ```python block of README.md and docs/*.md runs, the config key
tables of docs/cli.md are the ones generated from the schemas, and the documented call of
``gdlr_jax.sweep`` (docs/engine.md) has the signature's defaults.

After changing a schema, rewrite the tables with ``python tests/test_docs.py``.

A block that reads ``GDLR_MNIST_DIR`` needs MNIST: it runs with the ``mnist_dir`` fixture's
folder and is skipped without one. Each block runs in a fresh interpreter (as a reader would
paste it), in a temporary folder holding a link to the repository's ``configs/``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks() -> list[tuple[str, int, str]]:
    """``(file, line, code)`` of every ```python block of the docs (line: of the fence)."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((str(path.relative_to(REPO)), line, match.group(1)))
    return found


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks():
    files = {file for file, _, _ in BLOCKS}
    assert {"README.md", "docs/cli.md", "docs/curvature.md", "docs/data.md"} <= files


@pytest.mark.slow  # a fresh interpreter each (imports jax, compiles): about 5-30 s a block
@pytest.mark.parametrize("file, line, code", BLOCKS, ids=[f"{f}:{n}" for f, n, _ in BLOCKS])
def test_python_block_runs(file, line, code, tmp_path, request):
    env = {k: v for k, v in os.environ.items() if k != "GDLR_MNIST_DIR"}
    if "GDLR_MNIST_DIR" in code:
        env["GDLR_MNIST_DIR"] = str(request.getfixturevalue("mnist_dir"))  # skips without
    (tmp_path / "configs").symlink_to(REPO / "configs")
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path, env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, f"{file}:{line}: the block fails:\n{done.stderr[-3000:]}"


# ----- the key tables of docs/cli.md ---------------------------------------------------------
_TABLE = re.compile(
    r"(<!-- keys of (\S+): generated from the schema by tests/test_docs.py -->\n)(.*?)"
    r"(<!-- end of the generated table -->)",
    re.S,
)


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def key_table(experiment: str) -> str:
    """The markdown table of a config's keys: the common ones (``experiment: "config"``) or
    those of an experiment's schema, with what is allowed, the default and the meaning."""
    from gdlr_jax.experiments.config import EXPERIMENTS, get_experiment, schema_entries

    if experiment == "config":
        rows = [
            ("experiment", "one of " + ", ".join(f"'{n}'" for n in EXPERIMENTS), "required",
             "the experiment that runs the config"),
            ("description", "a string", '""', "one line shown by `gdlr list`"),
        ]
    else:
        rows = schema_entries(get_experiment(experiment).schema)
    lines = ["| key | allowed | default | meaning |", "| --- | --- | --- | --- |"]
    for key, allowed, default, meaning in rows:
        shown = "required" if default == "required" else f"`{_cell(default)}`"
        lines.append(f"| `{key}` | {_cell(allowed)} | {shown} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def _generated(text: str) -> str:
    return _TABLE.sub(lambda m: m.group(1) + key_table(m.group(2)) + m.group(4), text)


def test_cli_doc_key_tables_are_generated_from_the_schemas():
    from gdlr_jax.experiments.config import EXPERIMENTS

    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert sorted(m.group(2) for m in _TABLE.finditer(text)) == sorted(["config", *EXPERIMENTS])
    assert text == _generated(text), (
        "docs/cli.md's key tables differ from the schemas: run python tests/test_docs.py"
    )


def test_a_changed_default_changes_the_table(monkeypatch):
    import dataclasses

    from gdlr_jax.experiments import two_neuron

    def row() -> str:
        (line,) = [r for r in key_table("two_neuron").splitlines() if "`basin.resolution`" in r]
        return line

    basin = two_neuron.SCHEMA.keys["basin"]
    assert "| `200` | initialisations per axis |" in row()
    changed = dataclasses.replace(basin.keys["resolution"], default=7)
    monkeypatch.setitem(basin.keys, "resolution", changed)
    assert "| `7` | initialisations per axis |" in row()


# ----- the documented call of gdlr_jax.sweep -------------------------------------------------
def test_the_documented_sweep_call_names_every_argument_with_its_default():
    import jax.numpy as jnp

    import gdlr_jax

    (code,) = [c for f, _, c in BLOCKS if "result = gdlr_jax.sweep(\n" in c]
    call = next(
        node for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "gdlr_jax.sweep"
    )
    parameters = inspect.signature(gdlr_jax.sweep).parameters
    keywords = [p for p in parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert [k.arg for k in call.keywords] == [p.name for p in keywords]
    for keyword in call.keywords:
        if parameters[keyword.arg].default is inspect.Parameter.empty:
            continue  # steps: required
        value = eval(ast.unparse(keyword.value), {"gdlr_jax": gdlr_jax, "jnp": jnp})  # noqa: S307
        assert value == parameters[keyword.arg].default, keyword.arg


if __name__ == "__main__":  # rewrite the generated tables of docs/cli.md
    sys.path.insert(0, str(REPO))
    path = REPO / "docs" / "cli.md"
    old = path.read_text(encoding="utf-8")
    new = _generated(old)
    path.write_text(new, encoding="utf-8")
    print(json.dumps({"docs/cli.md": "rewritten" if new != old else "unchanged"}))
